//! The subscriber side of the Clone pattern (DESIGN §3.3), sans-IO.
//!
//! One [`Follower`] per followed publisher. The caller feeds it every envelope received from
//! that publisher ([`Follower::handle_update`]), asks it whether to request a snapshot
//! ([`Follower::poll_snapshot_request`], at least whenever [`Follower::poll_timeout`] is due and
//! after every input), sends [`crate::CtlRequest::Snapshot`] to the owner when told to, and feeds
//! the reply back ([`Follower::handle_snapshot`]). Time is only what the caller passes as
//! `now_ns`; nothing here reads a clock or touches a socket.
//!
//! Algorithm:
//! - A fresh follower has seen no boot and wants a snapshot at once.
//! - An update from the current boot with `seq == last + 1` is applied while synced.
//!   `seq <= last` is stale and ignored. `seq > last + 1` is a gap: the follower stops
//!   applying, buffers, and wants a snapshot.
//! - An update with a different boot id means the publisher restarted: the buffer is cleared,
//!   the sequence resets, and a snapshot is wanted at once (the store is kept until the
//!   snapshot replaces it, so readers never see an empty store in between).
//! - While waiting, updates are buffered in a bounded queue (oldest dropped and counted: the
//!   snapshot, taken later, covers them). A request unanswered for `snapshot_retry_ns` is
//!   repeated.
//! - A snapshot replaces the store, sets `last = snap.seq`, then replays buffered updates newer
//!   than `snap.seq` in order; if the replay finds a hole, another snapshot is wanted.

use std::collections::VecDeque;

use crate::ctl::ReplicaInfo;
use crate::schema::{DaemonKind, Envelope};
use crate::store::{Snapshot, StateStore};

/// Publishers send [`crate::Body::Heartbeat`] at this interval.
pub const HEARTBEAT_INTERVAL_NS: u64 = 1_000_000_000;

/// Tunables of a [`Follower`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowerConfig {
    /// Updates kept while waiting for a snapshot.
    pub buffer_limit: usize,
    /// Repeat an unanswered snapshot request after this long.
    pub snapshot_retry_ns: u64,
    /// [`Follower::is_stale`] after this long without any message (3.5 heartbeats).
    pub stale_after_ns: u64,
}

impl Default for FollowerConfig {
    fn default() -> Self {
        FollowerConfig {
            buffer_limit: 8192,
            snapshot_retry_ns: 1_000_000_000,
            stale_after_ns: 3 * HEARTBEAT_INTERVAL_NS + HEARTBEAT_INTERVAL_NS / 2,
        }
    }
}

/// What [`Follower::handle_update`] did with an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FollowOutcome {
    /// Applied to the store in order.
    Applied,
    /// Kept until a snapshot arrives.
    Buffered,
    /// Already covered (sequence not newer); ignored.
    Stale,
    /// A sequence gap: buffered, snapshot wanted.
    GapDetected,
    /// The publisher restarted: buffered, snapshot wanted.
    NewBoot,
    /// From a different publisher than this follower's; ignored.
    WrongSource,
}

/// What [`Follower::handle_snapshot`] did with a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotOutcome {
    /// Applied; `replayed` buffered updates were applied after it; `synced` is false when the
    /// replay found a hole and another snapshot is wanted.
    Applied { replayed: usize, synced: bool },
    /// From another publisher; ignored.
    WrongSource,
    /// From a boot other than the one the buffered updates come from; ignored.
    WrongBoot,
    /// Not newer than what the follower already has; ignored.
    Outdated,
}

/// Counters; cores keep plain counters, binaries export them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FollowerStats {
    pub applied: u64,
    pub buffered: u64,
    pub buffered_dropped: u64,
    pub stale: u64,
    pub gaps: u64,
    pub new_boots: u64,
    pub wrong_source: u64,
    pub snapshot_requests: u64,
    pub snapshot_retries: u64,
    pub snapshots: u64,
    pub snapshots_ignored: u64,
    pub replayed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    NeedSnapshot,
    Awaiting { since_ns: u64 },
    Synced,
}

/// Follows one publisher's state (see the module documentation).
#[derive(Clone, Debug)]
pub struct Follower {
    src: DaemonKind,
    config: FollowerConfig,
    boot: Option<u128>,
    seq: u64,
    phase: Phase,
    store: StateStore,
    buffer: VecDeque<Envelope>,
    last_heard_ns: Option<u64>,
    stats: FollowerStats,
}

impl Follower {
    pub fn new(src: DaemonKind) -> Self {
        Self::with_config(src, FollowerConfig::default())
    }

    pub fn with_config(src: DaemonKind, config: FollowerConfig) -> Self {
        Follower {
            src,
            config,
            boot: None,
            seq: 0,
            phase: Phase::NeedSnapshot,
            store: StateStore::default(),
            buffer: VecDeque::new(),
            last_heard_ns: None,
            stats: FollowerStats::default(),
        }
    }

    /// Feed one envelope received from the publisher.
    pub fn handle_update(&mut self, env: Envelope, now_ns: u64) -> FollowOutcome {
        if env.src != self.src {
            self.stats.wrong_source += 1;
            return FollowOutcome::WrongSource;
        }
        self.last_heard_ns = Some(now_ns);
        match self.boot {
            Some(b) if b == env.boot => {}
            Some(_) => {
                self.stats.new_boots += 1;
                self.boot = Some(env.boot);
                self.buffer.clear();
                self.seq = 0;
                self.phase = Phase::NeedSnapshot;
                self.push_buffer(env);
                return FollowOutcome::NewBoot;
            }
            None => {
                // First contact (late joiner): a request may already be in flight; its answer
                // carries the boot, so only ask if nothing is outstanding.
                self.boot = Some(env.boot);
                if self.phase == Phase::Synced {
                    self.phase = Phase::NeedSnapshot;
                }
                self.push_buffer(env);
                return FollowOutcome::Buffered;
            }
        }
        if env.seq <= self.seq {
            self.stats.stale += 1;
            return FollowOutcome::Stale;
        }
        match self.phase {
            Phase::Synced if env.seq == self.seq.wrapping_add(1) => {
                self.seq = env.seq;
                self.store.apply(&env.body);
                self.stats.applied += 1;
                FollowOutcome::Applied
            }
            Phase::Synced => {
                self.stats.gaps += 1;
                self.phase = Phase::NeedSnapshot;
                self.push_buffer(env);
                FollowOutcome::GapDetected
            }
            Phase::NeedSnapshot | Phase::Awaiting { .. } => {
                self.push_buffer(env);
                FollowOutcome::Buffered
            }
        }
    }

    fn push_buffer(&mut self, env: Envelope) {
        while self.buffer.len() >= self.config.buffer_limit.max(1) {
            self.buffer.pop_front();
            self.stats.buffered_dropped += 1;
        }
        self.buffer.push_back(env);
        self.stats.buffered += 1;
    }

    /// True when the caller must send [`crate::CtlRequest::Snapshot`] to the owner now. Handles
    /// the first request and the retry of an unanswered one.
    pub fn poll_snapshot_request(&mut self, now_ns: u64) -> bool {
        match self.phase {
            Phase::NeedSnapshot => {
                self.phase = Phase::Awaiting { since_ns: now_ns };
                self.stats.snapshot_requests += 1;
                true
            }
            Phase::Awaiting { since_ns }
                if now_ns.saturating_sub(since_ns) >= self.config.snapshot_retry_ns =>
            {
                self.phase = Phase::Awaiting { since_ns: now_ns };
                self.stats.snapshot_requests += 1;
                self.stats.snapshot_retries += 1;
                true
            }
            _ => false,
        }
    }

    /// When [`Follower::poll_snapshot_request`] may next return true: `Some(t)` (possibly in
    /// the past, meaning now), or `None` while synced.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.phase {
            Phase::NeedSnapshot => Some(0),
            Phase::Awaiting { since_ns } => {
                Some(since_ns.saturating_add(self.config.snapshot_retry_ns))
            }
            Phase::Synced => None,
        }
    }

    /// Feed the owner's reply to a snapshot request.
    pub fn handle_snapshot(&mut self, snap: Snapshot, now_ns: u64) -> SnapshotOutcome {
        if snap.src != self.src {
            self.stats.wrong_source += 1;
            return SnapshotOutcome::WrongSource;
        }
        match self.boot {
            Some(b) if b != snap.boot && !self.buffer.is_empty() => {
                self.stats.snapshots_ignored += 1;
                return SnapshotOutcome::WrongBoot;
            }
            Some(b) if b == snap.boot && snap.seq < self.seq => {
                self.stats.snapshots_ignored += 1;
                return SnapshotOutcome::Outdated;
            }
            Some(b) if b == snap.boot && snap.seq == self.seq && self.phase == Phase::Synced => {
                self.stats.snapshots_ignored += 1;
                return SnapshotOutcome::Outdated;
            }
            _ => {}
        }
        self.last_heard_ns = Some(now_ns);
        self.boot = Some(snap.boot);
        self.store.clear();
        for item in &snap.items {
            self.store.apply(item);
        }
        self.seq = snap.seq;
        self.stats.snapshots += 1;

        let mut replayed = 0;
        while let Some(env) = self.buffer.pop_front() {
            if env.boot != snap.boot || env.seq <= self.seq {
                self.stats.stale += 1;
                continue;
            }
            if env.seq != self.seq.wrapping_add(1) {
                self.buffer.push_front(env);
                self.stats.gaps += 1;
                self.phase = Phase::NeedSnapshot;
                self.stats.replayed += replayed as u64;
                return SnapshotOutcome::Applied {
                    replayed,
                    synced: false,
                };
            }
            self.seq = env.seq;
            self.store.apply(&env.body);
            replayed += 1;
        }
        self.stats.replayed += replayed as u64;
        self.phase = Phase::Synced;
        SnapshotOutcome::Applied {
            replayed,
            synced: true,
        }
    }

    pub fn src(&self) -> DaemonKind {
        self.src
    }

    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// Boot id of the publisher as last seen.
    pub fn boot(&self) -> Option<u128> {
        self.boot
    }

    /// Sequence number the store is current to.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// True when the store equals the owner's state as of [`Follower::seq`] and updates are
    /// being applied in order.
    pub fn synced(&self) -> bool {
        self.phase == Phase::Synced
    }

    pub fn stats(&self) -> FollowerStats {
        self.stats
    }

    /// Updates waiting for a snapshot.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Nothing heard from the publisher for more than `stale_after_ns` (or never). The store is
    /// kept: a silent publisher's last state is still the best knowledge.
    pub fn is_stale(&self, now_ns: u64) -> bool {
        match self.last_heard_ns {
            None => true,
            Some(t) => now_ns.saturating_sub(t) > self.config.stale_after_ns,
        }
    }

    /// Report for [`crate::CtlRequest::Replicas`].
    pub fn replica_info(&self, now_ns: u64) -> ReplicaInfo {
        ReplicaInfo {
            src: self.src,
            boot: self.boot,
            seq: self.seq,
            synced: self.synced(),
            items: self.store.len() as u64,
            digest: self.store.digest(),
            gaps: self.stats.gaps,
            snapshots: self.stats.snapshots,
            stale: self.is_stale(now_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Body, TunnelState};
    use crate::store::Owner;

    const SRC: DaemonKind = DaemonKind::Ikemgr;
    const SEC: u64 = 1_000_000_000;

    fn put(name: &str, n: u64) -> Body {
        let mut t = crate::samples::tunnel();
        t.name = name.into();
        t.dpd.retry_interval_ms = n;
        t.state = TunnelState::Connecting;
        Body::Tunnel(t)
    }

    fn del(name: &str) -> Body {
        Body::TunnelRemoved { name: name.into() }
    }

    /// A follower synced to `owner` through a snapshot at `now`.
    fn synced(owner: &Owner) -> Follower {
        let mut f = Follower::new(SRC);
        assert!(f.poll_snapshot_request(0));
        assert_eq!(
            f.handle_snapshot(owner.snapshot(), 0),
            SnapshotOutcome::Applied {
                replayed: 0,
                synced: true
            }
        );
        f
    }

    #[test]
    fn fresh_follower_asks_at_once_then_waits_for_the_retry_timeout() {
        let mut f = Follower::new(SRC);
        assert_eq!(f.poll_timeout(), Some(0));
        assert!(f.poll_snapshot_request(5));
        assert!(!f.poll_snapshot_request(5));
        assert_eq!(f.poll_timeout(), Some(5 + SEC));
        assert!(!f.poll_snapshot_request(5 + SEC - 1));
        assert!(f.poll_snapshot_request(5 + SEC));
        assert!(!f.poll_snapshot_request(5 + SEC + 1));
        assert!(f.poll_snapshot_request(5 + 3 * SEC));
        assert_eq!(f.stats().snapshot_requests, 3);
        assert_eq!(f.stats().snapshot_retries, 2);
        assert!(!f.synced());
    }

    #[test]
    fn in_order_updates_apply_and_stale_ones_are_ignored() {
        let mut owner = Owner::new(SRC, 1);
        owner.stamp(put("a", 1), 0);
        let mut f = synced(&owner);
        assert_eq!(f.poll_timeout(), None);
        let e2 = owner.stamp(put("b", 2), 0);
        let e3 = owner.stamp(del("a"), 0);
        assert_eq!(f.handle_update(e2.clone(), 1), FollowOutcome::Applied);
        assert_eq!(f.handle_update(e3, 2), FollowOutcome::Applied);
        assert_eq!(f.handle_update(e2, 3), FollowOutcome::Stale);
        assert_eq!(f.store(), owner.store());
        assert_eq!(f.seq(), 3);
        assert_eq!(f.stats().stale, 1);
        assert!(!f.poll_snapshot_request(4));
    }

    #[test]
    fn gap_buffers_requests_and_replays_only_newer_updates() {
        let mut owner = Owner::new(SRC, 1);
        let mut f = synced(&owner);
        let e1 = owner.stamp(put("a", 1), 0);
        let _lost = owner.stamp(put("b", 2), 0);
        let e3 = owner.stamp(put("c", 3), 0);
        assert_eq!(f.handle_update(e1, 1), FollowOutcome::Applied);
        assert_eq!(f.handle_update(e3.clone(), 2), FollowOutcome::GapDetected);
        assert_eq!(f.stats().gaps, 1);
        assert!(!f.synced());
        assert!(f.poll_snapshot_request(3));
        // The owner moves on before answering; the snapshot is taken at seq 4.
        let e4 = owner.stamp(del("a"), 0);
        let snap = owner.snapshot();
        let e5 = owner.stamp(put("d", 5), 0);
        assert_eq!(f.handle_update(e4, 4), FollowOutcome::Buffered);
        assert_eq!(f.handle_update(e5, 5), FollowOutcome::Buffered);
        assert_eq!(f.buffered(), 3);
        // e3 and e4 are covered by the snapshot; only e5 is replayed.
        assert_eq!(
            f.handle_snapshot(snap, 6),
            SnapshotOutcome::Applied {
                replayed: 1,
                synced: true
            }
        );
        assert_eq!(f.store(), owner.store());
        assert_eq!(f.store().digest(), owner.store().digest());
        assert_eq!(f.seq(), 5);
        assert_eq!(f.buffered(), 0);
        let e6 = owner.stamp(put("e", 6), 0);
        assert_eq!(f.handle_update(e6, 7), FollowOutcome::Applied);
        assert_eq!(f.handle_update(e3, 8), FollowOutcome::Stale);
    }

    #[test]
    fn new_boot_resets_and_keeps_the_old_store_until_the_snapshot() {
        let mut old = Owner::new(SRC, 1);
        old.stamp(put("a", 1), 0);
        let mut f = synced(&old);
        let mut new = Owner::new(SRC, 2);
        new.stamp(put("z", 9), 0);
        let hb = new.stamp(Body::Heartbeat { uptime_ms: 1 }, 0);
        assert_eq!(f.handle_update(hb, 1), FollowOutcome::NewBoot);
        assert_eq!(f.boot(), Some(2));
        assert_eq!(f.stats().new_boots, 1);
        assert!(!f.synced());
        assert_eq!(f.store(), old.store(), "store kept until the snapshot");
        assert!(f.poll_snapshot_request(2));
        // A reply from the old boot (to an earlier request) is ignored.
        assert_eq!(
            f.handle_snapshot(old.snapshot(), 3),
            SnapshotOutcome::WrongBoot
        );
        assert_eq!(
            f.handle_snapshot(new.snapshot(), 4),
            SnapshotOutcome::Applied {
                replayed: 0,
                synced: true
            }
        );
        assert_eq!(f.store(), new.store());
        assert_eq!(f.seq(), 2);
    }

    #[test]
    fn new_boot_while_waiting_asks_again_at_once() {
        let mut f = Follower::new(SRC);
        assert!(f.poll_snapshot_request(0));
        let mut a = Owner::new(SRC, 1);
        assert_eq!(
            f.handle_update(a.stamp(put("a", 1), 0), 1),
            FollowOutcome::Buffered
        );
        let mut b = Owner::new(SRC, 2);
        assert_eq!(
            f.handle_update(b.stamp(put("b", 1), 0), 2),
            FollowOutcome::NewBoot
        );
        assert!(
            f.poll_snapshot_request(3),
            "no need to wait for the retry timeout"
        );
    }

    #[test]
    fn late_joiner_buffers_first_updates_and_replays_them() {
        let mut owner = Owner::new(SRC, 7);
        for i in 0..10 {
            owner.stamp(put(&format!("t{i}"), i), 0);
        }
        let mut f = Follower::new(SRC);
        assert!(f.poll_snapshot_request(0));
        // Updates arrive before the snapshot reply.
        let e11 = owner.stamp(put("t3", 33), 0);
        let snap = owner.snapshot();
        let e12 = owner.stamp(del("t4"), 0);
        assert_eq!(f.handle_update(e11, 1), FollowOutcome::Buffered);
        assert_eq!(f.boot(), Some(7));
        assert_eq!(f.handle_update(e12, 2), FollowOutcome::Buffered);
        assert!(
            !f.poll_snapshot_request(3),
            "the first request is still in flight"
        );
        assert_eq!(
            f.handle_snapshot(snap, 4),
            SnapshotOutcome::Applied {
                replayed: 1,
                synced: true
            }
        );
        assert_eq!(f.store(), owner.store());
        assert_eq!(f.store().len(), 9);
    }

    #[test]
    fn hole_in_the_replay_asks_again() {
        let mut owner = Owner::new(SRC, 1);
        let mut f = Follower::new(SRC);
        assert!(f.poll_snapshot_request(0));
        let snap = owner.snapshot();
        let _lost = owner.stamp(put("a", 1), 0);
        let e2 = owner.stamp(put("b", 2), 0);
        assert_eq!(f.handle_update(e2, 1), FollowOutcome::Buffered);
        assert_eq!(
            f.handle_snapshot(snap, 2),
            SnapshotOutcome::Applied {
                replayed: 0,
                synced: false
            }
        );
        assert!(f.poll_snapshot_request(3));
        assert_eq!(
            f.handle_snapshot(owner.snapshot(), 4),
            SnapshotOutcome::Applied {
                replayed: 0,
                synced: true
            }
        );
        assert_eq!(f.store(), owner.store());
    }

    #[test]
    fn buffer_is_bounded_and_drops_the_oldest() {
        let config = FollowerConfig {
            buffer_limit: 4,
            ..FollowerConfig::default()
        };
        let mut f = Follower::with_config(SRC, config);
        assert!(f.poll_snapshot_request(0));
        let mut owner = Owner::new(SRC, 1);
        for i in 0..10 {
            f.handle_update(owner.stamp(put(&format!("t{i}"), i), 0), i);
        }
        assert_eq!(f.buffered(), 4);
        assert_eq!(f.stats().buffered_dropped, 6);
        // The snapshot covers the dropped ones; what is left replays.
        let mut snap = owner.snapshot();
        snap.seq = 6;
        snap.items.retain(|b| !matches!(b, Body::Tunnel(t) if ["t6", "t7", "t8", "t9"].contains(&t.name.as_str())));
        assert_eq!(
            f.handle_snapshot(snap, 11),
            SnapshotOutcome::Applied {
                replayed: 4,
                synced: true
            }
        );
        assert_eq!(f.store(), owner.store());
    }

    #[test]
    fn foreign_and_outdated_snapshots_are_ignored() {
        let mut owner = Owner::new(SRC, 1);
        let old_snap = owner.snapshot();
        owner.stamp(put("a", 1), 0);
        let mut f = synced(&owner);
        let mut foreign = Owner::new(DaemonKind::Espd, 1).snapshot();
        foreign.seq = 100;
        assert_eq!(f.handle_snapshot(foreign, 1), SnapshotOutcome::WrongSource);
        assert_eq!(f.handle_snapshot(old_snap, 1), SnapshotOutcome::Outdated);
        assert_eq!(
            f.handle_snapshot(owner.snapshot(), 1),
            SnapshotOutcome::Outdated
        );
        let e = Owner::new(DaemonKind::Espd, 1).stamp(put("x", 1), 0);
        assert_eq!(f.handle_update(e, 2), FollowOutcome::WrongSource);
        assert_eq!(f.store(), owner.store());
    }

    #[test]
    fn staleness_follows_the_last_message_and_keeps_the_store() {
        let mut owner = Owner::new(SRC, 1);
        assert!(Follower::new(SRC).is_stale(0), "never heard");
        let mut f = synced(&owner);
        assert!(
            !f.is_stale(1),
            "a snapshot counts as hearing from the owner"
        );
        f.handle_update(owner.stamp(put("a", 1), 0), 10 * SEC);
        assert!(!f.is_stale(13 * SEC));
        assert!(f.is_stale(14 * SEC));
        assert_eq!(f.store().len(), 1);
        let info = f.replica_info(14 * SEC);
        assert!(info.stale && info.synced);
        assert_eq!(info.items, 1);
        assert_eq!(info.digest, owner.store().digest());
    }

    /// Deterministic xorshift so the lossy-link run is reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
    }

    #[test]
    fn converges_over_a_lossy_link_with_restarts_and_slow_snapshots() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let config = FollowerConfig {
            buffer_limit: 16,
            ..FollowerConfig::default()
        };
        let mut f = Follower::with_config(SRC, config);
        let mut owner = Owner::new(SRC, 100);
        let mut in_flight: Option<(u64, Snapshot)> = None; // (delivery time, snapshot)
        let mut now = 0u64;
        for step in 0..20_000u64 {
            now += SEC / 100;
            if step % 5000 == 4999 {
                owner = Owner::new(SRC, 100 + step as u128); // publisher restart
            }
            let body = match rng.next() % 4 {
                0 => del(&format!("t{}", rng.next() % 50)),
                1 => Body::Heartbeat { uptime_ms: step },
                _ => put(&format!("t{}", rng.next() % 50), rng.next()),
            };
            let env = owner.stamp(body, now);
            if !rng.chance(20) {
                f.handle_update(env, now);
            }
            if f.poll_snapshot_request(now) && !rng.chance(30) {
                // Answered (unless lost), 20..120 ms later, state as of now.
                let delay = SEC / 50 + rng.next() % (SEC / 10);
                in_flight = Some((now + delay, owner.snapshot()));
            }
            if let Some((at, _)) = &in_flight {
                if *at <= now {
                    let (_, snap) = in_flight.take().unwrap();
                    f.handle_snapshot(snap, now);
                }
            }
        }
        // Quiesce: a loss-free tail of heartbeats lets the last repair finish.
        for _ in 0..200 {
            now += SEC / 100;
            f.handle_update(owner.stamp(Body::Heartbeat { uptime_ms: 0 }, now), now);
            if f.poll_snapshot_request(now) {
                f.handle_snapshot(owner.snapshot(), now);
            }
        }
        assert!(f.synced());
        assert_eq!(f.store(), owner.store());
        assert_eq!(f.store().digest(), owner.store().digest());
        assert_eq!(f.seq(), owner.seq());
        let s = f.stats();
        assert!(
            s.gaps > 100 && s.new_boots == 4 && s.snapshots > 100,
            "{s:?}"
        );
    }
}
