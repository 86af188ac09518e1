//! dpdmon: Haven's dead peer detection daemon.
//!
//! What it does: runs the sans-IO liveness core `dpd-core` for every tunnel ikemgr
//! reports `up`, fed by the state it follows (ikemgr's `tunnel.state`, hasyncd's `ha.role`)
//! and by the bus events the shell delivers from the daemons it follows (espd's
//! `esp.activity`, ikemgr's `ike.activity` and `ike.probe`). It publishes one `dpd.state` record per tunnel (the
//! FortiOS `dpd:` fields and `state` `idle`/`probing`/`dead`), a `ProbeRequest` event for
//! every probe transmission (ikemgr sends the IKEv2 INFORMATIONAL), and on a verdict sets
//! the tunnel's record to `dead` (ikemgr flushes the tunnel when it sees it) and logs the
//! seed 000 story at debug level (`link is idle …`, `send IKEv2 DPD probe, seqno N`,
//! `negotiation of IKE SA failed due to retry timeout`). Views `tunnels` and `stats`;
//! command `dpd-set`/`dpd-clear` (run-time DPD settings for one tunnel, not persisted);
//! Prometheus `dpdmon_probes_sent_total`, `dpdmon_probe_replies_total`,
//! `dpdmon_probe_failures_total`, `dpdmon_dead_peers_total`, `dpdmon_detection_seconds`,
//! `dpdmon_tunnels{state}`.
//!
//! What it does not do: send probes or flush tunnels (ikemgr does), or persist anything:
//! see the README's "Restart" section for what a restart guarantees. From the
//! configuration it reads only the exponential schedule (`dpd-backoff*`); the rest of
//! each tunnel's DPD settings comes with ikemgr's `tunnel.state`.
//!
//! Timers: the daemon shell calls `tick` at the core's `poll_timeout` (the shell's timer
//! rounds up to whole ms: a transmission is at most a few ms late, never early) and every
//! second (`TICK_MS`) for the metrics.

mod glue;
mod icmp;
mod monitor;

use std::path::Path;
use std::process::ExitCode;

use bus_schema::{Body, DaemonKind, DpdSettings, StateStore};
use haven_config::{tunnel_monitor_action, Config, DpdBackoff};
use haven_daemon::{now_ns, DaemonLogic, Outbox};
use serde_json::json;

use crate::glue::{Backoff, Glue};
use crate::monitor::{MonitorCfg, Monitors};

/// How often dpdmon exports its metrics (its core runs on every tick).
const METRICS_EVERY_MS: u64 = 1000;

struct Dpdmon {
    glue: Glue,
    metrics_at_ms: u64,
    /// Tunnel monitors (`set tunnel-monitor enable`).
    monitors: Monitors,
    /// Their sockets, started with the first monitor.
    icmp: Option<icmp::IcmpIo>,
    /// The last ikemgr store seen (monitors follow its tunnels after a reload too).
    ike: StateStore,
}

fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

impl Dpdmon {
    /// Hands the monitors' socket actions to the socket thread (started on first use).
    fn run_monitor_io(&mut self) {
        while let Some(io) = self.monitors.poll_io() {
            if self.icmp.is_none() {
                match icmp::IcmpIo::start(now_ms) {
                    Ok(t) => self.icmp = Some(t),
                    Err(e) => {
                        tracing::error!("dpd: cannot start the tunnel monitor thread: {e}");
                        return;
                    }
                }
            }
            if let Some(t) = &self.icmp {
                t.send(io);
            }
        }
    }

    /// Replies and socket errors reported by the socket thread.
    fn take_monitor_events(&mut self, out: &mut Outbox) {
        let Some(t) = &self.icmp else {
            return;
        };
        for ev in t.drain() {
            match ev {
                icmp::Event::Reply {
                    tunnel,
                    ident,
                    seq,
                    at_ms,
                } => self.monitors.handle_reply(at_ms, &tunnel, ident, seq, out),
                icmp::Event::Error { tunnel, error } => self.monitors.handle_error(&tunnel, error),
            }
        }
    }

    fn export_metrics(&mut self) {
        let s = self.glue.stats();
        metrics::counter!("dpdmon_probes_sent_total").absolute(s.probes_sent);
        metrics::counter!("dpdmon_probe_replies_total").absolute(s.probe_replies);
        metrics::counter!("dpdmon_probe_failures_total").absolute(s.probe_failures);
        metrics::counter!("dpdmon_dead_peers_total").absolute(s.dead_peers);
        for (state, n) in self.glue.tunnels_by_state() {
            metrics::gauge!("dpdmon_tunnels", "state" => state).set(n as f64);
        }
        let m = self.monitors.stats();
        metrics::counter!("dpdmon_monitor_probes_sent_total").absolute(m.probes_sent);
        metrics::counter!("dpdmon_monitor_replies_total").absolute(m.replies);
        metrics::counter!("dpdmon_monitor_misses_total").absolute(m.misses);
        metrics::counter!("dpdmon_monitor_down_total").absolute(m.down_verdicts);
        metrics::counter!("dpdmon_monitor_errors_total").absolute(m.errors);
        for (state, n) in self.monitors.by_state() {
            metrics::gauge!("dpdmon_monitors", "state" => state).set(n as f64);
        }
        for d in self.glue.take_detections() {
            metrics::histogram!("dpdmon_detection_seconds")
                .record(d.detected_after_ms as f64 / 1e3);
            metrics::histogram!("dpdmon_detection_budget_ratio")
                .record(d.detected_after_ms as f64 / d.dead_after_ms.max(1) as f64);
        }
    }
}

impl DaemonLogic for Dpdmon {
    const KIND: DaemonKind = DaemonKind::Dpdmon;
    /// espd is followed for its events (`esp.activity`), ikemgr for its tunnels and events
    /// (`ike.activity`, `ike.probe`), hasyncd for the roles.
    const FOLLOWS: &'static [DaemonKind] =
        &[DaemonKind::Ikemgr, DaemonKind::Hasyncd, DaemonKind::Espd];
    /// Metrics are exported on this period; probe and verdict timers fire at their exact
    /// time through [`DaemonLogic::poll_timeout`].
    const TICK_MS: u64 = 1000;
    /// Tunnels and roles change DPD settings rarely; reading them whole takes at most a
    /// quarter of the daemon's time, the rest for probes and verdicts.
    const REPLICA_SPACING: u32 = 3;

    fn new(_config: &Config, _run_dir: &Path) -> Self {
        metrics::describe_counter!(
            "dpdmon_probes_sent_total",
            "DPD probe transmissions requested from ikemgr (retries included)."
        );
        metrics::describe_counter!(
            "dpdmon_probe_replies_total",
            "DPD probe replies reported by ikemgr."
        );
        metrics::describe_counter!(
            "dpdmon_probe_failures_total",
            "DPD probes ikemgr reported failed or timed out."
        );
        metrics::describe_counter!("dpdmon_dead_peers_total", "Peers declared dead.");
        metrics::describe_histogram!(
            "dpdmon_detection_seconds",
            metrics::Unit::Seconds,
            "Time from the start of a peer's silence to its dead verdict."
        );
        metrics::describe_histogram!(
            "dpdmon_detection_budget_ratio",
            "Detection time divided by the configured budget (dead_after_ms)."
        );
        metrics::describe_gauge!("dpdmon_tunnels", "Monitored tunnels by DPD state.");
        metrics::describe_counter!(
            "dpdmon_monitor_probes_sent_total",
            "Tunnel monitor ICMP echo requests sent through tunnels."
        );
        metrics::describe_counter!(
            "dpdmon_monitor_replies_total",
            "Tunnel monitor echo replies received through tunnels."
        );
        metrics::describe_counter!(
            "dpdmon_monitor_misses_total",
            "Tunnel monitor probes unanswered when the next one was due."
        );
        metrics::describe_counter!(
            "dpdmon_monitor_down_total",
            "Tunnels declared down by their tunnel monitor (threshold of misses reached)."
        );
        metrics::describe_counter!(
            "dpdmon_monitor_errors_total",
            "Tunnel monitor socket errors (open or send failed)."
        );
        metrics::describe_gauge!(
            "dpdmon_monitors",
            "Tunnel monitors by state (init, up, down)."
        );
        let now = now_ms();
        Dpdmon {
            // Rounds of this process start above any round the previous one can have
            // used (2^16 rounds per ms of uptime).
            glue: Glue::new(now, now << 16),
            metrics_at_ms: 0,
            monitors: Monitors::default(),
            icmp: None,
            ike: StateStore::new(),
        }
    }

    /// dpdmon's part of the configuration: the exponential schedule of each phase1
    /// (`set dpd-backoff exponential`, `dpd-backoff-initial`, `dpd-backoff-max`); mode,
    /// retry count and interval come with ikemgr's tunnels.
    fn on_config(&mut self, config: &Config, out: &mut Outbox) {
        let backoff = config
            .phase1
            .iter()
            .filter(|p| p.dpd_backoff == DpdBackoff::Exponential)
            .map(|p| {
                (
                    p.name.clone(),
                    Backoff {
                        initial_ms: u64::from(p.dpd_backoff_initial_ms),
                        max_ms: u64::from(p.dpd_backoff_max_ms),
                    },
                )
            })
            .collect();
        self.glue.set_backoff(now_ms(), backoff, out);
        let monitors = config
            .phase1
            .iter()
            .filter_map(|p| {
                let m = p.tunnel_monitor.as_ref()?;
                let action = tunnel_monitor_action(config, p)?;
                Some((
                    p.name.clone(),
                    MonitorCfg {
                        destination: m.destination,
                        source: m.source,
                        interval_ms: u64::from(m.interval_ms),
                        threshold: m.threshold,
                        action: serde_json::to_value(action)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default(),
                    },
                ))
            })
            .collect();
        self.monitors.set_config(monitors, out);
        self.monitors.sync(now_ms(), &self.ike, out);
        self.run_monitor_io();
    }

    fn on_replica(&mut self, src: DaemonKind, store: &StateStore, out: &mut Outbox) {
        self.on_replica_copy(src, store.clone(), out);
    }

    /// ikemgr's copy is kept as it is handed over (no second copy), and the one it
    /// replaces is freed on the shell's background thread.
    fn on_replica_copy(&mut self, src: DaemonKind, store: StateStore, out: &mut Outbox) {
        match src {
            DaemonKind::Ikemgr => {
                self.glue.sync_tunnels(now_ms(), &store, out);
                self.monitors.sync(now_ms(), &store, out);
                self.run_monitor_io();
                haven_daemon::drop_later(std::mem::replace(&mut self.ike, store));
            }
            DaemonKind::Hasyncd => {
                self.glue.sync_roles(now_ms(), &store, out);
                haven_daemon::drop_later(store);
            }
            _ => haven_daemon::drop_later(store),
        }
    }

    fn on_event(&mut self, _src: DaemonKind, body: &Body, out: &mut Outbox) {
        self.glue.handle_event(now_ms(), body, out);
    }

    fn view(&self, name: &str, args: &[String]) -> Result<serde_json::Value, String> {
        match name {
            "tunnels" => {
                let name = match args {
                    [] => None,
                    [k, n] if k == "name" => Some(n.as_str()),
                    _ => return Err("usage: tunnels [name N]".into()),
                };
                Ok(self.glue.view_tunnels(now_ms(), name))
            }
            "stats" => Ok(self.glue.view_stats()),
            "monitors" => {
                let name = match args {
                    [] => None,
                    [k, n] if k == "name" => Some(n.as_str()),
                    _ => return Err("usage: monitors [name N]".into()),
                };
                Ok(self.monitors.view(now_ms(), name))
            }
            other => Err(format!(
                "unknown view {other:?}: dpdmon has: tunnels, stats, monitors"
            )),
        }
    }

    fn command(
        &mut self,
        name: &str,
        args: &[String],
        out: &mut Outbox,
    ) -> Result<serde_json::Value, String> {
        let (tunnel, settings) =
            match (name, args) {
                ("dpd-set", [tunnel, mode, count, interval]) => {
                    let retry_count = count
                        .parse()
                        .map_err(|_| format!("retry count {count:?} is not a number"))?;
                    let retry_interval_ms = interval.parse().map_err(|_| {
                        format!("retry interval {interval:?} is not a number of ms")
                    })?;
                    (
                        tunnel,
                        Some(DpdSettings {
                            mode: mode.clone(),
                            retry_count,
                            retry_interval_ms,
                        }),
                    )
                }
                ("dpd-clear", [tunnel]) => (tunnel, None),
                ("dpd-set" | "dpd-clear", _) => return Err(
                    "usage: dpd-set TUNNEL MODE RETRY-COUNT RETRY-INTERVAL-MS | dpd-clear TUNNEL"
                        .into(),
                ),
                (other, _) => {
                    return Err(format!(
                        "unknown command {other:?}: dpdmon has: dpd-set, dpd-clear"
                    ))
                }
            };
        tracing::info!(tunnel = tunnel.as_str(), "DPD override {name} {args:?}");
        self.glue.set_override(now_ms(), tunnel, settings, out)?;
        Ok(json!({ "tunnel": tunnel, "override": name == "dpd-set" }))
    }

    /// The core's next timer (wall-clock ms): the shell ticks then.
    fn poll_timeout(&self) -> Option<u64> {
        match (self.glue.poll_timeout(), self.monitors.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn tick(&mut self, now_ns: u64, out: &mut Outbox) {
        let now = now_ns / 1_000_000;
        self.glue.tick(now, out);
        // Replies first: a probe answered before its deadline is not a miss.
        self.take_monitor_events(out);
        self.monitors.tick(now, out);
        self.run_monitor_io();
        if now.saturating_sub(self.metrics_at_ms) >= METRICS_EVERY_MS {
            self.metrics_at_ms = now;
            self.export_metrics();
        }
    }
}

fn main() -> ExitCode {
    haven_daemon::run::<Dpdmon>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_schema::{TunnelInfo, TunnelKind, TunnelState};

    fn logic_with_vpn1() -> (Dpdmon, Outbox) {
        let config = Config::default();
        let mut d = Dpdmon::new(&config, Path::new("/nonexistent"));
        let mut ike = StateStore::new();
        ike.apply(&Body::Tunnel(TunnelInfo {
            name: "vpn1".into(),
            phase1: "vpn1".into(),
            kind: TunnelKind::Static,
            local_gw: None,
            remote_gw: Some("172.31.0.2".into()),
            interface: None,
            state: TunnelState::Up,
            phase2: vec![],
            dpd: DpdSettings {
                mode: "disable".into(),
                retry_count: 0,
                retry_interval_ms: 0,
            },
        }));
        let mut out = Vec::new();
        d.on_replica(DaemonKind::Ikemgr, &ike, &mut out);
        (d, out)
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn commands_parse_and_apply() {
        let (mut d, out) = logic_with_vpn1();
        assert!(matches!(&out[..], [Body::Dpd(r)] if r.mode == "disable"));
        let mut out = Vec::new();
        for bad in [
            args(&["vpn1", "on-idle", "x", "3000"]),
            args(&["vpn1", "on-idle", "3", "-1"]),
            args(&["vpn1", "on-idle", "3"]),
            args(&["vpn1", "nonsense", "3", "3000"]),
        ] {
            assert!(d.command("dpd-set", &bad, &mut out).is_err(), "{bad:?}");
        }
        assert!(d.command("dpd-frobnicate", &[], &mut out).is_err());
        assert!(out.is_empty());
        let r = d
            .command(
                "dpd-set",
                &args(&["vpn1", "on-idle", "3", "3000"]),
                &mut out,
            )
            .unwrap();
        assert_eq!(r["override"], true);
        assert!(matches!(&out[..], [Body::Dpd(r)] if r.mode == "on-idle" && r.idle_ms == 3000));
        let v = d.view("tunnels", &args(&["name", "vpn1"])).unwrap();
        assert_eq!(v[0]["dead_after_ms"], 12_000);
        assert!(d.view("tunnels", &args(&["vpn1"])).is_err());
        assert!(d.view("nope", &[]).is_err());
        assert_eq!(d.view("stats", &[]).unwrap()["tunnels"], 1);
        let mut out = Vec::new();
        d.command("dpd-clear", &args(&["vpn1"]), &mut out).unwrap();
        assert!(matches!(&out[..], [Body::Dpd(r)] if r.mode == "disable"));
    }
}
