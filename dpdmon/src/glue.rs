//! The driver of `dpd-core` inside dpdmon: maps bus state and events onto the core's
//! `handle_*` inputs and the core's outputs onto bus bodies, debug lines and counters.
//!
//! Sans-IO like the core: every input carries `now` (ms on the wall clock, the clock of
//! espd's and ikemgr's activity timestamps), every output is a [`Body`] pushed to the
//! caller's outbox. The daemon shell (`main.rs`) calls [`Glue::tick`] once a second, so
//! timers fire on the first tick at or after their deadline.
//!
//! Inputs and their mapping:
//!
//! | bus | core |
//! |---|---|
//! | ikemgr `tunnel.state` with state `up` (+ `dpd-set` override) | `handle_tunnel_upsert` |
//! | ikemgr tunnel removed or not `up` | `handle_tunnel_removed` |
//! | hasyncd `ha.role` (`standby` = Standby, anything else = Owner; none = Owner) | role in the settings |
//! | espd `esp.activity` | `handle_datapath_activity` |
//! | ikemgr `ike.activity` | `handle_ike_activity_at` |
//! | ikemgr `ike.probe` `sent` / `reply` / `failed` / `timeout` / `queued` | `handle_probe_sent` / `handle_probe_reply` / `handle_probe_failed` / counted only / logged only |
//!
//! Outputs: `Event::SendProbe` becomes a `ProbeRequest` (event), `Event::PeerDead` the
//! `dpd.state` record with state `dead` plus the seed 000 debug story, view changes become
//! `dpd.state` / `dpd.removed` records (published only when a bus field changed).

use std::collections::{BTreeMap, HashMap};

use bus_schema::{table, Body, DpdSettings, DpdTunnelState, StateStore, TunnelInfo, TunnelState};
use dpd_core::{
    dead_after_ms, Activity, Dpd, DpdView, Event, Mode, Phase, Role, Schedule, Settings, ViewChange,
};
use serde_json::{json, Value};

/// Counters the daemon exports (`dpdmon_*` in Prometheus).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlueStats {
    /// `ProbeRequest`s published (every transmission, retries included).
    pub probes_sent: u64,
    /// `ProbeResult` with outcome `reply`.
    pub probe_replies: u64,
    /// `ProbeResult` with outcome `failed` or `timeout`.
    pub probe_failures: u64,
    /// Verdicts (`PeerDead`).
    pub dead_peers: u64,
    /// Tunnels whose DPD settings the core refused (they are not monitored).
    pub invalid_settings: u64,
}

/// One verdict, for the detection-time histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detection {
    /// From the start of silence to the verdict (see `dpd_core::dead_after_ms`).
    pub detected_after_ms: u64,
    /// The configured budget.
    pub dead_after_ms: u64,
}

/// What dpdmon knows of one monitored tunnel besides the core's state.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Meta {
    local_gw: String,
    remote_gw: String,
    settings: Settings,
    /// Whether the settings come from a `dpd-set` override.
    overridden: bool,
}

/// The dpdmon driver of one `Dpd<String>` engine.
pub struct Glue {
    dpd: Dpd<String>,
    meta: BTreeMap<String, Meta>,
    /// hasyncd roles by tunnel (absent: owned locally).
    roles: BTreeMap<String, Role>,
    /// Run-time DPD settings by tunnel (`dpd-set`), not persisted.
    overrides: BTreeMap<String, DpdSettings>,
    /// ikemgr's tunnel records as last seen (only changed ones are re-evaluated).
    tunnels: BTreeMap<String, TunnelInfo>,
    /// Phase1s with the exponential schedule (`set dpd-backoff exponential`), from
    /// dpdmon's own reading of the configuration.
    backoff: BTreeMap<String, Backoff>,
    /// Latest core view per tunnel.
    views: BTreeMap<String, DpdView>,
    /// What is on the bus (`dpd.state`).
    published: BTreeMap<String, DpdTunnelState>,
    /// The record of every tunnel ikemgr publishes as if it were not monitored (state
    /// `idle`, counters 0): what a tunnel that is not `up` shows, as FortiOS shows the
    /// `dpd:` line of a down tunnel.
    configured: BTreeMap<String, DpdTunnelState>,
    /// Probe round of each tunnel's current round (`ProbeRequest.round`).
    rounds: HashMap<String, u64>,
    next_round: u64,
    stats: GlueStats,
    detections: Vec<Detection>,
}

/// The bus `state` of a phase: `idle` (watching or not probing), `probing`, `dead`.
pub fn state_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::Inactive | Phase::Watching => "idle",
        Phase::Probing { .. } => "probing",
        Phase::Dead { .. } => "dead",
    }
}

/// The exponential (PAN-OS) schedule of a phase1 (`set dpd-backoff exponential`):
/// first and longest wait in ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
}

/// Core settings of a bus `DpdSettings` with the role: the FortiOS fixed schedule, or,
/// with `backoff`, the exponential one (`dpd-retryinterval` is then the idle interval and
/// `dpd-retrycount` the number of transmissions, 0 read as 1). `None` for a mode the core
/// does not know.
pub fn settings_of(d: &DpdSettings, role: Role, backoff: Option<Backoff>) -> Option<Settings> {
    let mode = Mode::from_name(&d.mode)?;
    let mut s = Settings::fortios(mode, d.retry_count, d.retry_interval_ms);
    if let Some(b) = backoff {
        s.schedule = Schedule::Exponential {
            idle_ms: d.retry_interval_ms,
            initial_ms: b.initial_ms,
            max_ms: b.max_ms,
            tries: d.retry_count.max(1),
        };
    }
    s.role = role;
    Some(s)
}

/// The bus spelling of a schedule: `fixed` or `exponential initial=1000ms max=64000ms`.
pub fn schedule_name(s: &Schedule) -> String {
    match *s {
        Schedule::Fixed { .. } => "fixed".into(),
        Schedule::Exponential {
            initial_ms, max_ms, ..
        } => format!("exponential initial={initial_ms}ms max={max_ms}ms"),
    }
}

/// hasyncd's role spelling: `standby` is a standby copy; `sync-primary` (and anything
/// else) owns the tunnel.
pub fn role_of(s: &str) -> Role {
    if s == "standby" {
        Role::Standby
    } else {
        Role::Owner
    }
}

impl Glue {
    /// An empty driver; `now_ms` is the start of its clock. `round_base` seeds the probe
    /// round numbers (the daemon uses its start time in ms shifted left by 16, so rounds of
    /// a restarted dpdmon do not repeat those of the previous process).
    pub fn new(now_ms: u64, round_base: u64) -> Glue {
        Glue {
            dpd: Dpd::new(now_ms),
            meta: BTreeMap::new(),
            roles: BTreeMap::new(),
            overrides: BTreeMap::new(),
            backoff: BTreeMap::new(),
            tunnels: BTreeMap::new(),
            views: BTreeMap::new(),
            published: BTreeMap::new(),
            configured: BTreeMap::new(),
            rounds: HashMap::new(),
            next_round: round_base,
            stats: GlueStats::default(),
            detections: Vec::new(),
        }
    }

    pub fn stats(&self) -> GlueStats {
        self.stats
    }

    /// The core's own counters.
    pub fn core_stats(&self) -> dpd_core::Stats {
        self.dpd.stats()
    }

    /// Verdicts since the last call (for the histogram).
    pub fn take_detections(&mut self) -> Vec<Detection> {
        std::mem::take(&mut self.detections)
    }

    /// Tunnels per bus state (`idle`, `probing`, `dead`).
    pub fn tunnels_by_state(&self) -> BTreeMap<&'static str, u64> {
        let mut m: BTreeMap<&'static str, u64> = [("idle", 0), ("probing", 0), ("dead", 0)].into();
        for v in self.views.values() {
            *m.entry(state_name(&v.phase)).or_default() += 1;
        }
        m
    }

    /// The records dpdmon publishes (`dpd.state`).
    #[cfg(test)]
    pub fn published(&self) -> &BTreeMap<String, DpdTunnelState> {
        &self.published
    }

    // ----- inputs -----

    /// ikemgr's tunnel table changed: tunnels that are `up` are monitored with their
    /// settings (or the `dpd-set` override); the others are dropped from the core.
    ///
    /// Incremental: only tunnels whose record differs from the last one seen (or that
    /// disappeared) are re-evaluated; unchanged ones cost a lookup and a comparison.
    pub fn sync_tunnels(&mut self, now_ms: u64, ike: &StateStore, out: &mut Vec<Body>) {
        let mut touched = Vec::new();
        let mut present = 0usize;
        for b in ike.table(table::TUNNEL) {
            let Body::Tunnel(t) = b else { continue };
            present += 1;
            if self.tunnels.get(&t.name) != Some(t) {
                self.tunnels.insert(t.name.clone(), t.clone());
                touched.push(t.name.clone());
            }
        }
        if self.tunnels.len() > present {
            let gone: Vec<String> = self
                .tunnels
                .keys()
                .filter(|k| !matches!(ike.get(table::TUNNEL, k), Some(Body::Tunnel(_))))
                .cloned()
                .collect();
            for k in gone {
                self.tunnels.remove(&k);
                touched.push(k);
            }
        }
        self.update_tunnels(now_ms, touched, out);
    }

    /// Re-evaluates every tunnel of ikemgr's last table (settings changed: an override
    /// or the configuration's schedules).
    fn resync_all(&mut self, now_ms: u64, out: &mut Vec<Body>) {
        let all: Vec<String> = self
            .tunnels
            .keys()
            .chain(self.meta.keys())
            .cloned()
            .collect::<std::collections::BTreeSet<String>>()
            .into_iter()
            .collect();
        self.update_tunnels(now_ms, all, out);
    }

    /// Applies ikemgr's current record (or its absence) of each tunnel in `names`.
    fn update_tunnels(&mut self, now_ms: u64, names: Vec<String>, out: &mut Vec<Body>) {
        for k in &names {
            let desired = match self.tunnels.get(k) {
                Some(t) => {
                    let (dpd, overridden, backoff) = match self.overrides.get(k) {
                        Some(o) => (o, true, None),
                        None => (&t.dpd, false, self.backoff.get(&t.phase1).copied()),
                    };
                    self.configured.insert(
                        k.clone(),
                        configured_record(k, dpd, settings_of(dpd, Role::Owner, backoff)),
                    );
                    let role = self.roles.get(k).copied().unwrap_or(Role::Owner);
                    match (t.state == TunnelState::Up, settings_of(dpd, role, backoff)) {
                        (false, _) => None,
                        (true, None) => {
                            tracing::warn!(
                                tunnel = k.as_str(),
                                "unknown DPD mode {:?}: not monitored",
                                dpd.mode
                            );
                            None
                        }
                        (true, Some(settings)) => Some(Meta {
                            local_gw: t.local_gw.clone().unwrap_or_else(|| "0.0.0.0".into()),
                            remote_gw: t.remote_gw.clone().unwrap_or_else(|| "0.0.0.0".into()),
                            settings,
                            overridden,
                        }),
                    }
                }
                None => {
                    self.configured.remove(k);
                    None
                }
            };
            self.apply_one(now_ms, k, desired);
        }
        self.drain(out);
        // Tunnels ikemgr has but dpdmon does not monitor, and tunnels ikemgr dropped.
        for k in names {
            if self.views.contains_key(&k) {
                continue;
            }
            match self.configured.get(&k) {
                Some(rec) => {
                    if self.published.get(&k) != Some(rec) {
                        self.published.insert(k, rec.clone());
                        out.push(Body::Dpd(rec.clone()));
                    }
                }
                None => {
                    if self.published.remove(&k).is_some() {
                        out.push(Body::DpdRemoved { tunnel: k });
                    }
                }
            }
        }
    }

    /// Monitors one tunnel with `desired` (a change re-applies it to the core), or stops
    /// monitoring it (`None`). Settings the core refuses are counted and not monitored.
    fn apply_one(&mut self, now_ms: u64, k: &str, desired: Option<Meta>) {
        let Some(m) = desired else {
            if self.meta.remove(k).is_some() {
                self.dpd.handle_tunnel_removed(now_ms, &k.to_string());
                self.rounds.remove(k);
            }
            return;
        };
        if self.meta.get(k) == Some(&m) {
            return;
        }
        match self
            .dpd
            .handle_tunnel_upsert(now_ms, k.to_string(), m.settings)
        {
            Ok(()) => {
                self.meta.insert(k.to_string(), m);
            }
            Err(e) => {
                tracing::warn!(tunnel = k, "DPD not monitored: {e}");
                self.stats.invalid_settings += 1;
                if self.meta.remove(k).is_some() {
                    self.dpd.handle_tunnel_removed(now_ms, &k.to_string());
                    self.rounds.remove(k);
                }
            }
        }
    }

    /// The configuration's exponential schedules changed (phase1 name -> backoff):
    /// re-applies ikemgr's table with them.
    pub fn set_backoff(
        &mut self,
        now_ms: u64,
        backoff: BTreeMap<String, Backoff>,
        out: &mut Vec<Body>,
    ) {
        if backoff != self.backoff {
            self.backoff = backoff;
            self.resync_all(now_ms, out);
        }
    }

    /// hasyncd's role table changed.
    pub fn sync_roles(&mut self, now_ms: u64, ha: &StateStore, out: &mut Vec<Body>) {
        self.roles = ha
            .items()
            .filter_map(|b| match b {
                Body::TunnelRole { tunnel, role } => Some((tunnel.clone(), role_of(role))),
                _ => None,
            })
            .collect();
        let desired: BTreeMap<String, Meta> = self
            .meta
            .iter()
            .map(|(k, m)| {
                let mut m = m.clone();
                m.settings.role = self.roles.get(k).copied().unwrap_or(Role::Owner);
                (k.clone(), m)
            })
            .collect();
        self.apply(now_ms, desired, out);
    }

    fn apply(&mut self, now_ms: u64, mut desired: BTreeMap<String, Meta>, out: &mut Vec<Body>) {
        let gone: Vec<String> = self
            .meta
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.dpd.handle_tunnel_removed(now_ms, &k);
            self.meta.remove(&k);
            self.rounds.remove(&k);
        }
        let mut refused = Vec::new();
        for (k, m) in &desired {
            if self.meta.get(k) == Some(m) {
                continue;
            }
            if let Err(e) = self.dpd.handle_tunnel_upsert(now_ms, k.clone(), m.settings) {
                tracing::warn!(tunnel = k.as_str(), "DPD not monitored: {e}");
                self.stats.invalid_settings += 1;
                if self.meta.contains_key(k) {
                    self.dpd.handle_tunnel_removed(now_ms, k);
                }
                refused.push(k.clone());
            }
        }
        for k in refused {
            desired.remove(&k);
        }
        self.meta = desired;
        self.drain(out);
    }

    /// Sets (`Some`) or clears (`None`) the run-time DPD settings of a tunnel and
    /// re-applies ikemgr's record of it.
    pub fn set_override(
        &mut self,
        now_ms: u64,
        tunnel: &str,
        settings: Option<DpdSettings>,
        out: &mut Vec<Body>,
    ) -> Result<(), String> {
        match settings {
            Some(s) => {
                let core = settings_of(&s, Role::Owner, None)
                    .ok_or_else(|| format!("unknown DPD mode {:?}", s.mode))?;
                core.validate().map_err(|e| e.to_string())?;
                self.overrides.insert(tunnel.to_string(), s);
            }
            None => {
                self.overrides.remove(tunnel);
            }
        }
        self.update_tunnels(now_ms, vec![tunnel.to_string()], out);
        Ok(())
    }

    /// A bus event from espd or ikemgr (other bodies are ignored).
    pub fn handle_event(&mut self, now_ms: u64, body: &Body, out: &mut Vec<Body>) {
        match body {
            Body::EspActivity { tunnels } => {
                for a in tunnels {
                    self.revive_if_alive(now_ms, &a.tunnel, a.last_rx_ns / 1_000_000);
                }
                self.dpd.handle_datapath_activity(
                    now_ms,
                    tunnels.iter().map(|a| Activity {
                        tunnel: &a.tunnel,
                        last_rx_ns: a.last_rx_ns,
                        last_tx_ns: a.last_tx_ns,
                    }),
                );
            }
            Body::IkeActivity { tunnels } => {
                for m in tunnels {
                    self.dpd
                        .handle_ike_activity_at(now_ms, &m.tunnel, m.last_rx_ns / 1_000_000);
                }
            }
            Body::ProbeResult {
                tunnel,
                round,
                msg_id,
                outcome,
            } => {
                let current = self.rounds.get(tunnel) == Some(round);
                match outcome.as_str() {
                    "sent" if current => self.dpd.handle_probe_sent(now_ms, tunnel, *msg_id),
                    "sent" => {}
                    // Another IKE exchange holds the window; ikemgr sends it after that one.
                    "queued" => tracing::debug!(
                        tunnel = tunnel.as_str(),
                        "DPD probe queued by ikemgr behind another exchange"
                    ),
                    "reply" => {
                        self.stats.probe_replies += 1;
                        tracing::debug!(
                            tunnel = tunnel.as_str(),
                            "DPD probe reply, seqno {msg_id}"
                        );
                        self.dpd.handle_probe_reply(now_ms, tunnel, *msg_id);
                    }
                    "failed" | "timeout" => {
                        self.stats.probe_failures += 1;
                        tracing::debug!(
                            tunnel = tunnel.as_str(),
                            "DPD probe {outcome}, round {round}"
                        );
                        if outcome == "failed" {
                            self.dpd.handle_probe_failed(now_ms, tunnel);
                        }
                    }
                    other => {
                        tracing::debug!(tunnel = tunnel.as_str(), "unknown probe outcome {other:?}")
                    }
                }
            }
            _ => return,
        }
        self.drain(out);
    }

    /// When the core's next timer is due (ms on the clock of `tick`), if any.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.dpd.poll_timeout()
    }

    /// Runs the timers due at `now_ms` and publishes what follows.
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<Body>) {
        if self.dpd.poll_timeout().is_some_and(|t| t <= now_ms) {
            self.dpd.handle_timeout(now_ms);
        }
        self.drain(out);
    }

    // ----- outputs -----

    fn drain(&mut self, out: &mut Vec<Body>) {
        while let Some(ev) = self.dpd.poll_event() {
            match ev {
                Event::SendProbe {
                    tunnel,
                    seqno,
                    attempt,
                } => self.send_probe(tunnel, seqno, attempt, out),
                Event::PeerDead {
                    tunnel,
                    detected_after_ms,
                    dead_after_ms,
                    probes_sent,
                } => {
                    self.stats.dead_peers += 1;
                    self.detections.push(Detection {
                        detected_after_ms,
                        dead_after_ms,
                    });
                    let seqno = self.views.get(&tunnel).map(|v| v.seqno).unwrap_or(0);
                    tracing::debug!(
                        tunnel = tunnel.as_str(),
                        "{seqno}: negotiation of IKE SA failed due to retry timeout"
                    );
                    tracing::info!(
                        tunnel = tunnel.as_str(),
                        "peer is dead after {probes_sent} DPD probes: silent {detected_after_ms} ms (budget {dead_after_ms} ms)"
                    );
                    self.rounds.remove(&tunnel);
                }
            }
        }
        // Removals come first; a tunnel removed and re-added in one drain (revived) is
        // only updated on the bus.
        let mut changes = Vec::new();
        while let Some(ch) = self.dpd.poll_view_change() {
            changes.push(ch);
        }
        let updated: std::collections::HashSet<String> = changes
            .iter()
            .filter_map(|c| match c {
                ViewChange::Updated(k, _) => Some(k.clone()),
                ViewChange::Removed(_) => None,
            })
            .collect();
        for ch in changes {
            match ch {
                ViewChange::Removed(k) if updated.contains(&k) => {}
                ViewChange::Updated(k, v) => {
                    let rec = record_of(&k, &v, self.meta.get(&k).map(|m| &m.settings.schedule));
                    self.views.insert(k.clone(), v);
                    if self.published.get(&k) != Some(&rec) {
                        self.published.insert(k, rec.clone());
                        out.push(Body::Dpd(rec));
                    }
                }
                ViewChange::Removed(k) => {
                    self.views.remove(&k);
                    match self.configured.get(&k) {
                        // Still configured (down, or not monitored): its configured record.
                        Some(rec) => {
                            if self.published.get(&k) != Some(rec) {
                                self.published.insert(k, rec.clone());
                                out.push(Body::Dpd(rec.clone()));
                            }
                        }
                        None => {
                            if self.published.remove(&k).is_some() {
                                out.push(Body::DpdRemoved { tunnel: k });
                            }
                        }
                    }
                }
            }
        }
    }

    /// A dead tunnel that ikemgr has not taken down (a manual-key tunnel is never flushed)
    /// receives ESP sent after the verdict: the peer is back, so the tunnel is monitored
    /// afresh (record back to `idle`). Packets from before the verdict change nothing.
    fn revive_if_alive(&mut self, now_ms: u64, tunnel: &str, rx_ms: u64) {
        let Some(Phase::Dead { at_ms }) = self.views.get(tunnel).map(|v| v.phase) else {
            return;
        };
        if rx_ms <= at_ms {
            return;
        }
        let Some(settings) = self.meta.get(tunnel).map(|m| m.settings) else {
            return;
        };
        tracing::info!(
            tunnel,
            "ESP from the peer after its dead verdict: monitoring again"
        );
        self.dpd.handle_tunnel_removed(now_ms, &tunnel.to_string());
        self.rounds.remove(tunnel);
        // The settings were accepted when the tunnel was added.
        let _ = self
            .dpd
            .handle_tunnel_upsert(now_ms, tunnel.to_string(), settings);
    }

    fn send_probe(
        &mut self,
        tunnel: String,
        seqno: Option<u32>,
        attempt: u32,
        out: &mut Vec<Body>,
    ) {
        let round = if attempt <= 1 || !self.rounds.contains_key(&tunnel) {
            self.next_round = self.next_round.wrapping_add(1);
            self.rounds.insert(tunnel.clone(), self.next_round);
            self.next_round
        } else {
            self.rounds.get(&tunnel).copied().unwrap_or(self.next_round)
        };
        self.stats.probes_sent += 1;
        if let Some(m) = self.meta.get(&tunnel) {
            let last = self.views.get(&tunnel).map(|v| v.seqno).unwrap_or(0);
            tracing::debug!(
                tunnel = tunnel.as_str(),
                "link is idle {}->{}:0 dpd=1 seqno={last} rr=0",
                m.local_gw,
                m.remote_gw
            );
        }
        match seqno {
            Some(n) => tracing::debug!(
                tunnel = tunnel.as_str(),
                "send IKEv2 DPD probe, seqno {n} (retry {attempt}, round {round})"
            ),
            None => tracing::debug!(
                tunnel = tunnel.as_str(),
                "send IKEv2 DPD probe, seqno from ikemgr (attempt {attempt}, round {round})"
            ),
        }
        out.push(Body::ProbeRequest {
            tunnel,
            round,
            attempt,
        });
    }

    // ----- views -----

    /// The `tunnels` view: every monitored tunnel (or `name N`) with its `dpd:` line and
    /// the time until a silent peer is declared dead.
    pub fn view_tunnels(&self, now_ms: u64, name: Option<&str>) -> Value {
        let rows: Vec<Value> = self
            .views
            .iter()
            .filter(|(k, _)| name.is_none_or(|n| n == k.as_str()))
            .map(|(k, v)| {
                // The cached view changes only with the bus fields; the core's is current
                // (silence, probes and replies included).
                let fresh = self.dpd.view(k);
                let v = fresh.as_ref().unwrap_or(v);
                let meta = self.meta.get(k);
                json!({
                    "name": k,
                    "dpd": v.to_string(),
                    "mode": v.mode.as_str(),
                    "on": v.on,
                    "role": match v.role { Role::Owner => "owner", Role::Standby => "standby" },
                    "state": state_name(&v.phase),
                    "phase": v.phase,
                    "idle_ms": v.idle_ms,
                    "retry": v.retry,
                    "count": v.count,
                    "seqno": v.seqno,
                    "dead_after_ms": v.dead_after_ms,
                    "schedule": meta.map(|m| schedule_name(&m.settings.schedule)),
                    "silent_ms": now_ms.saturating_sub(v.last_life_ms),
                    "probes_sent": v.probes_sent,
                    "replies": v.replies,
                    "override": meta.is_some_and(|m| m.overridden),
                    "local_gw": meta.map(|m| m.local_gw.as_str()),
                    "remote_gw": meta.map(|m| m.remote_gw.as_str()),
                })
            })
            .collect();
        json!(rows)
    }

    /// The `stats` view: dpdmon's and the core's counters.
    pub fn view_stats(&self) -> Value {
        let s = self.stats;
        let c = self.core_stats();
        json!({
            "tunnels": c.tunnels,
            "by_state": self.tunnels_by_state(),
            "probes_sent": s.probes_sent,
            "probe_replies": s.probe_replies,
            "probe_failures": s.probe_failures,
            "dead_peers": s.dead_peers,
            "invalid_settings": s.invalid_settings,
            "core": c,
            "overrides": self.overrides.keys().collect::<Vec<_>>(),
        })
    }
}

/// The record of a tunnel dpdmon does not monitor: its settings as configured, `idle`,
/// with the budget and schedule of `settings` (the core's reading of them, if valid).
pub fn configured_record(
    tunnel: &str,
    d: &DpdSettings,
    settings: Option<Settings>,
) -> DpdTunnelState {
    let settings = settings.filter(|s| s.validate().is_ok());
    DpdTunnelState {
        tunnel: tunnel.to_string(),
        mode: d.mode.clone(),
        on: d.mode != "disable",
        idle_ms: d.retry_interval_ms,
        retry: d.retry_count,
        count: 0,
        seqno: 0,
        state: "idle".into(),
        dead_after_ms: settings.as_ref().and_then(dead_after_ms).unwrap_or(0),
        schedule: settings
            .filter(|s| s.mode != Mode::Disable)
            .map(|s| schedule_name(&s.schedule))
            .unwrap_or_default(),
    }
}

/// The `dpd.state` record of a core view (`schedule`: the tunnel's).
pub fn record_of(tunnel: &str, v: &DpdView, schedule: Option<&Schedule>) -> DpdTunnelState {
    DpdTunnelState {
        tunnel: tunnel.to_string(),
        mode: v.mode.as_str().to_string(),
        on: v.on,
        idle_ms: v.idle_ms,
        retry: v.retry,
        count: v.count,
        seqno: v.seqno,
        state: state_name(&v.phase).to_string(),
        dead_after_ms: v.dead_after_ms.unwrap_or(0),
        schedule: schedule
            .filter(|_| v.on)
            .map(schedule_name)
            .unwrap_or_default(),
    }
}

#[cfg(test)]
#[path = "glue_tests.rs"]
mod tests;
