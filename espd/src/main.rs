//! espd: Haven's ESP datapath daemon.
//!
//! What it does: follows ikemgr's CHILD SAs (`sa.child`) and carries their traffic in user
//! space: one persistent TUN device per phase1-interface (`vpn1`), raw ESP (IP protocol 50)
//! and RFC 3948 UDP/4500 on the outside (IPv4 or IPv6 outer addresses), the ESP transforms of `esp-proto`, anti-replay,
//! selector checks on inbound packets, outbound sequence numbers leased and persisted in
//! the journal `<run-dir>/espd-seq/marks` so they never repeat across a crash, and soft/hard lifetimes (each
//! SA's age and counts kept in `<run-dir>/espd-life/records`, so they go on across a crash). It
//! publishes per-tunnel records (`esp.tunnel`), activity batches (`esp.activity`),
//! sequence marks (`esp.seq`), lifetime events (`esp.expire`) and, for outbound packets
//! that find no SA, paced `esp.acquire` events (traffic-triggered negotiation), serves the `tunnel-list`
//! view and `tunnel-flush` command for `vpnctl diagnose vpn tunnel …`, and exports
//! Prometheus metrics (`espd_packets_total`, `espd_bytes_total`, `espd_drops_total{reason}`…).
//! IKE messages arriving on UDP/4500 go to ikemgr over `<run-dir>/ike4500.sock`; ikemgr's
//! own go out through `<run-dir>/espd-ike.sock` (format in `datapath::sockets`).
//! Across CHILD SA rekeys it loses nothing: ESP for an SPI not installed yet is held briefly,
//! outbound stays on the old SA until the new one has received, and a replaced SA takes
//! inbound for 5 s more. A UDP-encapsulated SA follows its peer's NAT mapping after an
//! authenticated packet; raw ESP for a UDP SA (and the reverse) is dropped and counted.
//!
//! What it does not do: IKE, routes (ikemgr owns the routes on the TUN devices), relaying
//! IKE on UDP 4500 over IPv6, transport mode, TFC padding, or HA role handling.
//!
//! Layout: `logic` is the control side run by the daemon shell's actor; `datapath` is the
//! IO (threads, sockets, TUN) it drives.

mod acquire;
mod datapath;
mod ha;
mod logic;

use std::process::ExitCode;

fn main() -> ExitCode {
    haven_daemon::run::<logic::Espd>()
}
