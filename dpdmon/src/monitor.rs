//! Tunnel monitors (issue 9; PAN-OS's tunnel monitor, Juniper's `vpn-monitor`), sans-IO.
//!
//! DPD proves that the IKE peer answers; a tunnel monitor proves that traffic crosses the
//! tunnel. For every static tunnel ikemgr reports `up` whose phase1 has `set tunnel-monitor
//! enable`, an ICMP echo request from `tunnel-monitor-source-ip` to
//! `tunnel-monitor-destination-ip` is sent through the tunnel's TUN device (named after the
//! phase1) every `tunnel-monitor-interval`. A probe not answered when the next one is due
//! is a miss; `tunnel-monitor-threshold` misses in a row make the monitor `down`, one answer
//! makes it `up` again (`init` until the first answer). Each change of `state` or `misses`
//! is published as `Body::TunnelMonitor` (`dpd.monitor`); ikemgr withdraws the tunnel's
//! routes while it is `down` and, with `fail-over`, flushes it like a dead DPD verdict.
//!
//! What it does not do: sockets. [`Monitors::poll_io`] hands the driver what to open, send
//! and close ([`Io`]); the driver reports answers with [`Monitors::handle_reply`] and
//! socket errors with [`Monitors::handle_error`]. Every call takes `now` in ms.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;

use bus_schema::schema::TunnelMonitorState;
use bus_schema::{table, Body, StateStore, TunnelKind, TunnelState};
use serde_json::{json, Value};

/// A phase1's monitor settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonitorCfg {
    pub destination: Ipv4Addr,
    pub source: Ipv4Addr,
    pub interval_ms: u64,
    pub threshold: u32,
    /// `wait-recover` or `fail-over` (the action in force).
    pub action: String,
}

/// What the driver does with the sockets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Io {
    /// Open the probe socket of `tunnel`: ICMP bound to `device` and `source`.
    Open {
        tunnel: String,
        device: String,
        source: Ipv4Addr,
        ident: u16,
    },
    /// Send echo request `seq` of `tunnel` to `destination`.
    Send {
        tunnel: String,
        destination: Ipv4Addr,
        ident: u16,
        seq: u16,
    },
    /// Close the socket of `tunnel`.
    Close { tunnel: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Init,
    Up,
    Down,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Init => "init",
            State::Up => "up",
            State::Down => "down",
        }
    }
}

struct Mon {
    phase1: String,
    cfg: MonitorCfg,
    /// The peer the tunnel was up with (a new peer restarts the monitor).
    remote: Option<String>,
    ident: u16,
    seq: u16,
    /// The unanswered probe: (seq, sent at).
    outstanding: Option<(u16, u64)>,
    misses: u32,
    state: State,
    next_at: u64,
    sent: u64,
    replies: u64,
    rtt_ms: Option<u64>,
    since_ms: u64,
    error: Option<String>,
}

/// Counters of all monitors (Prometheus).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorStats {
    pub probes_sent: u64,
    pub replies: u64,
    pub misses: u64,
    pub down_verdicts: u64,
    pub errors: u64,
}

/// Every tunnel monitor of this gateway.
#[derive(Default)]
pub struct Monitors {
    cfgs: BTreeMap<String, MonitorCfg>,
    mons: BTreeMap<String, Mon>,
    io: VecDeque<Io>,
    next_ident: u16,
    stats: MonitorStats,
}

impl Monitors {
    /// Applies the configured monitors (by phase1); monitors whose settings changed start
    /// afresh, those no longer configured are removed. Call [`Monitors::sync`] after.
    pub fn set_config(&mut self, cfgs: BTreeMap<String, MonitorCfg>, out: &mut Vec<Body>) {
        let stale: Vec<String> = self
            .mons
            .iter()
            .filter(|(_, m)| cfgs.get(&m.phase1) != Some(&m.cfg))
            .map(|(t, _)| t.clone())
            .collect();
        for t in stale {
            self.remove(&t, out);
        }
        self.cfgs = cfgs;
    }

    /// Follows ikemgr's tunnels: a monitored static tunnel that is `up` gets a monitor
    /// (first probe at once); one that is not up or gone loses it.
    pub fn sync(&mut self, now: u64, ike: &StateStore, out: &mut Vec<Body>) {
        let mut wanted: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
        for phase1 in self.cfgs.keys() {
            // A static tunnel is named after its phase1.
            if let Some(Body::Tunnel(t)) = ike.get(table::TUNNEL, phase1) {
                if t.state == TunnelState::Up && t.kind == TunnelKind::Static {
                    wanted.insert(t.name.clone(), (t.phase1.clone(), t.remote_gw.clone()));
                }
            }
        }
        let gone: Vec<String> = self
            .mons
            .iter()
            .filter(|(t, m)| wanted.get(*t).is_none_or(|(_, r)| *r != m.remote))
            .map(|(t, _)| t.clone())
            .collect();
        for t in gone {
            self.remove(&t, out);
        }
        for (tunnel, (phase1, remote)) in wanted {
            if self.mons.contains_key(&tunnel) {
                continue;
            }
            let Some(cfg) = self.cfgs.get(&phase1).cloned() else {
                continue;
            };
            self.next_ident = self.next_ident.wrapping_add(1);
            let ident = self.next_ident;
            self.io.push_back(Io::Open {
                tunnel: tunnel.clone(),
                device: phase1.clone(),
                source: cfg.source,
                ident,
            });
            tracing::info!(
                "dpd 0:{tunnel}: tunnel monitor started: ping {} from {} every {} ms, down after {} misses ({})",
                cfg.destination,
                cfg.source,
                cfg.interval_ms,
                cfg.threshold,
                cfg.action
            );
            let m = Mon {
                phase1,
                cfg,
                remote,
                ident,
                seq: 0,
                outstanding: None,
                misses: 0,
                state: State::Init,
                next_at: now,
                sent: 0,
                replies: 0,
                rtt_ms: None,
                since_ms: now,
                error: None,
            };
            out.push(Body::TunnelMonitor(record(&tunnel, &m)));
            self.mons.insert(tunnel, m);
        }
    }

    fn remove(&mut self, tunnel: &str, out: &mut Vec<Body>) {
        if self.mons.remove(tunnel).is_some() {
            tracing::debug!("dpd 0:{tunnel}: tunnel monitor stopped");
            self.io.push_back(Io::Close {
                tunnel: tunnel.to_string(),
            });
            out.push(Body::TunnelMonitorRemoved {
                tunnel: tunnel.to_string(),
            });
        }
    }

    /// Echo reply `seq` of `tunnel` (identifier `ident`) arrived at `at` (ms).
    pub fn handle_reply(
        &mut self,
        at: u64,
        tunnel: &str,
        ident: u16,
        seq: u16,
        out: &mut Vec<Body>,
    ) {
        let Some(m) = self.mons.get_mut(tunnel) else {
            return;
        };
        let Some((want, sent_at)) = m.outstanding else {
            return;
        };
        if ident != m.ident || seq != want {
            return;
        }
        m.outstanding = None;
        m.replies += 1;
        self.stats.replies += 1;
        m.rtt_ms = Some(at.saturating_sub(sent_at));
        m.error = None;
        if m.state != State::Up || m.misses != 0 {
            if m.state == State::Down {
                tracing::info!(
                    "dpd 0:{tunnel}: tunnel monitor: {} answers again, tunnel up",
                    m.cfg.destination
                );
            }
            if m.state != State::Up {
                m.since_ms = at;
            }
            m.state = State::Up;
            m.misses = 0;
            out.push(Body::TunnelMonitor(record(tunnel, m)));
        }
    }

    /// The driver could not open or send on the socket of `tunnel` (the probe counts as
    /// sent and will be missed).
    pub fn handle_error(&mut self, tunnel: &str, error: String) {
        if let Some(m) = self.mons.get_mut(tunnel) {
            if m.error.as_deref() != Some(error.as_str()) {
                tracing::warn!("dpd 0:{tunnel}: tunnel monitor: {error}");
            }
            m.error = Some(error);
            self.stats.errors += 1;
        }
    }

    /// Runs the monitors due at `now`: a probe still unanswered is a miss (the threshold
    /// makes the monitor `down`), then the next probe is sent.
    pub fn tick(&mut self, now: u64, out: &mut Vec<Body>) {
        for (tunnel, m) in self.mons.iter_mut().filter(|(_, m)| m.next_at <= now) {
            if m.outstanding.take().is_some() {
                m.misses = m.misses.saturating_add(1);
                self.stats.misses += 1;
                tracing::debug!(
                    "dpd 0:{tunnel}: tunnel monitor: no answer from {} ({} in a row)",
                    m.cfg.destination,
                    m.misses
                );
                if m.misses >= m.cfg.threshold && m.state != State::Down {
                    m.state = State::Down;
                    m.since_ms = now;
                    self.stats.down_verdicts += 1;
                    tracing::info!(
                        "dpd 0:{tunnel}: tunnel monitor: {} unanswered {} times, tunnel down ({})",
                        m.cfg.destination,
                        m.misses,
                        m.cfg.action
                    );
                }
                out.push(Body::TunnelMonitor(record(tunnel, m)));
            }
            m.seq = m.seq.wrapping_add(1);
            m.outstanding = Some((m.seq, now));
            m.sent += 1;
            self.stats.probes_sent += 1;
            self.io.push_back(Io::Send {
                tunnel: tunnel.clone(),
                destination: m.cfg.destination,
                ident: m.ident,
                seq: m.seq,
            });
            // Never a busy loop, whatever the interval (validated at >= 100 ms).
            m.next_at = now.saturating_add(m.cfg.interval_ms.max(1));
        }
    }

    /// The next probe time (ms), if any monitor runs.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.mons.values().map(|m| m.next_at).min()
    }

    /// Next socket action for the driver.
    pub fn poll_io(&mut self) -> Option<Io> {
        self.io.pop_front()
    }

    /// Counters for Prometheus.
    pub fn stats(&self) -> MonitorStats {
        self.stats
    }

    /// Monitors by state (Prometheus gauge).
    pub fn by_state(&self) -> [(&'static str, usize); 3] {
        let n = |s| self.mons.values().filter(|m| m.state == s).count();
        [
            ("init", n(State::Init)),
            ("up", n(State::Up)),
            ("down", n(State::Down)),
        ]
    }

    /// The `monitors` view: one object per running monitor.
    pub fn view(&self, now: u64, name: Option<&str>) -> Value {
        Value::Array(
            self.mons
                .iter()
                .filter(|(t, _)| name.is_none_or(|n| n == t.as_str()))
                .map(|(t, m)| {
                    json!({
                        "tunnel": t,
                        "phase1": m.phase1,
                        "destination": m.cfg.destination.to_string(),
                        "source": m.cfg.source.to_string(),
                        "interval_ms": m.cfg.interval_ms,
                        "threshold": m.cfg.threshold,
                        "action": m.cfg.action,
                        "state": m.state.name(),
                        "misses": m.misses,
                        "sent": m.sent,
                        "replies": m.replies,
                        "rtt_ms": m.rtt_ms,
                        "since_secs": now.saturating_sub(m.since_ms) / 1000,
                        "error": m.error,
                    })
                })
                .collect(),
        )
    }
}

fn record(tunnel: &str, m: &Mon) -> TunnelMonitorState {
    TunnelMonitorState {
        tunnel: tunnel.to_string(),
        phase1: m.phase1.clone(),
        destination: m.cfg.destination.to_string(),
        source: m.cfg.source.to_string(),
        interval_ms: m.cfg.interval_ms,
        threshold: m.cfg.threshold,
        misses: m.misses,
        state: m.state.name().to_string(),
        action: m.cfg.action.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_schema::{DpdSettings, TunnelInfo};

    fn cfg() -> BTreeMap<String, MonitorCfg> {
        BTreeMap::from([(
            "vpn1".to_string(),
            MonitorCfg {
                destination: "10.2.0.1".parse().unwrap(),
                source: "10.1.0.1".parse().unwrap(),
                interval_ms: 1000,
                threshold: 3,
                action: "wait-recover".into(),
            },
        )])
    }

    fn ike(state: TunnelState, remote: &str) -> StateStore {
        let mut s = StateStore::new();
        s.apply(&Body::Tunnel(TunnelInfo {
            name: "vpn1".into(),
            phase1: "vpn1".into(),
            kind: TunnelKind::Static,
            local_gw: None,
            remote_gw: Some(remote.into()),
            interface: None,
            state,
            phase2: vec![],
            dpd: DpdSettings {
                mode: "on-idle".into(),
                retry_count: 3,
                retry_interval_ms: 2000,
            },
        }));
        s
    }

    fn states(out: &[Body]) -> Vec<(String, u32)> {
        out.iter()
            .filter_map(|b| match b {
                Body::TunnelMonitor(m) => Some((m.state.clone(), m.misses)),
                Body::TunnelMonitorRemoved { .. } => Some(("removed".into(), 0)),
                _ => None,
            })
            .collect()
    }

    fn sends(m: &mut Monitors) -> Vec<u16> {
        let mut v = Vec::new();
        while let Some(io) = m.poll_io() {
            if let Io::Send { seq, .. } = io {
                v.push(seq);
            }
        }
        v
    }

    #[test]
    fn misses_up_to_the_threshold_declare_down_and_one_answer_brings_it_up() {
        let mut m = Monitors::default();
        let mut out = Vec::new();
        m.set_config(cfg(), &mut out);
        m.sync(0, &ike(TunnelState::Down, "192.0.2.2"), &mut out);
        assert!(
            out.is_empty() && m.poll_timeout().is_none(),
            "not up: no monitor"
        );
        m.sync(0, &ike(TunnelState::Up, "192.0.2.2"), &mut out);
        assert_eq!(states(&out), [("init".into(), 0)]);
        assert!(matches!(m.poll_io(), Some(Io::Open { device, .. }) if device == "vpn1"));
        out.clear();
        // Answered probes: up, published once.
        for t in [0, 1000, 2000] {
            m.tick(t, &mut out);
            let seq = *sends(&mut m).last().unwrap();
            m.handle_reply(t + 5, "vpn1", 1, seq, &mut out);
        }
        assert_eq!(states(&out), [("up".into(), 0)]);
        out.clear();
        // A wrong identifier or an old sequence number is not an answer.
        m.tick(3000, &mut out);
        let seq = *sends(&mut m).last().unwrap();
        m.handle_reply(3001, "vpn1", 2, seq, &mut out);
        m.handle_reply(3001, "vpn1", 1, seq.wrapping_sub(1), &mut out);
        // Misses 1, 2, 3 (the threshold): down.
        for t in [4000, 5000, 6000] {
            assert_eq!(m.poll_timeout(), Some(t));
            m.tick(t, &mut out);
        }
        assert_eq!(
            states(&out),
            [("up".into(), 1), ("up".into(), 2), ("down".into(), 3)]
        );
        assert_eq!(m.stats().down_verdicts, 1);
        out.clear();
        m.tick(7000, &mut out);
        assert_eq!(states(&out), [("down".into(), 4)], "stays down, counting");
        let seq = *sends(&mut m).last().unwrap();
        out.clear();
        m.handle_reply(7100, "vpn1", 1, seq, &mut out);
        assert_eq!(states(&out), [("up".into(), 0)]);
        assert_eq!(m.view(7100, None)[0]["rtt_ms"], 100);
        // The tunnel moves to another peer: the monitor starts afresh; down: removed.
        out.clear();
        m.sync(8000, &ike(TunnelState::Up, "192.0.2.3"), &mut out);
        assert_eq!(states(&out), [("removed".into(), 0), ("init".into(), 0)]);
        out.clear();
        m.sync(8000, &ike(TunnelState::Down, "192.0.2.3"), &mut out);
        assert_eq!(states(&out), [("removed".into(), 0)]);
        assert!(m.poll_timeout().is_none());
    }

    #[test]
    fn a_changed_configuration_restarts_the_monitor() {
        let mut m = Monitors::default();
        let mut out = Vec::new();
        m.set_config(cfg(), &mut out);
        let up = ike(TunnelState::Up, "192.0.2.2");
        m.sync(0, &up, &mut out);
        out.clear();
        m.set_config(cfg(), &mut out);
        m.sync(0, &up, &mut out);
        assert!(out.is_empty(), "same settings: kept");
        let mut c = cfg();
        c.get_mut("vpn1").unwrap().threshold = 5;
        m.set_config(c, &mut out);
        m.sync(0, &up, &mut out);
        assert_eq!(states(&out), [("removed".into(), 0), ("init".into(), 0)]);
        out.clear();
        m.set_config(BTreeMap::new(), &mut out);
        m.sync(0, &up, &mut out);
        assert_eq!(states(&out), [("removed".into(), 0)]);
    }
}
