//! dpdmon: Haven's dead peer detection daemon.
//!
//! Today it keeps one DPD record per tunnel that ikemgr publishes (mode, interval, retry
//! count, probe count and sequence), publishes them on the bus (`dpd.state`,
//! `dpd.removed`) and serves them as a snapshot. It does not yet probe: the timer wheel
//! and the probe/flush state machine are still to come.

use std::collections::BTreeMap;
use std::process::ExitCode;

use bus_schema::{Body, DaemonKind, DpdTunnelState, StateStore};
use haven_config::Config;
use haven_daemon::{diff_keyed, DaemonLogic, Outbox};
use serde_json::json;

struct Dpdmon {
    tunnels: BTreeMap<String, DpdTunnelState>,
}

impl Dpdmon {
    /// The DPD record for every tunnel in ikemgr's table, keeping the counters of
    /// records that already exist.
    fn desired(&self, ike: &StateStore) -> BTreeMap<String, DpdTunnelState> {
        ike.items()
            .filter_map(|b| match b {
                Body::Tunnel(t) => Some(t),
                _ => None,
            })
            .map(|t| {
                let prev = self.tunnels.get(&t.name);
                let st = DpdTunnelState {
                    tunnel: t.name.clone(),
                    mode: t.dpd.mode.clone(),
                    on: t.dpd.mode != "disable",
                    idle_ms: t.dpd.retry_interval_ms,
                    retry: t.dpd.retry_count,
                    count: prev.map(|p| p.count).unwrap_or(0),
                    seqno: prev.map(|p| p.seqno).unwrap_or(0),
                    state: prev
                        .map(|p| p.state.clone())
                        .unwrap_or_else(|| "idle".into()),
                };
                (t.name.clone(), st)
            })
            .collect()
    }
}

impl DaemonLogic for Dpdmon {
    const KIND: DaemonKind = DaemonKind::Dpdmon;
    const FOLLOWS: &'static [DaemonKind] = &[DaemonKind::Ikemgr];

    fn new(_config: &Config) -> Self {
        Dpdmon {
            tunnels: BTreeMap::new(),
        }
    }

    fn on_config(&mut self, _config: &Config, _out: &mut Outbox) {}

    fn on_replica(&mut self, src: DaemonKind, store: &StateStore, out: &mut Outbox) {
        if src != DaemonKind::Ikemgr {
            return;
        }
        let desired = self.desired(store);
        diff_keyed(
            &self.tunnels,
            &desired,
            |_, d| Body::Dpd(d),
            |tunnel| Body::DpdRemoved { tunnel },
            out,
        );
        self.tunnels = desired;
    }

    fn view(&self, name: &str, _args: &[String]) -> Result<serde_json::Value, String> {
        match name {
            "tunnels" => Ok(json!(self.tunnels.values().collect::<Vec<_>>())),
            other => Err(format!("unknown view {other:?}: dpdmon has: tunnels")),
        }
    }
}

fn main() -> ExitCode {
    haven_daemon::run::<Dpdmon>()
}
