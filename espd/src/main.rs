//! espd: Haven's ESP datapath daemon.
//!
//! Today it keeps one datapath record per tunnel that ikemgr publishes (its TUN device
//! name, SA counts and counters), publishes them on the bus (`esp.tunnel`,
//! `esp.tunnel.removed`) and serves them as a snapshot. It does not yet move packets: the
//! sans-IO ESP transforms live in `esp-proto` and are not wired to TUN or sockets here yet.

use std::collections::BTreeMap;
use std::process::ExitCode;

use bus_schema::{Body, DaemonKind, EspTunnelInfo, StateStore};
use haven_config::Config;
use haven_daemon::{diff_keyed, DaemonLogic, Outbox};
use serde_json::json;

struct Espd {
    tunnels: BTreeMap<String, EspTunnelInfo>,
}

impl DaemonLogic for Espd {
    const KIND: DaemonKind = DaemonKind::Espd;
    const FOLLOWS: &'static [DaemonKind] = &[DaemonKind::Ikemgr];

    fn new(_config: &Config) -> Self {
        Espd {
            tunnels: BTreeMap::new(),
        }
    }

    fn on_config(&mut self, _config: &Config, _out: &mut Outbox) {}

    fn on_replica(&mut self, src: DaemonKind, store: &StateStore, out: &mut Outbox) {
        if src != DaemonKind::Ikemgr {
            return;
        }
        let desired: BTreeMap<String, EspTunnelInfo> = store
            .items()
            .filter_map(|b| match b {
                Body::Tunnel(t) => Some(t),
                _ => None,
            })
            .map(|t| {
                let info = self.tunnels.get(&t.name).cloned().unwrap_or(EspTunnelInfo {
                    tunnel: t.name.clone(),
                    device: t.phase1.clone(),
                    sa_in: 0,
                    sa_out: 0,
                    rx_pkts: 0,
                    tx_pkts: 0,
                    rx_bytes: 0,
                    tx_bytes: 0,
                });
                (t.name.clone(), info)
            })
            .collect();
        diff_keyed(
            &self.tunnels,
            &desired,
            |_, e| Body::EspTunnel(e),
            |tunnel| Body::EspTunnelRemoved { tunnel },
            out,
        );
        self.tunnels = desired;
    }

    fn view(&self, name: &str, _args: &[String]) -> Result<serde_json::Value, String> {
        match name {
            "tunnels" => Ok(json!(self.tunnels.values().collect::<Vec<_>>())),
            other => Err(format!("unknown view {other:?}: espd has: tunnels")),
        }
    }
}

fn main() -> ExitCode {
    haven_daemon::run::<Espd>()
}
