//! `cargo run -p haven-config --example check FILE…`: what
//! `vpnctl config check` prints, for trying configurations by hand.

fn main() {
    let mut code = 0;
    for arg in std::env::args().skip(1) {
        let (c, text) = haven_config::check_report(std::path::Path::new(&arg));
        print!("{text}");
        code = code.max(c);
    }
    std::process::exit(code);
}
