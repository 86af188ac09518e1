//! hasyncd: Haven's HA (FGCP) and FGSP sync daemon.
//!
//! Today it publishes this member's identity from `config system ha` and
//! `config system standalone-cluster` (`ha.member`) and a role per tunnel that ikemgr
//! publishes (`ha.role`): every tunnel is `sync-primary` here, because no cluster link
//! exists yet and each member owns what it carries. Heartbeats, election, the encrypted HA
//! link and SA replication are still to come.

use std::collections::BTreeMap;
use std::process::ExitCode;

use bus_schema::{Body, DaemonKind, HaMemberInfo, StateStore};
use haven_config::Config;
use haven_daemon::{diff_keyed, DaemonLogic, Outbox};
use serde_json::json;

struct Hasyncd {
    member: Option<HaMemberInfo>,
    roles: BTreeMap<String, String>,
}

fn member_of(config: &Config) -> HaMemberInfo {
    let mode = match (&config.ha, &config.standalone) {
        (Some(_), Some(_)) => "fgcp+fgsp",
        (Some(_), None) => "fgcp",
        (None, Some(_)) => "fgsp",
        (None, None) => "standalone",
    };
    HaMemberInfo {
        member_id: config
            .standalone
            .as_ref()
            .map(|s| u32::from(s.group_member_id))
            .unwrap_or(0),
        group_id: config
            .ha
            .as_ref()
            .map(|h| u32::from(h.group_id))
            .unwrap_or(0),
        mode: mode.to_string(),
        role: "primary".to_string(),
        peers: config
            .standalone
            .as_ref()
            .map(|s| {
                s.cluster_peers
                    .iter()
                    .map(|p| format!("{}:{}", p.peerip, p.port))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

impl DaemonLogic for Hasyncd {
    const KIND: DaemonKind = DaemonKind::Hasyncd;
    const FOLLOWS: &'static [DaemonKind] = &[DaemonKind::Ikemgr];

    fn new(_config: &Config) -> Self {
        Hasyncd {
            member: None,
            roles: BTreeMap::new(),
        }
    }

    fn on_config(&mut self, config: &Config, out: &mut Outbox) {
        let m = member_of(config);
        if self.member.as_ref() != Some(&m) {
            out.push(Body::HaMember(m.clone()));
            self.member = Some(m);
        }
    }

    fn on_replica(&mut self, src: DaemonKind, store: &StateStore, out: &mut Outbox) {
        if src != DaemonKind::Ikemgr {
            return;
        }
        let desired: BTreeMap<String, String> = store
            .items()
            .filter_map(|b| match b {
                Body::Tunnel(t) => Some((t.name.clone(), "sync-primary".to_string())),
                _ => None,
            })
            .collect();
        diff_keyed(
            &self.roles,
            &desired,
            |tunnel, role| Body::TunnelRole { tunnel, role },
            |tunnel| Body::TunnelRoleRemoved { tunnel },
            out,
        );
        self.roles = desired;
    }

    fn view(&self, name: &str, _args: &[String]) -> Result<serde_json::Value, String> {
        match name {
            "roles" => Ok(json!(self.roles)),
            "member" => Ok(json!(self.member)),
            other => Err(format!(
                "unknown view {other:?}: hasyncd has: roles, member"
            )),
        }
    }
}

fn main() -> ExitCode {
    haven_daemon::run::<Hasyncd>()
}
