//! Haven ESP datapath daemon.
fn main() {}
