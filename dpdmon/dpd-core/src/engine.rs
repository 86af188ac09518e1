//! The DPD engine: every tunnel's state machine on one timer wheel.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::settings::{dead_after_ms, Mode, Role, Settings};
use crate::wheel::{Expired, TimerHandle, TimerWheel};
use crate::DpdError;

/// Version of [`Snapshot`]; a newer snapshot is refused.
pub const SNAPSHOT_VERSION: u16 = 1;

/// Where one tunnel is in its DPD life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Not probing: mode `disable` or role `standby`.
    Inactive,
    /// Watching traffic; a round starts when the mode's condition holds.
    Watching,
    /// A probe round: `attempt` transmissions sent (0 only transiently), the
    /// next transmission or the verdict is due at `next_ms`.
    Probing {
        attempt: u32,
        round_start_ms: u64,
        next_ms: u64,
    },
    /// The peer was declared dead at `at_ms`; final for this tunnel record.
    Dead { at_ms: u64 },
}

impl Phase {
    /// Short name for views and the bus (`dpd.state` `state`).
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Inactive => "inactive",
            Phase::Watching => "watching",
            Phase::Probing { .. } => "probing",
            Phase::Dead { .. } => "dead",
        }
    }
}

/// What the driver must do (drain with [`Dpd::poll_event`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<K> {
    /// Ask ikemgr to send an IKEv2 liveness check (an empty INFORMATIONAL
    /// request, RFC 7296 section 1.4; liveness checks in section 2.4).
    /// `seqno` is the message ID to reuse:
    /// `None` for the first transmission of a round (ikemgr assigns one and
    /// the driver reports it with [`Dpd::handle_probe_sent`]), then the ID
    /// reported, so every retransmission of one probe keeps its message ID.
    /// `attempt` counts transmissions in the round, from 1.
    SendProbe {
        tunnel: K,
        seqno: Option<u32>,
        attempt: u32,
    },
    /// The peer is dead: flush the tunnel. `detected_after_ms` is the time
    /// from the start of silence (see [`dead_after_ms`]) to this verdict,
    /// `dead_after_ms` the configured budget, `probes_sent` the
    /// transmissions of the last round.
    PeerDead {
        tunnel: K,
        detected_after_ms: u64,
        dead_after_ms: u64,
        probes_sent: u32,
    },
}

/// A change for the views (drain with [`Dpd::poll_view_change`]); changes
/// are coalesced: a tunnel appears once per drain with its current view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ViewChange<K> {
    Updated(K, DpdView),
    Removed(K),
}

/// One tunnel's DPD view. `Display` gives the FortiOS `dpd:` fields:
/// `mode=on-idle on=1 idle=60000ms retry=3 count=0 seqno=20`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DpdView {
    pub mode: Mode,
    /// DPD configured (mode other than `disable`), whatever the role.
    pub on: bool,
    pub role: Role,
    /// Idle interval (FortiOS `idle=`).
    pub idle_ms: u64,
    /// Transmissions per round (FortiOS `retry=`).
    pub retry: u32,
    /// Transmissions sent in the current round (FortiOS `count=`).
    pub count: u32,
    /// Message ID of the last probe (FortiOS `seqno=`), 0 before any.
    pub seqno: u32,
    pub phase: Phase,
    /// See [`dead_after_ms`].
    pub dead_after_ms: Option<u64>,
    /// Last proof of life (ms, the driver's clock).
    pub last_life_ms: u64,
    pub probes_sent: u64,
    pub replies: u64,
}

impl fmt::Display for DpdView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mode={} on={} idle={}ms retry={} count={} seqno={}",
            self.mode,
            u8::from(self.on),
            self.idle_ms,
            self.retry,
            self.count,
            self.seqno
        )
    }
}

/// One tunnel's datapath activity in an espd batch: wall-clock times of the
/// last packet received and sent, in ns (0: none), as in `esp.activity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity<'a, K> {
    pub tunnel: &'a K,
    pub last_rx_ns: u64,
    pub last_tx_ns: u64,
}

/// Engine-wide counters (plain numbers; the daemon exports them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub tunnels: usize,
    pub probes_sent: u64,
    pub rounds_started: u64,
    pub rounds_answered: u64,
    pub replies: u64,
    /// Replies whose message ID is not the current probe's (still proof of life).
    pub stale_replies: u64,
    pub probe_failures: u64,
    pub peers_dead: u64,
    pub timer_fires: u64,
    /// Inputs naming a tunnel the engine does not hold (normal at start-up).
    pub unknown_tunnel_inputs: u64,
    /// Tunnels dropped from a snapshot on restore (invalid or duplicate).
    pub restore_skipped: u64,
}

/// One tunnel in a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelSnapshot<K> {
    pub tunnel: K,
    pub settings: Settings,
    pub phase: Phase,
    pub last_life_ms: u64,
    pub last_rx_ms: u64,
    pub last_tx_ms: u64,
    pub unanswered_tx_ms: Option<u64>,
    pub next_round_ms: u64,
    pub msg_id: Option<u32>,
    pub seqno: u32,
    pub round_probes: u32,
}

/// The engine's state, for a restart (see [`Dpd::restore`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot<K> {
    pub version: u16,
    pub taken_at_ms: u64,
    pub tunnels: Vec<TunnelSnapshot<K>>,
}

#[derive(Debug)]
struct Tunnel<K> {
    key: K,
    settings: Settings,
    phase: Phase,
    /// Last proof of life, or the baseline (add, promotion).
    last_life_ms: u64,
    last_rx_ms: u64,
    last_tx_ms: u64,
    /// On-demand: the first reported transmission after the last proof of life.
    unanswered_tx_ms: Option<u64>,
    /// Periodic: when the next round starts.
    next_round_ms: u64,
    /// Message ID of the current round's probe, once ikemgr reported it.
    msg_id: Option<u32>,
    /// Message ID of the last probe (views).
    seqno: u32,
    /// Transmissions in the current (or last) round.
    round_probes: u32,
    timer: Option<TimerHandle>,
    dirty: bool,
    /// Restored dead: `PeerDead` is emitted again at the first timeout.
    reannounce: bool,
    probes_sent: u64,
    replies: u64,
}

impl<K> Tunnel<K> {
    fn new(key: K, settings: Settings, now: u64) -> Self {
        let mut t = Tunnel {
            key,
            settings,
            phase: Phase::Inactive,
            last_life_ms: now,
            last_rx_ms: 0,
            last_tx_ms: 0,
            unanswered_tx_ms: None,
            next_round_ms: now.saturating_add(settings.schedule.idle_ms()),
            msg_id: None,
            seqno: 0,
            round_probes: 0,
            timer: None,
            dirty: false,
            reannounce: false,
            probes_sent: 0,
            replies: 0,
        };
        t.activate();
        t
    }

    fn probing_allowed(&self) -> bool {
        self.settings.mode != Mode::Disable && self.settings.role == Role::Owner
    }

    /// Watching or Inactive according to mode and role (leaves Dead alone).
    fn activate(&mut self) {
        if matches!(self.phase, Phase::Dead { .. }) {
            return;
        }
        self.phase = if self.probing_allowed() {
            Phase::Watching
        } else {
            Phase::Inactive
        };
        self.round_probes = 0;
        self.msg_id = None;
    }

    /// Start of silence for the budget (see `dead_after_ms`).
    fn silence_origin(&self) -> u64 {
        match (self.settings.mode, self.unanswered_tx_ms) {
            (Mode::OnDemand, Some(tx)) => tx.max(self.last_life_ms),
            _ => self.last_life_ms,
        }
    }

    /// When the state machine next has something to do.
    fn next_due(&self) -> Option<u64> {
        match self.phase {
            Phase::Inactive => None,
            Phase::Dead { at_ms } => self.reannounce.then_some(at_ms),
            Phase::Probing { next_ms, .. } => Some(next_ms),
            Phase::Watching => {
                let idle = self.settings.schedule.idle_ms();
                match self.settings.mode {
                    Mode::Disable => None,
                    Mode::OnIdle => Some(self.last_life_ms.saturating_add(idle)),
                    Mode::OnDemand => self.unanswered_tx_ms.map(|t| t.saturating_add(idle)),
                    Mode::Periodic => Some(self.next_round_ms),
                }
            }
        }
    }

    fn view(&self) -> DpdView {
        DpdView {
            mode: self.settings.mode,
            on: self.settings.mode != Mode::Disable,
            role: self.settings.role,
            idle_ms: self.settings.schedule.idle_ms(),
            retry: self.settings.schedule.tries(),
            count: match self.phase {
                Phase::Probing { attempt, .. } => attempt,
                Phase::Dead { .. } => self.round_probes,
                _ => 0,
            },
            seqno: self.seqno,
            phase: self.phase,
            dead_after_ms: dead_after_ms(&self.settings),
            last_life_ms: self.last_life_ms,
            probes_sent: self.probes_sent,
            replies: self.replies,
        }
    }
}

#[derive(Debug)]
struct Slot<K> {
    gen: u32,
    tunnel: Option<Tunnel<K>>,
}

/// Timer payload: slab index in the high half, slot generation in the low.
fn timer_value(idx: u32, gen: u32) -> u64 {
    (u64::from(idx) << 32) | u64::from(gen)
}

/// The DPD engine for all tunnels of one dpdmon, keyed by `K` (the tunnel
/// name in the daemon).
///
/// Time is milliseconds on the driver's clock, which must be the clock of
/// the datapath activity timestamps (espd publishes wall-clock ns); `now`
/// should not go backwards (if it does, the wheel holds its time and
/// durations saturate at 0).
///
/// Driving it (quinn style): after any `handle_*` call, drain
/// [`poll_event`](Self::poll_event) until `None` (send the probes, flush the
/// dead), then [`poll_view_change`](Self::poll_view_change) until `None`
/// (publish `dpd.state`), then sleep until [`poll_timeout`](Self::poll_timeout)
/// and call [`handle_timeout`](Self::handle_timeout) then. Only
/// `handle_timeout` produces events; every other input only changes state,
/// timers and views.
#[derive(Debug)]
pub struct Dpd<K> {
    wheel: TimerWheel<u64>,
    slots: Vec<Slot<K>>,
    free: Vec<u32>,
    index: HashMap<K, u32>,
    events: VecDeque<Event<K>>,
    dirty: Vec<(u32, u32)>,
    removed: VecDeque<K>,
    expired: Vec<Expired<u64>>,
    stats: Stats,
}

impl<K: Clone + Eq + Hash> Dpd<K> {
    /// An empty engine whose clock starts at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Dpd {
            wheel: TimerWheel::new(now_ms),
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            events: VecDeque::new(),
            dirty: Vec::new(),
            removed: VecDeque::new(),
            expired: Vec::new(),
            stats: Stats::default(),
        }
    }

    // ----- getters -----

    /// Number of tunnels held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when no tunnel is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            tunnels: self.index.len(),
            ..self.stats
        }
    }

    /// The current view of one tunnel.
    pub fn view(&self, tunnel: &K) -> Option<DpdView> {
        self.get(tunnel).map(Tunnel::view)
    }

    /// Every tunnel's view (order unspecified).
    pub fn views(&self) -> impl Iterator<Item = (&K, DpdView)> + '_ {
        self.slots
            .iter()
            .filter_map(|s| s.tunnel.as_ref().map(|t| (&t.key, t.view())))
    }

    /// The settings a tunnel was last given.
    pub fn settings(&self, tunnel: &K) -> Option<Settings> {
        self.get(tunnel).map(|t| t.settings)
    }

    // ----- inputs -----

    /// A tunnel came up or its settings changed (ikemgr `tunnel.state` with
    /// state up, or a role from hasyncd folded into `settings.role`).
    ///
    /// - New tunnel: the add is its baseline proof of life (the IKE SA was
    ///   just authenticated).
    /// - Same settings: nothing changes (ikemgr republishes freely).
    /// - Role Standby -> Owner: probing starts, silence counted from now
    ///   at the earliest; Owner -> Standby: probing stops.
    /// - Other changes: a round in progress is abandoned and the tunnel is
    ///   re-evaluated from its last proof of life under the new settings.
    /// - A dead tunnel keeps its verdict (the driver removes the record when
    ///   ikemgr has flushed it, and adds a new one for a new IKE SA).
    ///
    /// The driver combines ikemgr's settings with the role it last heard
    /// from hasyncd (`Owner` until hasyncd exists), so that a republished
    /// `tunnel.state` does not flip a standby tunnel back to owner.
    pub fn handle_tunnel_upsert(
        &mut self,
        now_ms: u64,
        tunnel: K,
        settings: Settings,
    ) -> Result<(), DpdError> {
        settings.validate()?;
        let now = self.clock(now_ms);
        if let Some(&idx) = self.index.get(&tunnel) {
            let Some(t) = self.tunnel_mut(idx) else {
                return Ok(());
            };
            if t.settings == settings {
                return Ok(());
            }
            let old = t.settings;
            t.settings = settings;
            if !matches!(t.phase, Phase::Dead { .. }) {
                if old.role == Role::Standby && settings.role == Role::Owner {
                    t.last_life_ms = t.last_life_ms.max(now);
                    t.unanswered_tx_ms = None;
                }
                t.next_round_ms = now.saturating_add(settings.schedule.idle_ms());
                if t.settings.mode != Mode::OnDemand {
                    t.unanswered_tx_ms = None;
                }
                t.activate();
            }
            self.mark_dirty(idx);
            self.reschedule(idx);
        } else {
            let idx = match self.free.pop() {
                Some(idx) => idx,
                None => {
                    self.slots.push(Slot {
                        gen: 0,
                        tunnel: None,
                    });
                    (self.slots.len() - 1) as u32
                }
            };
            self.index.insert(tunnel.clone(), idx);
            if let Some(slot) = self.slots.get_mut(idx as usize) {
                slot.tunnel = Some(Tunnel::new(tunnel, settings, now));
            }
            self.mark_dirty(idx);
            self.reschedule(idx);
        }
        Ok(())
    }

    /// HA role from hasyncd (same rules as a role change in
    /// [`handle_tunnel_upsert`](Self::handle_tunnel_upsert)).
    pub fn handle_role(&mut self, now_ms: u64, tunnel: &K, role: Role) {
        let Some(mut settings) = self.get(tunnel).map(|t| t.settings) else {
            self.stats.unknown_tunnel_inputs += 1;
            return;
        };
        settings.role = role;
        // Settings already validated when the tunnel was added.
        let _ = self.handle_tunnel_upsert(now_ms, tunnel.clone(), settings);
    }

    /// The tunnel is gone (ikemgr removed it, or flushed it after a verdict).
    /// Its timer is cancelled and no event about it follows.
    pub fn handle_tunnel_removed(&mut self, _now_ms: u64, tunnel: &K) {
        let Some(idx) = self.index.remove(tunnel) else {
            self.stats.unknown_tunnel_inputs += 1;
            return;
        };
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        if let Some(t) = slot.tunnel.take() {
            if let Some(h) = t.timer {
                self.wheel.cancel(h);
            }
            self.removed.push_back(t.key);
        }
        slot.gen = slot.gen.wrapping_add(1);
        self.free.push(idx);
    }

    /// A batch of datapath activity (espd `esp.activity`). A received packet
    /// later than the last proof of life is proof of life; a sent packet
    /// after it makes an on-demand tunnel wait for an answer.
    pub fn handle_datapath_activity<'a, I>(&mut self, now_ms: u64, batch: I)
    where
        I: IntoIterator<Item = Activity<'a, K>>,
        K: 'a,
    {
        let now = self.clock(now_ms);
        for a in batch {
            let Some(&idx) = self.index.get(a.tunnel) else {
                self.stats.unknown_tunnel_inputs += 1;
                continue;
            };
            let rx = (a.last_rx_ns / 1_000_000).min(now);
            let tx = (a.last_tx_ns / 1_000_000).min(now);
            let Some(t) = self.tunnel_mut(idx) else {
                continue;
            };
            if tx > t.last_tx_ms {
                t.last_tx_ms = tx;
            }
            if rx > t.last_rx_ms {
                t.last_rx_ms = rx;
                self.proof_of_life(idx, rx, now);
            }
            let Some(t) = self.tunnel_mut(idx) else {
                continue;
            };
            if t.settings.mode == Mode::OnDemand
                && t.unanswered_tx_ms.is_none()
                && t.last_tx_ms > t.last_life_ms
                && t.phase == Phase::Watching
            {
                t.unanswered_tx_ms = Some(t.last_tx_ms);
                self.reschedule(idx);
            }
        }
    }

    /// Any authenticated IKE message from the peer (ikemgr), at `now_ms`.
    pub fn handle_ike_activity(&mut self, now_ms: u64, tunnel: &K) {
        self.handle_ike_activity_at(now_ms, tunnel, now_ms);
    }

    /// An authenticated IKE message received at `at_ms` (<= now; for
    /// replaying ikemgr's snapshot after a restart).
    pub fn handle_ike_activity_at(&mut self, now_ms: u64, tunnel: &K, at_ms: u64) {
        let now = self.clock(now_ms);
        match self.index.get(tunnel) {
            Some(&idx) => self.proof_of_life(idx, at_ms.min(now), now),
            None => self.stats.unknown_tunnel_inputs += 1,
        }
    }

    /// ikemgr sent the probe of the current round with message ID `msg_id`;
    /// later transmissions of this round reuse it.
    pub fn handle_probe_sent(&mut self, _now_ms: u64, tunnel: &K, msg_id: u32) {
        let Some(&idx) = self.index.get(tunnel) else {
            self.stats.unknown_tunnel_inputs += 1;
            return;
        };
        if let Some(t) = self.tunnel_mut(idx) {
            if matches!(t.phase, Phase::Probing { .. }) {
                t.msg_id = Some(msg_id);
            }
            t.seqno = msg_id;
            self.mark_dirty(idx);
        }
    }

    /// The peer answered a probe. A reply is an authenticated IKE message,
    /// so it is proof of life even when `msg_id` is not the current probe's.
    pub fn handle_probe_reply(&mut self, now_ms: u64, tunnel: &K, msg_id: u32) {
        let now = self.clock(now_ms);
        let Some(&idx) = self.index.get(tunnel) else {
            self.stats.unknown_tunnel_inputs += 1;
            return;
        };
        self.stats.replies += 1;
        if let Some(t) = self.tunnel_mut(idx) {
            t.replies += 1;
            if t.msg_id != Some(msg_id) {
                self.stats.stale_replies += 1;
            }
        }
        self.proof_of_life(idx, now, now);
    }

    /// ikemgr could not send a probe (no IKE SA, socket error, its own
    /// timeout). Counted only: the round keeps its schedule, so a failure
    /// neither hastens nor delays the verdict; the next transmission is
    /// requested as planned.
    pub fn handle_probe_failed(&mut self, _now_ms: u64, tunnel: &K) {
        if self.index.contains_key(tunnel) {
            self.stats.probe_failures += 1;
        } else {
            self.stats.unknown_tunnel_inputs += 1;
        }
    }

    /// Runs every timer due at `now_ms`: starts rounds, requests
    /// retransmissions, takes verdicts.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let mut expired = std::mem::take(&mut self.expired);
        expired.clear();
        self.wheel.advance_into(now_ms, &mut expired);
        let now = self.wheel.now_ms();
        for e in &expired {
            self.stats.timer_fires += 1;
            let idx = (e.value >> 32) as u32;
            let gen = e.value as u32;
            if self.slots.get(idx as usize).map(|s| s.gen) != Some(gen) {
                continue;
            }
            if let Some(t) = self.tunnel_mut(idx) {
                t.timer = None;
            }
            self.evaluate(idx, now);
            self.reschedule(idx);
        }
        self.expired = expired;
    }

    // ----- outputs -----

    /// When [`handle_timeout`](Self::handle_timeout) must next be called;
    /// may be earlier than needed, never later. `None`: nothing scheduled.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.wheel.next_deadline()
    }

    /// Next action for the driver.
    pub fn poll_event(&mut self) -> Option<Event<K>> {
        self.events.pop_front()
    }

    /// Next view change (removals first, then coalesced updates).
    pub fn poll_view_change(&mut self) -> Option<ViewChange<K>> {
        if let Some(k) = self.removed.pop_front() {
            return Some(ViewChange::Removed(k));
        }
        while let Some((idx, gen)) = self.dirty.pop() {
            let Some(slot) = self.slots.get_mut(idx as usize) else {
                continue;
            };
            if slot.gen != gen {
                continue;
            }
            if let Some(t) = slot.tunnel.as_mut() {
                t.dirty = false;
                return Some(ViewChange::Updated(t.key.clone(), t.view()));
            }
        }
        None
    }

    // ----- restart -----

    /// The whole state, for a restart. Take it often (for example after each
    /// drained batch of events); an older snapshot only makes the restored
    /// engine decide later, never earlier.
    pub fn snapshot(&self, now_ms: u64) -> Snapshot<K> {
        Snapshot {
            version: SNAPSHOT_VERSION,
            taken_at_ms: now_ms,
            tunnels: self
                .slots
                .iter()
                .filter_map(|s| s.tunnel.as_ref())
                .map(|t| TunnelSnapshot {
                    tunnel: t.key.clone(),
                    settings: t.settings,
                    phase: t.phase,
                    last_life_ms: t.last_life_ms,
                    last_rx_ms: t.last_rx_ms,
                    last_tx_ms: t.last_tx_ms,
                    unanswered_tx_ms: t.unanswered_tx_ms,
                    next_round_ms: t.next_round_ms,
                    msg_id: t.msg_id,
                    seqno: t.seqno,
                    round_probes: t.round_probes,
                })
                .collect(),
        }
    }

    /// Rebuilds an engine at `now_ms` from a snapshot.
    ///
    /// The rule that keeps a restart from deciding early: while dpdmon was
    /// down nobody could see a reply, so a round in progress resumes at the
    /// transmission it had reached, which is sent again (same message ID) at
    /// the first `handle_timeout` and given its full wait from then; the
    /// verdict therefore comes no earlier than restore time plus the waits
    /// still owed, which is never before silence start + budget. Watching
    /// tunnels keep their last proof of life (a round may start at once if
    /// it is overdue). Tunnels dead in the snapshot get their `PeerDead`
    /// again at the first `handle_timeout` (the flush may not have happened;
    /// flushing is idempotent).
    ///
    /// The guarantee needs every proof of life newer than the snapshot back:
    /// *before* the first `handle_timeout`, feed the espd snapshot's
    /// `last_rx_ns`/`last_tx_ns` ([`handle_datapath_activity`](Self::handle_datapath_activity))
    /// and ikemgr's time of the last authenticated message per tunnel
    /// ([`handle_ike_activity_at`](Self::handle_ike_activity_at)), remove
    /// the tunnels ikemgr no longer has, and remove then re-add the ones
    /// whose IKE SA is newer than a dead verdict (so no stale `PeerDead`
    /// flushes a fresh SA). With that, a verdict after a restart is never
    /// earlier than silence start + budget.
    pub fn restore(now_ms: u64, snapshot: Snapshot<K>) -> Result<Self, DpdError> {
        if snapshot.version > SNAPSHOT_VERSION {
            return Err(DpdError::SnapshotVersion {
                found: snapshot.version,
                supported: SNAPSHOT_VERSION,
            });
        }
        let now = now_ms;
        let mut dpd = Dpd::new(now);
        for s in snapshot.tunnels {
            if s.settings.validate().is_err() || dpd.index.contains_key(&s.tunnel) {
                dpd.stats.restore_skipped += 1;
                continue;
            }
            let mut t = Tunnel::new(s.tunnel.clone(), s.settings, now);
            t.last_life_ms = s.last_life_ms.min(now);
            t.last_rx_ms = s.last_rx_ms.min(now);
            t.last_tx_ms = s.last_tx_ms.min(now);
            t.unanswered_tx_ms = s.unanswered_tx_ms.map(|x| x.min(now));
            // A periodic round is never further away than one interval.
            t.next_round_ms = s
                .next_round_ms
                .min(now.saturating_add(s.settings.schedule.idle_ms()));
            t.seqno = s.seqno;
            t.round_probes = s.round_probes;
            match s.phase {
                Phase::Dead { at_ms } => {
                    t.phase = Phase::Dead {
                        at_ms: at_ms.min(now),
                    };
                    t.reannounce = true;
                }
                Phase::Probing {
                    attempt,
                    round_start_ms,
                    ..
                } if t.probing_allowed() => {
                    let tries = t.settings.schedule.tries();
                    t.phase = Phase::Probing {
                        // The next evaluation sends `attempt` again.
                        attempt: attempt.min(tries).saturating_sub(1),
                        round_start_ms: round_start_ms.min(now),
                        next_ms: now,
                    };
                    t.msg_id = s.msg_id;
                }
                // Watching / Inactive / Probing no longer allowed: from settings.
                _ => {}
            }
            let idx = dpd.slots.len() as u32;
            dpd.slots.push(Slot {
                gen: 0,
                tunnel: Some(t),
            });
            dpd.index.insert(s.tunnel, idx);
            dpd.mark_dirty(idx);
            dpd.reschedule(idx);
        }
        Ok(dpd)
    }

    // ----- internals -----

    fn clock(&self, now_ms: u64) -> u64 {
        now_ms.max(self.wheel.now_ms())
    }

    fn get(&self, tunnel: &K) -> Option<&Tunnel<K>> {
        let idx = *self.index.get(tunnel)?;
        self.slots.get(idx as usize)?.tunnel.as_ref()
    }

    fn tunnel_mut(&mut self, idx: u32) -> Option<&mut Tunnel<K>> {
        self.slots.get_mut(idx as usize)?.tunnel.as_mut()
    }

    fn mark_dirty(&mut self, idx: u32) {
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        let gen = slot.gen;
        if let Some(t) = slot.tunnel.as_mut() {
            if !t.dirty {
                t.dirty = true;
                self.dirty.push((idx, gen));
            }
        }
    }

    /// The peer was alive at `at` (<= now): ends a round in progress.
    fn proof_of_life(&mut self, idx: u32, at: u64, now: u64) {
        let Some(t) = self.tunnel_mut(idx) else {
            return;
        };
        if matches!(t.phase, Phase::Dead { .. }) || at <= t.last_life_ms {
            return;
        }
        t.last_life_ms = at;
        if t.unanswered_tx_ms.is_some_and(|tx| tx <= at) {
            t.unanswered_tx_ms = None;
        }
        if let Phase::Probing { round_start_ms, .. } = t.phase {
            let interval = t.settings.schedule.idle_ms();
            let next = round_start_ms.saturating_add(interval);
            t.next_round_ms = if next > now {
                next
            } else {
                now.saturating_add(interval)
            };
            t.phase = Phase::Watching;
            t.msg_id = None;
            self.stats.rounds_answered += 1;
            self.mark_dirty(idx);
            self.reschedule(idx);
        }
    }

    /// The timer fired: act on whatever is due.
    fn evaluate(&mut self, idx: u32, now: u64) {
        let Some(t) = self.tunnel_mut(idx) else {
            return;
        };
        match t.phase {
            Phase::Inactive => {}
            Phase::Dead { at_ms } => {
                if t.reannounce {
                    t.reannounce = false;
                    let ev = Event::PeerDead {
                        tunnel: t.key.clone(),
                        detected_after_ms: at_ms.saturating_sub(t.silence_origin()),
                        dead_after_ms: dead_after_ms(&t.settings).unwrap_or(0),
                        probes_sent: t.round_probes,
                    };
                    self.events.push_back(ev);
                }
            }
            Phase::Watching => {
                if t.next_due().is_some_and(|due| due <= now) {
                    t.phase = Phase::Probing {
                        attempt: 0,
                        round_start_ms: now,
                        next_ms: now,
                    };
                    t.msg_id = None;
                    t.round_probes = 0;
                    self.stats.rounds_started += 1;
                    self.transmit_or_decide(idx, now);
                }
            }
            Phase::Probing { next_ms, .. } => {
                if next_ms <= now {
                    self.transmit_or_decide(idx, now);
                }
            }
        }
    }

    fn transmit_or_decide(&mut self, idx: u32, now: u64) {
        let Some(t) = self.tunnel_mut(idx) else {
            return;
        };
        let Phase::Probing {
            attempt,
            round_start_ms,
            ..
        } = t.phase
        else {
            return;
        };
        let schedule = t.settings.schedule;
        if attempt < schedule.tries() {
            let attempt = attempt + 1;
            t.phase = Phase::Probing {
                attempt,
                round_start_ms,
                next_ms: now.saturating_add(schedule.wait_ms(attempt)),
            };
            t.round_probes = t.round_probes.saturating_add(1);
            t.probes_sent += 1;
            let ev = Event::SendProbe {
                tunnel: t.key.clone(),
                seqno: t.msg_id,
                attempt,
            };
            self.stats.probes_sent += 1;
            self.events.push_back(ev);
        } else {
            t.phase = Phase::Dead { at_ms: now };
            let ev = Event::PeerDead {
                tunnel: t.key.clone(),
                detected_after_ms: now.saturating_sub(t.silence_origin()),
                dead_after_ms: dead_after_ms(&t.settings).unwrap_or(0),
                probes_sent: t.round_probes,
            };
            self.stats.peers_dead += 1;
            self.events.push_back(ev);
        }
        self.mark_dirty(idx);
    }

    /// Makes the tunnel's timer fire no later than its next due time.
    /// An armed timer that fires earlier is kept: it re-evaluates and
    /// re-arms, which keeps traffic updates free of wheel operations.
    fn reschedule(&mut self, idx: u32) {
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        let gen = slot.gen;
        let Some(t) = slot.tunnel.as_mut() else {
            return;
        };
        let due = t.next_due();
        match (due, t.timer) {
            (None, None) => {}
            (None, Some(h)) => {
                self.wheel.cancel(h);
                t.timer = None;
            }
            (Some(due), Some(h)) => {
                if self.wheel.deadline(h).is_some_and(|d| d <= due) {
                    return;
                }
                self.wheel.cancel(h);
                t.timer = Some(self.wheel.insert(due, timer_value(idx, gen)));
            }
            (Some(due), None) => {
                t.timer = Some(self.wheel.insert(due, timer_value(idx, gen)));
            }
        }
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
