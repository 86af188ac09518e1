//! Haven HA / FGSP sync daemon.
fn main() {}
