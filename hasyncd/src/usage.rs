//! CHILD SA lifetimes across a takeover (sans-IO, driven by `now_ms`).
//!
//! The carrier's espd reports each SA's age and inner bytes in its `esp.seq` batches
//! (`usage`, only SAs whose bytes moved). [`UsageSync`] turns ikemgr's `sa.child` records
//! into sync records whose `lifetime` is what is left (ha-core's [`ChildLifetime`]: "left
//! when sent"), re-sending an SA's record at most every [`USAGE_SYNC_MS`] and only when its
//! bytes moved and it has a volume limit (or the record itself changed). A member that takes the tunnel over
//! subtracts the time since it received the record ([`left_now`]) and hands the rest to
//! ikemgr (`TakeoverInfo::lifetimes`), which installs the SA with those limits: soft and
//! hard lifetimes fire at the right total, not counted again from zero.

use std::collections::{BTreeMap, BTreeSet};

use bus_schema::schema::{ChildSaInfo, SaLifetime, SaUsage};
use ha_core::msg::{ChildLifetime, ChildSaSync, KeyBytes};

/// Shortest interval between two re-sends of usage-driven records.
pub const USAGE_SYNC_MS: u64 = 1_000;

/// What is left of `limit` after `used` (0: no limit; a limit used up leaves 1, so the
/// new carrier fires it at once instead of reading 0 as "none").
fn left(limit: u64, used: u64) -> u64 {
    if limit == 0 {
        0
    } else {
        limit.saturating_sub(used).max(1)
    }
}

/// ikemgr's CHILD SA record as an HA sync record, its lifetimes reduced by `age_s` seconds
/// and `bytes` inner bytes. The IKE SA SPIs are not in ikemgr's `sa.child` record (0 here)
/// and no routes are carried yet.
pub fn child_sync(c: &ChildSaInfo, age_s: u64, bytes: u64) -> ChildSaSync {
    let secs = |s: u64| u32::try_from(s).unwrap_or(u32::MAX);
    ChildSaSync {
        tunnel: c.tunnel.clone(),
        phase1: c.phase1.clone(),
        phase2: c.phase2.clone(),
        ike_spi_i: 0,
        ike_spi_r: 0,
        spi_in: c.spi_in,
        spi_out: c.spi_out,
        transform: c.transform.clone(),
        esn: c.esn,
        keys_in: KeyBytes(c.keys_in.clone()),
        keys_out: KeyBytes(c.keys_out.clone()),
        local_ts: c.local_ts.clone(),
        remote_ts: c.remote_ts.clone(),
        routes: Vec::new(),
        lifetime: ChildLifetime {
            soft_s: secs(left(c.lifetime.soft_secs, age_s)),
            hard_s: secs(left(c.lifetime.hard_secs, age_s)),
            soft_bytes: left(c.lifetime.soft_bytes, bytes),
            hard_bytes: left(c.lifetime.hard_bytes, bytes),
        },
        replay_window: c.replay_window,
    }
}

/// A standby copy's lifetimes `elapsed_ms` after it was received: what the SA has left now.
pub fn left_now(l: &ChildLifetime, elapsed_ms: u64) -> SaLifetime {
    let s = elapsed_ms / 1000;
    SaLifetime {
        soft_secs: left(u64::from(l.soft_s), s),
        hard_secs: left(u64::from(l.hard_s), s),
        soft_bytes: l.soft_bytes,
        hard_bytes: l.hard_bytes,
    }
}

/// One SA's last report: its age and bytes, and when (our clock) it came.
#[derive(Clone, Copy, Debug)]
struct Report {
    age_ms: u64,
    bytes: u64,
    at_ms: u64,
}

/// The carrier's side: espd's reports and the records last handed to the cluster.
#[derive(Default)]
pub struct UsageSync {
    reports: BTreeMap<String, Report>,
    /// SAs whose bytes moved since the last [`UsageSync::records`].
    moved: BTreeSet<String>,
    sent: BTreeMap<String, ChildSaSync>,
    last_ms: Option<u64>,
}

impl UsageSync {
    /// espd's `usage` of one `esp.seq` batch, received at `now_ms`.
    pub fn note(&mut self, usage: &[SaUsage], now_ms: u64) {
        for u in usage {
            let key = ChildSaInfo::key_of(&u.tunnel, u.spi_in);
            if self.reports.get(&key).is_some_and(|r| r.bytes == u.bytes) {
                continue;
            }
            self.reports.insert(
                key.clone(),
                Report {
                    age_ms: u.age_ms,
                    bytes: u.bytes,
                    at_ms: now_ms,
                },
            );
            self.moved.insert(key);
        }
    }

    /// True when some SA's bytes moved and the last records are [`USAGE_SYNC_MS`] old.
    pub fn due(&self, now_ms: u64) -> bool {
        !self.moved.is_empty()
            && self
                .last_ms
                .is_none_or(|t| now_ms.saturating_sub(t) >= USAGE_SYNC_MS)
    }

    /// The sync records of `children` (ikemgr's `sa.child` by `tunnel/spi_in`) at `now_ms`:
    /// an SA whose bytes did not move and whose record did not change keeps the record
    /// sent before (so it is not sent again); the others get their lifetimes left now. The
    /// whole set at once, the reference [`UsageSync::update`] keeps up to date by changes.
    #[cfg(test)]
    pub fn records(
        &mut self,
        children: &BTreeMap<String, ChildSaInfo>,
        now_ms: u64,
    ) -> BTreeMap<String, ChildSaSync> {
        let keys: BTreeSet<String> = children
            .keys()
            .chain(self.sent.keys())
            .chain(self.reports.keys())
            .cloned()
            .collect();
        self.update(children, keys, now_ms);
        self.sent.clone()
    }

    /// The records that differ from those handed out last, once `changed` (keys of
    /// `children`, ikemgr's `sa.child`, whose record changed, came or went) and the SAs
    /// whose bytes moved are brought up to `now_ms`; `None`: the SA is gone. Every other
    /// SA's record stays what it was: its record did not change and its bytes did not move,
    /// so [`UsageSync::records`] would keep it too. Costs what changed, not what is held.
    pub fn update(
        &mut self,
        children: &BTreeMap<String, ChildSaInfo>,
        changed: impl IntoIterator<Item = String>,
        now_ms: u64,
    ) -> Vec<(String, Option<ChildSaSync>)> {
        let moved = std::mem::take(&mut self.moved);
        let mut keys: BTreeSet<String> = changed.into_iter().collect();
        keys.extend(moved.iter().cloned());
        let mut out = Vec::new();
        for k in keys {
            let Some(c) = children.get(&k) else {
                self.reports.remove(&k);
                if self.sent.remove(&k).is_some() {
                    out.push((k, None));
                }
                continue;
            };
            let (age_s, bytes) = self.reports.get(&k).map_or((0, 0), |r| {
                (
                    r.age_ms.saturating_add(now_ms.saturating_sub(r.at_ms)) / 1000,
                    r.bytes,
                )
            });
            let fresh = child_sync(c, age_s, bytes);
            // Moving bytes matter only to an SA with a volume limit (the time left needs no
            // re-send: the receiver counts it from when the record arrived).
            let volume = c.lifetime.soft_bytes > 0 || c.lifetime.hard_bytes > 0;
            let keep = self.sent.get(&k).is_some_and(|old| {
                !(volume && moved.contains(&k))
                    && ChildSaSync {
                        lifetime: fresh.lifetime.clone(),
                        ..old.clone()
                    } == fresh
            });
            if !keep {
                self.sent.insert(k.clone(), fresh.clone());
                out.push((k, Some(fresh)));
            }
        }
        self.last_ms = Some(now_ms);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_schema::schema::EspEncap;

    fn child(lifetime: SaLifetime) -> ChildSaInfo {
        ChildSaInfo {
            tunnel: "vpn1".into(),
            phase1: "vpn1".into(),
            phase2: "vpn1".into(),
            spi_in: 0x10,
            spi_out: 0x20,
            transform: "aes128gcm".into(),
            esn: false,
            keys_in: vec![1; 20],
            keys_out: vec![2; 20],
            local: "10.0.0.1".into(),
            remote: "10.0.0.2".into(),
            encap: EspEncap::None,
            local_ts: vec!["10.1.0.0/24".into()],
            remote_ts: vec!["10.2.0.0/24".into()],
            replay_window: 2048,
            lifetime,
            initial_seq: 1,
            outbound: true,
        }
    }

    fn usage(age_ms: u64, bytes: u64) -> SaUsage {
        SaUsage {
            tunnel: "vpn1".into(),
            spi_in: 0x10,
            age_ms,
            bytes,
        }
    }

    const LIFE: SaLifetime = SaLifetime {
        soft_secs: 100,
        hard_secs: 120,
        soft_bytes: 4_480_000,
        hard_bytes: 5_120_000,
    };

    /// The carrier sends what is left; the member taking over subtracts the time since it
    /// received the record: the lifetimes fire at the right total.
    #[test]
    fn lifetimes_left_travel_to_the_new_carrier() {
        let children = BTreeMap::from([("vpn1/00000010".to_string(), child(LIFE))]);
        let mut u = UsageSync::default();
        // Installed at t=0 (espd's first batch at 200 ms), 30 s later 3 MB moved.
        u.note(&[usage(200, 0)], 200);
        let first = u.records(&children, 200);
        assert_eq!(first["vpn1/00000010"].lifetime.hard_s, 120);
        u.note(&[usage(30_000, 3_000_000)], 30_000);
        assert!(u.due(30_000));
        let rec = u.records(&children, 30_500)["vpn1/00000010"].clone();
        assert_eq!(
            rec.lifetime,
            ChildLifetime {
                soft_s: 70,
                hard_s: 90,
                soft_bytes: 1_480_000,
                hard_bytes: 2_120_000,
            }
        );
        // The standby received it at its own t=1000 and takes over 20 s later.
        let left = left_now(&rec.lifetime, 20_000);
        assert_eq!(
            left,
            SaLifetime {
                soft_secs: 50,
                hard_secs: 70,
                soft_bytes: 1_480_000,
                hard_bytes: 2_120_000,
            }
        );
        // Used up: 1 (fire at once), never 0 (which would mean no limit); no limit stays 0.
        let gone = left_now(&rec.lifetime, 200_000);
        assert_eq!((gone.soft_secs, gone.hard_secs), (1, 1));
        let none = child_sync(&child(SaLifetime::default()), 50, 9);
        assert_eq!(none.lifetime, ChildLifetime::default());
    }

    /// Records are re-sent only when the bytes moved (and at most every USAGE_SYNC_MS), not
    /// every time the age grows.
    #[test]
    fn idle_sas_are_not_sent_again() {
        let children = BTreeMap::from([("vpn1/00000010".to_string(), child(LIFE))]);
        let mut u = UsageSync::default();
        u.note(&[usage(200, 0)], 200);
        let a = u.records(&children, 200);
        // Same bytes later: nothing moved, the record stays as sent.
        u.note(&[usage(5_000, 0)], 5_000);
        assert!(!u.due(5_000));
        let b = u.records(&children, 60_000);
        assert_eq!(a, b);
        // Bytes moved, but the last records are too recent.
        u.note(&[usage(60_100, 10)], 60_100);
        assert!(!u.due(60_500));
        assert!(u.due(61_000));
        let c = u.records(&children, 61_000);
        assert_eq!(c["vpn1/00000010"].lifetime.hard_s, 59);
        // A changed record (ikemgr re-published it) gets its lifetimes left now.
        let mut moved = children.clone();
        moved.get_mut("vpn1/00000010").unwrap().remote_ts = vec!["10.3.0.0/24".into()];
        let d = u.records(&moved, 91_000);
        assert_eq!(d["vpn1/00000010"].lifetime.hard_s, 29);
        // Without a volume limit moving bytes send nothing again.
        let timed = SaLifetime {
            soft_bytes: 0,
            hard_bytes: 0,
            ..LIFE
        };
        let children = BTreeMap::from([("vpn1/00000010".to_string(), child(timed))]);
        let e = u.records(&children, 92_000);
        u.note(&[usage(100_000, 5_000)], 100_000);
        assert_eq!(u.records(&children, 101_000), e);
    }

    /// Kept up to date by changes (`update`, with the keys whose record changed), the
    /// records are those the whole-set computation (`records`) gives, at every step of a
    /// run of SAs coming, changing and going while espd reports bytes.
    #[test]
    fn records_kept_by_changes_are_the_whole_sets_records() {
        let mut whole = UsageSync::default();
        let mut inc = UsageSync::default();
        let mut kept: BTreeMap<String, ChildSaSync> = BTreeMap::new();
        let mut children: BTreeMap<String, ChildSaInfo> = BTreeMap::new();
        let mut next = crate::test_rng(0x2545_f491_4f6c_dd1d);
        for step in 0..2_000u64 {
            let now = step * 250;
            let mut changed = Vec::new();
            for _ in 0..next(3) {
                let spi = 0x10 + next(12) as u32;
                let key = ChildSaInfo::key_of("vpn1", spi);
                match next(4) {
                    0 => {
                        children.remove(&key);
                    }
                    n => {
                        let mut c = child(if n == 1 {
                            SaLifetime {
                                soft_bytes: 0,
                                hard_bytes: 0,
                                ..LIFE
                            }
                        } else {
                            LIFE
                        });
                        c.spi_in = spi;
                        c.spi_out = spi + 0x100 * (n as u32);
                        children.insert(key.clone(), c);
                    }
                }
                changed.push(key);
            }
            let reports: Vec<SaUsage> = (0..next(4))
                .map(|_| SaUsage {
                    spi_in: 0x10 + next(14) as u32,
                    ..usage(now, next(6_000_000))
                })
                .collect();
            whole.note(&reports, now);
            inc.note(&reports, now);
            let due = whole.due(now);
            assert_eq!(due, inc.due(now), "step {step}");
            if due || !changed.is_empty() {
                let want = whole.records(&children, now);
                let got = inc.update(&children, changed, now);
                for (k, v) in got {
                    match v {
                        Some(v) => kept.insert(k, v),
                        None => kept.remove(&k),
                    };
                }
                assert_eq!(kept, want, "step {step}");
            }
        }
    }
}
