//! Per-SA counters and soft/hard lifetimes (RFC 4301 §4.4.2.1), driven by `now`.

use std::time::{Duration, Instant};

/// Lifetime limits of one SA. `None` = no limit of that kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LifetimeConfig {
    /// Soft limit on inner bytes: triggers a rekey.
    pub soft_bytes: Option<u64>,
    /// Hard limit on inner bytes: the SA stops processing packets.
    pub hard_bytes: Option<u64>,
    /// Soft limit on packets.
    pub soft_packets: Option<u64>,
    /// Hard limit on packets.
    pub hard_packets: Option<u64>,
    /// Soft limit on age.
    pub soft_time: Option<Duration>,
    /// Hard limit on age.
    pub hard_time: Option<Duration>,
}

/// Which limit fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// Byte count.
    Bytes,
    /// Packet count.
    Packets,
    /// Age.
    Time,
    /// Outbound sequence number space (RFC 4303 §3.3.3: the counter must not cycle).
    SeqSpace,
}

/// What [`crate::EncryptSa::poll_event`] / [`crate::DecryptSa::poll_event`] report, once each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LifetimeEvent {
    /// Start a rekey now.
    Soft(LimitKind),
    /// The SA must be removed; the datapath already refuses to use it for volume limits.
    Hard(LimitKind),
}

/// Packet and byte counters of one SA. Bytes are inner (plaintext) packet bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets processed successfully.
    pub packets: u64,
    /// Inner bytes processed successfully.
    pub bytes: u64,
}

/// Lifetime state of one SA: which limits were hit and reported. [`crate::EncryptSa`] and
/// [`crate::DecryptSa`] own one each; a datapath that spreads an SA over several threads
/// keeps one per SA on its control thread and feeds it the summed [`Counters`].
#[derive(Clone, Debug)]
pub struct Lifetime {
    cfg: LifetimeConfig,
    created: Instant,
    hard_bytes: u64,
    hard_packets: u64,
    soft_reported: bool,
    hard_reported: bool,
}

impl Lifetime {
    /// Limits `cfg`, SA installed at `now`.
    pub fn new(cfg: LifetimeConfig, now: Instant) -> Self {
        Lifetime {
            cfg,
            created: now,
            hard_bytes: cfg.hard_bytes.unwrap_or(u64::MAX),
            hard_packets: cfg.hard_packets.unwrap_or(u64::MAX),
            soft_reported: false,
            hard_reported: false,
        }
    }

    /// An SA that has existed since `created` and whose soft limit was already reported if
    /// `soft_reported` (a datapath that restarted and took its state back): the soft event
    /// is not reported again, the hard one still is.
    pub fn resume(cfg: LifetimeConfig, created: Instant, soft_reported: bool) -> Self {
        let mut l = Lifetime::new(cfg, created);
        l.soft_reported = soft_reported;
        l
    }

    /// Whether the soft (or the hard) event was reported.
    pub fn soft_reported(&self) -> bool {
        self.soft_reported
    }

    /// The limits.
    pub fn config(&self) -> &LifetimeConfig {
        &self.cfg
    }

    /// When the SA was installed.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// Hot-path check: may one more packet be processed?
    #[inline]
    pub fn volume_ok(&self, c: &Counters) -> bool {
        c.bytes < self.hard_bytes && c.packets < self.hard_packets
    }

    fn hard_hit(&self, c: &Counters, now: Instant) -> Option<LimitKind> {
        let age = now.saturating_duration_since(self.created);
        if self.cfg.hard_time.is_some_and(|t| age >= t) {
            Some(LimitKind::Time)
        } else if c.bytes >= self.hard_bytes {
            Some(LimitKind::Bytes)
        } else if c.packets >= self.hard_packets {
            Some(LimitKind::Packets)
        } else {
            None
        }
    }

    fn soft_hit(&self, c: &Counters, now: Instant) -> Option<LimitKind> {
        let age = now.saturating_duration_since(self.created);
        if self.cfg.soft_time.is_some_and(|t| age >= t) {
            Some(LimitKind::Time)
        } else if self.cfg.soft_bytes.is_some_and(|b| c.bytes >= b) {
            Some(LimitKind::Bytes)
        } else if self.cfg.soft_packets.is_some_and(|p| c.packets >= p) {
            Some(LimitKind::Packets)
        } else {
            None
        }
    }

    /// Next event, reporting each of soft and hard at most once; a hard event implies the
    /// soft one (which is then not reported separately). `seq` carries the outbound
    /// sequence-space state: (soft reached, hard reached).
    pub fn poll(&mut self, c: &Counters, now: Instant, seq: (bool, bool)) -> Option<LifetimeEvent> {
        if self.hard_reported {
            return None;
        }
        let hard = self
            .hard_hit(c, now)
            .or(seq.1.then_some(LimitKind::SeqSpace));
        if let Some(kind) = hard {
            self.hard_reported = true;
            self.soft_reported = true;
            return Some(LifetimeEvent::Hard(kind));
        }
        if self.soft_reported {
            return None;
        }
        let soft = self
            .soft_hit(c, now)
            .or(seq.0.then_some(LimitKind::SeqSpace));
        if let Some(kind) = soft {
            self.soft_reported = true;
            return Some(LifetimeEvent::Soft(kind));
        }
        None
    }

    /// When the next time-based event is due (for the caller's timer), if any is pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.hard_reported {
            return None;
        }
        let soft = if self.soft_reported {
            None
        } else {
            self.cfg.soft_time
        };
        let t = match (soft, self.cfg.hard_time) {
            (Some(s), Some(h)) => s.min(h),
            (Some(s), None) => s,
            (None, Some(h)) => h,
            (None, None) => return None,
        };
        self.created.checked_add(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_then_hard_once_each() {
        let t0 = Instant::now();
        let cfg = LifetimeConfig {
            soft_time: Some(Duration::from_secs(10)),
            hard_time: Some(Duration::from_secs(20)),
            soft_bytes: Some(1000),
            hard_bytes: Some(2000),
            ..Default::default()
        };
        let mut l = Lifetime::new(cfg, t0);
        let mut c = Counters::default();
        assert_eq!(l.next_deadline(), Some(t0 + Duration::from_secs(10)));
        assert_eq!(l.poll(&c, t0, (false, false)), None);
        c.bytes = 1500;
        assert_eq!(
            l.poll(&c, t0, (false, false)),
            Some(LifetimeEvent::Soft(LimitKind::Bytes))
        );
        assert_eq!(
            l.poll(&c, t0 + Duration::from_secs(11), (false, false)),
            None
        );
        assert_eq!(l.next_deadline(), Some(t0 + Duration::from_secs(20)));
        assert!(l.volume_ok(&c));
        c.bytes = 2000;
        assert!(!l.volume_ok(&c));
        assert_eq!(
            l.poll(&c, t0, (false, false)),
            Some(LifetimeEvent::Hard(LimitKind::Bytes))
        );
        assert_eq!(
            l.poll(&c, t0 + Duration::from_secs(30), (false, false)),
            None
        );
        assert_eq!(l.next_deadline(), None);
    }

    #[test]
    fn resumed_lifetime_keeps_age_and_soft_state() {
        let t0 = Instant::now();
        let cfg = LifetimeConfig {
            soft_bytes: Some(1000),
            hard_bytes: Some(2000),
            hard_time: Some(Duration::from_secs(20)),
            ..Default::default()
        };
        let c = Counters {
            packets: 9,
            bytes: 1500,
        };
        let mut fresh = Lifetime::resume(cfg, t0, false);
        assert!(!fresh.soft_reported());
        assert_eq!(
            fresh.poll(&c, t0, (false, false)),
            Some(LifetimeEvent::Soft(LimitKind::Bytes))
        );
        assert!(fresh.soft_reported());
        let mut l = Lifetime::resume(cfg, t0, true);
        assert_eq!(l.created(), t0);
        assert_eq!(l.poll(&c, t0, (false, false)), None);
        assert_eq!(
            l.poll(&c, t0 + Duration::from_secs(20), (false, false)),
            Some(LifetimeEvent::Hard(LimitKind::Time))
        );
    }

    #[test]
    fn hard_time_without_soft() {
        let t0 = Instant::now();
        let cfg = LifetimeConfig {
            hard_time: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        let mut l = Lifetime::new(cfg, t0);
        let c = Counters::default();
        assert_eq!(
            l.poll(&c, t0 + Duration::from_secs(4), (false, false)),
            None
        );
        assert_eq!(
            l.poll(&c, t0 + Duration::from_secs(5), (false, false)),
            Some(LifetimeEvent::Hard(LimitKind::Time))
        );
    }

    #[test]
    fn seq_space_events() {
        let t0 = Instant::now();
        let mut l = Lifetime::new(LifetimeConfig::default(), t0);
        let c = Counters::default();
        assert_eq!(
            l.poll(&c, t0, (true, false)),
            Some(LifetimeEvent::Soft(LimitKind::SeqSpace))
        );
        assert_eq!(l.poll(&c, t0, (true, false)), None);
        assert_eq!(
            l.poll(&c, t0, (true, true)),
            Some(LifetimeEvent::Hard(LimitKind::SeqSpace))
        );
    }

    #[test]
    fn packet_limits() {
        let t0 = Instant::now();
        let cfg = LifetimeConfig {
            soft_packets: Some(2),
            hard_packets: Some(3),
            ..Default::default()
        };
        let mut l = Lifetime::new(cfg, t0);
        let c = Counters {
            packets: 3,
            bytes: 0,
        };
        assert!(!l.volume_ok(&c));
        // Both crossed at once: only the hard one is reported.
        assert_eq!(
            l.poll(&c, t0, (false, false)),
            Some(LifetimeEvent::Hard(LimitKind::Packets))
        );
        assert_eq!(l.poll(&c, t0, (false, false)), None);
    }
}
