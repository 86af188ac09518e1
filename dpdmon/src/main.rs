//! Haven dead peer detection daemon.
fn main() {}
