//! Sync lag per peer: how long ago this member applied the last update a peer sent it.
//!
//! **Definition.** For each peer `p` (its member id) and link `l` (`fgcp`, `fgsp`),
//! `hasyncd_sync_lag_seconds{link=l, peer=p}` is `now - t`, where `t` is when this member
//! last *applied* a sync update from `p` received over `l`: a datagram that authenticated,
//! passed the replay check, decoded, and carried anything but a heartbeat (an IKE SA,
//! message IDs, a CHILD SA, a deletion, a sequence lease or its acknowledgement, an
//! ownership claim, a snapshot). Heartbeats do not count: they say the peer is alive, not
//! that this member's copies follow it. Both times are this member's monotonic clock, so
//! the value needs no clock agreement between members. The series appears at the first
//! update from that peer and is refreshed on every daemon tick; after the peer is gone it
//! keeps growing (its last update gets older). `hasyncd_sync_updates_applied_total{link,
//! peer}` counts the updates.
//!
//! **Reading it.** The carrier sends an update after every IKE exchange (DPD probes
//! included), every CHILD SA change and every sequence lease, so on a secondary the lag is
//! at most the time between two such events on the carrier plus the link's transit time.
//! A lag that keeps growing while the carrier's tunnels change (its
//! `hasyncd_sync_messages_sent_total` grows faster than its heartbeats) means updates
//! are lost or rejected (see `hasyncd_link_drops_total`). On an idle cluster (no exchange,
//! no rekey, no lease) it grows legitimately: it is an age, not a queue length.

use std::collections::BTreeMap;

use ha_core::MemberId;

/// Last update applied per (link, peer), in ms of the daemon's clock.
#[derive(Default)]
pub struct SyncLag {
    last_ms: BTreeMap<(&'static str, u32), u64>,
}

impl SyncLag {
    /// An update from `peer` over `link` was applied at `now_ms`.
    pub fn applied(&mut self, link: &'static str, peer: MemberId, now_ms: u64) {
        self.last_ms.insert((link, peer.0), now_ms);
        metrics::counter!(
            "hasyncd_sync_updates_applied_total",
            "link" => link,
            "peer" => peer.0.to_string()
        )
        .increment(1);
    }

    /// The lag of every peer heard at `now_ms`, in seconds: `(link, peer, lag)`.
    pub fn lags(&self, now_ms: u64) -> Vec<(&'static str, u32, f64)> {
        self.last_ms
            .iter()
            .map(|((link, peer), t)| (*link, *peer, now_ms.saturating_sub(*t) as f64 / 1000.0))
            .collect()
    }

    /// Sets the gauges for `now_ms`.
    pub fn publish(&self, now_ms: u64) {
        for (link, peer, lag) in self.lags(now_ms) {
            metrics::gauge!("hasyncd_sync_lag_seconds", "link" => link, "peer" => peer.to_string())
                .set(lag);
        }
    }
}

/// Registers the descriptions of the lag series.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_gauge!(
        "hasyncd_sync_lag_seconds",
        Unit::Seconds,
        "Seconds since this member applied the last sync update (not a heartbeat) from a peer, by link and peer."
    );
    describe_counter!(
        "hasyncd_sync_updates_applied_total",
        Unit::Count,
        "Sync updates (not heartbeats) applied from a peer, by link and peer."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_last_update_per_link_and_peer() {
        let mut l = SyncLag::default();
        assert!(
            l.lags(1_000).is_empty(),
            "no series before the first update"
        );
        l.applied("fgcp", MemberId(7), 1_000);
        l.applied("fgsp", MemberId(2), 1_500);
        assert_eq!(
            l.lags(3_250),
            vec![("fgcp", 7, 2.25), ("fgsp", 2, 1.75)],
            "per link and peer"
        );
        // A newer update resets that peer's lag only.
        l.applied("fgcp", MemberId(7), 3_000);
        assert_eq!(l.lags(3_250), vec![("fgcp", 7, 0.25), ("fgsp", 2, 1.75)]);
        // A clock that went backwards gives 0, not a wrap.
        assert_eq!(l.lags(0), vec![("fgcp", 7, 0.0), ("fgsp", 2, 0.0)]);
    }
}
