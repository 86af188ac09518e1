//! vpnctl: the Haven operator CLI.
fn main() {}
