//! Write the seed corpus for `bus-schema/fuzz`: `<dir>/decode/*` and `<dir>/ctl_request/*`.
//! Usage: cargo run -p bus-schema --example fuzz_seeds -- bus-schema/fuzz/corpus

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "bus-schema/fuzz/corpus".into()),
    );
    let sets = [
        ("decode", bus_schema::fuzzing::envelope_seeds()),
        ("ctl_request", bus_schema::fuzzing::request_seeds()),
    ];
    for (target, seeds) in sets {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i:02}")), s)?;
        }
        println!("{}: {} seeds", d.display(), seeds.len());
    }
    Ok(())
}
