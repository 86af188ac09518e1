//! Print the encoding of a sample envelope as hex (handy when reading golden tests).

use bus_schema::{encode, Body, DaemonKind, Owner};

fn main() {
    let mut owner = Owner::new(
        DaemonKind::Ikemgr,
        0x0123_4567_89ab_cdef_0011_2233_4455_6677,
    );
    let env = owner.stamp(
        Body::Heartbeat { uptime_ms: 1500 },
        1_700_000_000_000_000_000,
    );
    let bytes = encode(&env);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    println!("{hex}");
    println!("{:?}", bus_schema::decode(&bytes));
}
