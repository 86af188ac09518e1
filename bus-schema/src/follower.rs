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
