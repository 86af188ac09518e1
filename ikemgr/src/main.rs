//! ikemgr: Haven's IKEv2 key management daemon.
//!
//! Today it owns the gateway's tunnel table: one tunnel per configured phase1-interface,
//! published on the bus (`tunnel.state`, `tunnel.removed`) and served as a snapshot, and it
//! follows hasyncd's per-tunnel roles. It does not yet speak IKE on the wire: the sans-IO
//! IKEv2 core lives in `ike-proto` and is not wired to sockets here yet.

use std::collections::BTreeMap;
use std::process::ExitCode;

use bus_schema::{Body, DaemonKind, DpdSettings, StateStore, TunnelInfo, TunnelKind, TunnelState};
use haven_config::{Config, Phase1, Phase1Type};
use haven_daemon::{diff_keyed, DaemonLogic, Outbox};
use serde_json::json;

/// A config enum's FortiOS spelling (its serde name).
fn spelling<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn tunnel_of(config: &Config, p: &Phase1) -> TunnelInfo {
    TunnelInfo {
        name: p.name.clone(),
        phase1: p.name.clone(),
        kind: match p.kind {
            Phase1Type::Static | Phase1Type::Ddns => TunnelKind::Static,
            Phase1Type::Dynamic => TunnelKind::Dynamic,
        },
        local_gw: p.local_gw.map(|a| a.to_string()),
        remote_gw: p.remote_gw.first().map(|a| a.to_string()),
        interface: Some(p.interface.clone()).filter(|s| !s.is_empty()),
        state: TunnelState::Down,
        phase2: config
            .phase2_for(&p.name)
            .map(|p2| p2.name.clone())
            .collect(),
        dpd: DpdSettings {
            mode: spelling(&p.dpd),
            retry_count: u32::from(p.dpd_retrycount),
            retry_interval_ms: u64::from(p.dpd_retryinterval_ms),
        },
    }
}

struct Ikemgr {
    tunnels: BTreeMap<String, TunnelInfo>,
    roles: BTreeMap<String, String>,
}

impl DaemonLogic for Ikemgr {
    const KIND: DaemonKind = DaemonKind::Ikemgr;
    const FOLLOWS: &'static [DaemonKind] = &[DaemonKind::Hasyncd];

    fn new(_config: &Config) -> Self {
        Ikemgr {
            tunnels: BTreeMap::new(),
            roles: BTreeMap::new(),
        }
    }

    fn on_config(&mut self, config: &Config, out: &mut Outbox) {
        let desired: BTreeMap<String, TunnelInfo> = config
            .phase1
            .iter()
            .map(|p| (p.name.clone(), tunnel_of(config, p)))
            .collect();
        diff_keyed(
            &self.tunnels,
            &desired,
            |_, t| Body::Tunnel(t),
            |name| Body::TunnelRemoved { name },
            out,
        );
        for t in desired.keys().filter(|k| !self.tunnels.contains_key(*k)) {
            tracing::info!(tunnel = t.as_str(), "tunnel configured");
        }
        self.tunnels = desired;
    }

    fn on_replica(&mut self, src: DaemonKind, store: &StateStore, _out: &mut Outbox) {
        if src == DaemonKind::Hasyncd {
            self.roles = store
                .items()
                .filter_map(|b| match b {
                    Body::TunnelRole { tunnel, role } => Some((tunnel.clone(), role.clone())),
                    _ => None,
                })
                .collect();
        }
    }

    fn view(&self, name: &str, _args: &[String]) -> Result<serde_json::Value, String> {
        match name {
            "tunnels" => Ok(json!(self
                .tunnels
                .values()
                .map(|t| json!({"tunnel": t, "role": self.roles.get(&t.name)}))
                .collect::<Vec<_>>())),
            other => Err(format!("unknown view {other:?}: ikemgr has: tunnels")),
        }
    }
}

fn main() -> ExitCode {
    haven_daemon::run::<Ikemgr>()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = r#"
config vpn ipsec phase1-interface
    edit "vpn1"
        set ike-version 2
        set type dynamic
        set interface "port2"
        set dpd on-idle
        set dpd-retryinterval 60
        set psksecret "x"
    next
    edit "hub"
        set ike-version 2
        set type static
        set remote-gw 192.0.2.1
        set interface "port1"
        set psksecret "y"
    next
end
config vpn ipsec phase2-interface
    edit "vpn1"
        set phase1name "vpn1"
    next
end
"#;

    #[test]
    fn publishes_one_tunnel_per_phase1_and_removes_deleted_ones() {
        let cfg = haven_config::parse(CONF).unwrap().config;
        let mut ike = Ikemgr::new(&cfg);
        let mut out = Vec::new();
        ike.on_config(&cfg, &mut out);
        assert_eq!(out.len(), 2);
        let vpn1 = &ike.tunnels["vpn1"];
        assert_eq!(vpn1.kind, TunnelKind::Dynamic);
        assert_eq!(vpn1.phase2, vec!["vpn1".to_string()]);
        assert_eq!(vpn1.dpd.mode, "on-idle");
        assert_eq!(vpn1.dpd.retry_interval_ms, 60_000);
        assert_eq!(ike.tunnels["hub"].remote_gw.as_deref(), Some("192.0.2.1"));

        // Same config again: nothing to publish.
        let mut out = Vec::new();
        ike.on_config(&cfg, &mut out);
        assert!(out.is_empty());

        // Drop "hub": exactly one removal.
        let cfg2 = haven_config::parse(&CONF.replace("edit \"hub\"", "edit \"hub2\""))
            .unwrap()
            .config;
        let mut out = Vec::new();
        ike.on_config(&cfg2, &mut out);
        assert!(out
            .iter()
            .any(|b| matches!(b, Body::TunnelRemoved { name } if name == "hub")));
        assert!(out
            .iter()
            .any(|b| matches!(b, Body::Tunnel(t) if t.name == "hub2")));
    }
}
