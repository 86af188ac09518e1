//! Haven IKEv2 key management daemon.
fn main() {}
