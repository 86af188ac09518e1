//! Peer liveness for FGSP members (FGCP members get it from [`crate::election::Fgcp`]): a
//! peer is up from its first authenticated message and lost after `lost_after_ms` of
//! silence. Feed [`PeerEvent`]s to [`crate::fgsp::TunnelTable::peer_joined`] /
//! [`crate::fgsp::TunnelTable::peer_lost`].

use std::collections::BTreeMap;

use crate::wire::MemberId;

/// A change of a peer's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// First message, or first after being lost.
    Up(MemberId),
    /// Silent for the configured span.
    Lost(MemberId),
}

/// Last-heard times of the peers.
#[derive(Debug, Clone)]
pub struct Liveness {
    lost_after_ms: u64,
    last_rx: BTreeMap<MemberId, u64>,
}

impl Liveness {
    /// Peers are lost after `lost_after_ms` without a message (e.g. heartbeat interval
    /// times lost threshold).
    pub fn new(lost_after_ms: u64) -> Self {
        Liveness {
            lost_after_ms: lost_after_ms.max(1),
            last_rx: BTreeMap::new(),
        }
    }

    /// Any authenticated message from `peer` at `now_ms`.
    pub fn heard(&mut self, peer: MemberId, now_ms: u64) -> Option<PeerEvent> {
        match self.last_rx.insert(peer, now_ms) {
            None => Some(PeerEvent::Up(peer)),
            Some(_) => None,
        }
    }

    /// Peers silent for too long at `now_ms`, removed and reported.
    pub fn handle_timeout(&mut self, now_ms: u64) -> Vec<PeerEvent> {
        let lost: Vec<MemberId> = self
            .last_rx
            .iter()
            .filter(|(_, &t)| now_ms.saturating_sub(t) >= self.lost_after_ms)
            .map(|(m, _)| *m)
            .collect();
        for m in &lost {
            self.last_rx.remove(m);
        }
        lost.into_iter().map(PeerEvent::Lost).collect()
    }

    /// When the next peer would be lost.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.last_rx
            .values()
            .map(|t| t.saturating_add(self.lost_after_ms))
            .min()
    }

    /// Peers currently up.
    pub fn peers(&self) -> impl Iterator<Item = MemberId> + '_ {
        self.last_rx.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_then_lost_then_up_again() {
        let mut l = Liveness::new(1200);
        assert_eq!(l.heard(MemberId(2), 0), Some(PeerEvent::Up(MemberId(2))));
        assert_eq!(l.heard(MemberId(2), 200), None);
        assert_eq!(l.poll_timeout(), Some(1400));
        assert!(l.handle_timeout(1399).is_empty());
        assert_eq!(l.handle_timeout(1400), vec![PeerEvent::Lost(MemberId(2))]);
        assert_eq!(l.peers().count(), 0);
        assert_eq!(l.poll_timeout(), None);
        assert_eq!(l.heard(MemberId(2), 1500), Some(PeerEvent::Up(MemberId(2))));
    }
}
