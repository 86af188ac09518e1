//! IKEv2 message ID synchronisation for clusters, RFC 6311 §5.
//!
//! Both sides announce `IKEV2_MESSAGE_ID_SYNC_SUPPORTED` in IKE_AUTH; an SA restored from
//! an HA copy that may be behind (the old owner died with an exchange in flight, or before
//! its last message ID update was synced) sends [`IkeSa::sync_message_ids`]: an
//! INFORMATIONAL with message ID 0 carrying only `IKEV2_MESSAGE_ID_SYNC` with a nonce, M1
//! (our next request's ID) and P1 (the ID we expect on the peer's next request). The peer
//! answers, also with message ID 0, the nonce, P2 (its next request's ID) and M2 (the ID it
//! expects on our next request), and both sides continue from there. The exchange is
//! outside the normal window: it consumes no message ID, and no other request of ours
//! starts while it is outstanding.
//!
//! As responder (§5.1): a request whose M1 is below the next ID we expect (at or below the
//! highest we have seen) is dropped; otherwise M2 = max(M1, our next expected ID) and
//! P2 = max(P1, our next request's ID) are adopted and returned. A sync request from a peer
//! that did not announce support, or with anything beside the one notify, is dropped.
//!
//! # At most one synchronisation on an AEAD IKE SA
//! Both messages of the exchange carry message ID 0. A peer that derives its AEAD IVs
//! from message IDs (RFC 5282 §3.1 allows a counter; strongSwan keeps two strictly
//! increasing counters over everything it encrypts on the SA, and refuses to encrypt a
//! message whose ID would fit in neither: "encrypting encrypted payload failed, no IV",
//! then destroys the IKE SA) can encrypt a response with ID 0 only as long as it has not
//! done so before. Hence, on an AEAD IKE SA:
//! - no synchronisation once we have sent any request on the SA (the peer then encrypted
//!   a response with ID 0 already: [`MidSyncStart::AeadIvReuse`]);
//! - **at most one synchronisation in the SA's life**, by whichever cluster member: the
//!   fact that one was started is part of the replicated state
//!   ([`IkeSaSnapshot::mid_sync_spent`](super::IkeSaSnapshot)) and a copy that has it sends
//!   none ([`MidSyncStart::AlreadySynced`]). A copy can be behind (its update lost on the
//!   HA link), so a cluster member first *reserves* the synchronisation
//!   ([`IkeSa::reserve_mid_sync`]: the SA sends no request meanwhile) and sends it only
//!   once every live member has recorded the reservation (the driver's business: ikemgr
//!   uses hasyncd's acknowledged marks); a member taking over from a copy then learns it
//!   from the mark ([`IkeSa::adopt_mid_sync_mark`]) even when its copy is older.
//!
//! A rekeyed IKE SA has new keys (new IVs) and may be synchronised once again. With a
//! non-AEAD suite IVs are random (RFC 7296 §3.14) and any number of synchronisations is
//! harmless.
//!
//! When no synchronisation is sent, the restored SA keeps the copied message IDs and, as
//! responder, takes the peer's next authenticated request even if its ID is up to
//! [`MID_CATCH_UP`] above the one expected (the previous owner answered those between).

use std::time::{Duration, Instant};

use super::{find_notify, Event, IkeError, IkeSa, Result, State};
use crate::sa::Addresses;
use crate::wire::{ExchangeType, Message, MessageIdSync, NotifyPayload, NotifyType, Payload};

/// How far above the expected ID a restored SA takes the peer's first authenticated
/// request (requests the previous owner answered after the copy was made; strongSwan's
/// DPD sends one per `dpd_delay` of silence).
pub const MID_CATCH_UP: u32 = 64;

/// What [`IkeSa::sync_message_ids`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MidSyncStart {
    /// The request is on its way.
    Sent,
    /// The peer did not announce `IKEV2_MESSAGE_ID_SYNC_SUPPORTED`: nothing sent.
    NotSupported,
    /// Nothing sent: the IKE SA uses an AEAD cipher and the peer has already encrypted a
    /// response with message ID 0 (to our first request on this SA). A peer that builds
    /// its AEAD IVs from message IDs (RFC 5282 §3.1 allows a counter; strongSwan does)
    /// would have to reuse that IV for the synchronisation response: strongSwan refuses
    /// and destroys the IKE SA. Message IDs stay as copied.
    AeadIvReuse,
    /// Nothing sent: the IKE SA uses an AEAD cipher and a synchronisation was already
    /// started on it (here or by the member the copy came from): the peer's response would
    /// reuse message ID 0 (see the module's rule). Message IDs stay as copied.
    AlreadySynced,
    /// Nothing sent yet: the synchronisation is reserved ([`IkeSa::reserve_mid_sync`]);
    /// the SA starts no request until [`IkeSa::sync_message_ids`] or
    /// [`IkeSa::release_mid_sync`]. `next_send` is the M1 it will carry.
    Reserved {
        /// Our next request's ID after the synchronisation (M1).
        next_send: u32,
    },
}

/// Our outstanding synchronisation request.
pub(super) struct MidSyncOut {
    sent: MessageIdSync,
    bytes: Vec<u8>,
    tries: usize,
    deadline: Instant,
}

impl IkeSa {
    /// True when the peer announced `IKEV2_MESSAGE_ID_SYNC_SUPPORTED` in IKE_AUTH.
    pub fn peer_supports_mid_sync(&self) -> bool {
        self.peer_mid_sync
    }

    /// True while our synchronisation request is unanswered.
    pub fn mid_sync_pending(&self) -> bool {
        self.mid_sync.is_some()
    }

    /// Starts RFC 6311 message ID synchronisation on an established SA, as the cluster
    /// member that now carries it. `margin` is added to our next request's ID (M1), to
    /// step over requests the previous owner may have sent after the copy was made.
    /// Sends nothing when the peer did not announce support or when its response could
    /// reuse an AEAD IV ([`MidSyncStart`]); refused while one of our requests is
    /// outstanding (the copy has none).
    ///
    /// After [`IkeSa::reserve_mid_sync`] it sends the reserved synchronisation (`margin`
    /// is then ignored: M1 is the reserved one).
    pub fn sync_message_ids(&mut self, now: Instant, margin: u32) -> Result<MidSyncStart> {
        let m1 = match self.mid_sync_hold.take() {
            Some(m1) => m1,
            None => {
                if let Some(no) = self.mid_sync_refusal()? {
                    return Ok(no);
                }
                self.chan.next_send.saturating_add(margin)
            }
        };
        self.send_mid_sync(now, m1)
    }

    /// True when the IKE SA uses an AEAD cipher (at most one synchronisation).
    pub fn mid_sync_once_only(&self) -> bool {
        self.chan
            .keys
            .as_ref()
            .is_some_and(|k| k.suite.encr.is_aead())
    }

    /// Why no synchronisation may be sent now, if so.
    fn mid_sync_refusal(&self) -> Result<Option<MidSyncStart>> {
        if self.state != State::Established {
            return Err(IkeError::NotEstablished);
        }
        if !self.peer_mid_sync {
            return Ok(Some(MidSyncStart::NotSupported));
        }
        if self.mid_sync_once_only() {
            if self.chan.mid_sync_spent {
                return Ok(Some(MidSyncStart::AlreadySynced));
            }
            // Conservative: for the original initiator, request 0 was the unencrypted
            // IKE_SA_INIT, but a snapshot does not tell an original SA from a rekeyed one.
            if self.chan.next_send > 0 {
                return Ok(Some(MidSyncStart::AeadIvReuse));
            }
        }
        if self.chan.outstanding.is_some()
            || self.mid_sync.is_some()
            || self.mid_sync_hold.is_some()
        {
            return Err(IkeError::Internal("a request is outstanding"));
        }
        Ok(None)
    }

    /// Reserves a synchronisation, for a cluster member that must have every other live
    /// member record it before it goes out (the module's rule): when one may be sent, the
    /// SA counts it as started ([`IkeSaSnapshot::mid_sync_spent`](super::IkeSaSnapshot) in
    /// its next snapshot), starts no request of ours until [`IkeSa::sync_message_ids`]
    /// sends it or [`IkeSa::release_mid_sync`] gives it up, and returns the M1 it will
    /// carry (`next_send` + `margin`), which the cluster records. Otherwise returns why
    /// not, as `sync_message_ids` would.
    pub fn reserve_mid_sync(&mut self, margin: u32) -> Result<MidSyncStart> {
        if let Some(no) = self.mid_sync_refusal()? {
            return Ok(no);
        }
        let m1 = self.chan.next_send.saturating_add(margin);
        self.chan.mid_sync_spent = true;
        self.mid_sync_hold = Some(m1);
        Ok(MidSyncStart::Reserved { next_send: m1 })
    }

    /// Gives a reserved synchronisation up (the cluster did not record it in time): no
    /// request is sent, message IDs stay as they are, and the SA still counts the
    /// synchronisation as started (a member may have recorded it). Held requests start.
    pub fn release_mid_sync(&mut self, now: Instant) -> Result<()> {
        if self.mid_sync_hold.take().is_some() {
            self.kick(now)?;
        }
        Ok(())
    }

    /// True while a reserved synchronisation waits ([`IkeSa::reserve_mid_sync`]).
    pub fn mid_sync_reserved(&self) -> bool {
        self.mid_sync_hold.is_some()
    }

    /// True when a synchronisation was started on the current SA (here or, per its copy
    /// or a cluster mark, by another member).
    pub fn mid_sync_spent(&self) -> bool {
        self.chan.mid_sync_spent
    }

    /// A cluster member recorded that a synchronisation with M1 = `next_send` was started
    /// on this SA (a takeover from a copy that may be older than that mark): no other
    /// synchronisation on an AEAD SA, and our next request's ID is at least `next_send`
    /// (what the peer adopted, RFC 6311 §5.1: M2 = max(M1, its own)).
    pub fn adopt_mid_sync_mark(&mut self, next_send: u32) {
        self.chan.mid_sync_spent = true;
        if next_send > self.chan.next_send {
            self.chan.next_send = next_send;
            self.emit_mid();
        }
    }

    fn send_mid_sync(&mut self, now: Instant, m1: u32) -> Result<MidSyncStart> {
        if self.state != State::Established {
            return Err(IkeError::NotEstablished);
        }
        if self.chan.outstanding.is_some() || self.mid_sync.is_some() {
            return Err(IkeError::Internal("a request is outstanding"));
        }
        self.chan.mid_sync_spent = true;
        let mut n = [0u8; 4];
        self.entropy.fill(&mut n)?;
        let sent = MessageIdSync {
            nonce: u32::from_be_bytes(n),
            send: m1,
            recv: self.chan.next_recv,
        };
        let p = [Payload::Notify(NotifyPayload::new(
            NotifyType::IKEV2_MESSAGE_ID_SYNC,
            sent.encode(),
        ))];
        let bytes = self.seal(false, ExchangeType::INFORMATIONAL, 0, false, &p)?;
        let first = self.first_timeout();
        self.mid_sync = Some(MidSyncOut {
            sent,
            bytes: bytes.clone(),
            tries: 0,
            deadline: now + first,
        });
        self.push_transmit(bytes);
        Ok(MidSyncStart::Sent)
    }

    fn first_timeout(&self) -> Duration {
        self.cfg
            .retransmit
            .timeouts
            .first()
            .copied()
            .unwrap_or(Duration::from_secs(2))
    }

    /// Deadline of our synchronisation request.
    pub(super) fn mid_sync_deadline(&self) -> Option<Instant> {
        self.mid_sync.as_ref().map(|m| m.deadline)
    }

    /// Retransmits our synchronisation request on the usual schedule; when the schedule is
    /// exhausted the peer is gone: the SA closes (returns true).
    ///
    /// On an AEAD IKE SA the request is never sent twice: a peer that got it and whose
    /// answer went astray (it reached the member that still carries the tunnel, or was lost)
    /// would have to encrypt a second response with message ID 0, which strongSwan refuses
    /// ("no IV") before destroying the IKE SA. Once the first retransmission would be due,
    /// the SA continues with the IDs the request proposed, which are those the peer adopted
    /// if it got it (RFC 6311 §5.1: M2 = max(M1, its own), and M1 steps over the requests
    /// the copy may have missed; P1 is the ID we expect, and a restored SA takes the
    /// peer's next request up to [`MID_CATCH_UP`] above it). [`Event::MessageIdSyncUnanswered`]
    /// says so.
    pub(super) fn mid_sync_timeout(&mut self, now: Instant) -> bool {
        let once_only = self.mid_sync_once_only();
        let timeouts = &self.cfg.retransmit.timeouts;
        let Some(m) = self.mid_sync.as_mut() else {
            return false;
        };
        if m.deadline > now {
            return false;
        }
        if once_only {
            let sent = m.sent;
            self.mid_sync = None;
            self.chan.next_send = self.chan.next_send.max(sent.send);
            self.chan.next_recv = self.chan.next_recv.max(sent.recv);
            self.chan.last_response = None;
            self.chan.catch_up = true;
            self.events.push_back(Event::MessageIdSyncUnanswered {
                next_send: self.chan.next_send,
                next_recv: self.chan.next_recv,
            });
            self.emit_mid();
            // Requests held behind the synchronisation go now (a failure to start one
            // surfaces when it is asked for again, as for every other timer).
            let _ = self.kick(now);
            return false;
        }
        m.tries += 1;
        if let Some(wait) = timeouts.get(m.tries) {
            m.deadline = now + *wait;
            let bytes = m.bytes.clone();
            self.push_transmit(bytes);
            return false;
        }
        self.mid_sync = None;
        self.close(super::DeleteReason::Timeout);
        true
    }

    /// A response with message ID 0 to our synchronisation request: adopt the peer's
    /// counters (never below what we sent).
    pub(super) fn mid_sync_response(
        &mut self,
        now: Instant,
        path: Addresses,
        data: &[u8],
        msg: &Message,
    ) -> Result<()> {
        let sent = self
            .mid_sync
            .as_ref()
            .map(|m| m.sent)
            .ok_or(IkeError::Unexpected("response without request"))?;
        let payloads = self.decrypt(false, data, msg)??;
        let n = find_notify(&payloads, NotifyType::IKEV2_MESSAGE_ID_SYNC).ok_or(
            IkeError::Unexpected("MESSAGE_ID_SYNC response without the notify"),
        )?;
        let got = MessageIdSync::decode(&n.data)?;
        if got.nonce != sent.nonce {
            return Err(IkeError::Unexpected("MESSAGE_ID_SYNC nonce"));
        }
        self.last_peer_activity = Some(now);
        self.note_path(path);
        self.mid_sync = None;
        // The peer's P2 is its next request's ID (ours to expect), its M2 the ID it
        // expects on our next request.
        self.chan.next_send = got.recv.max(sent.send);
        self.chan.next_recv = got.send.max(sent.recv);
        self.chan.last_response = None;
        self.chan.catch_up = false;
        self.events.push_back(Event::MessageIdsSynced {
            initiated: true,
            next_send: self.chan.next_send,
            next_recv: self.chan.next_recv,
        });
        self.emit_mid();
        self.kick(now)
    }

    /// True when `msg` (a request, message ID 0) may be a synchronisation request we
    /// should look at: INFORMATIONAL on the current SA, established, support announced.
    pub(super) fn may_be_mid_sync(&self, old: bool, msg: &Message) -> bool {
        !old && msg.header.message_id == 0
            && msg.header.exchange == ExchangeType::INFORMATIONAL
            && self.state == State::Established
            && self.peer_mid_sync
    }

    /// A request with message ID 0 that may be the peer's synchronisation request.
    /// `Ok(true)`: it was one and is answered; `Ok(false)`: it is not one (the caller
    /// handles it as an ordinary request).
    pub(super) fn mid_sync_request(
        &mut self,
        now: Instant,
        path: Addresses,
        data: &[u8],
        msg: &Message,
    ) -> Result<bool> {
        let payloads = match self.decrypt(false, data, msg)? {
            Ok(p) => p,
            Err(_) => return Ok(false),
        };
        let only_sync = matches!(
            payloads.as_slice(),
            [Payload::Notify(n)] if n.ty == NotifyType::IKEV2_MESSAGE_ID_SYNC
        );
        if !only_sync {
            return Ok(false);
        }
        let n = find_notify(&payloads, NotifyType::IKEV2_MESSAGE_ID_SYNC)
            .ok_or(IkeError::Unexpected("MESSAGE_ID_SYNC"))?;
        let got = MessageIdSync::decode(&n.data)?;
        // §5.1: M1 at or below the highest ID seen from the cluster is dropped.
        if got.send < self.chan.next_recv {
            return Err(IkeError::Unexpected("MESSAGE_ID_SYNC below the IDs seen"));
        }
        self.last_peer_activity = Some(now);
        self.note_path(path);
        let m2 = got.send.max(self.chan.next_recv);
        let p2 = got.recv.max(self.chan.next_send);
        self.chan.next_recv = m2;
        self.chan.next_send = p2;
        self.chan.last_response = None;
        let reply = MessageIdSync {
            nonce: got.nonce,
            send: p2,
            recv: m2,
        };
        let p = [Payload::Notify(NotifyPayload::new(
            NotifyType::IKEV2_MESSAGE_ID_SYNC,
            reply.encode(),
        ))];
        let bytes = self.seal(false, ExchangeType::INFORMATIONAL, 0, true, &p)?;
        self.push_transmit(bytes);
        self.events.push_back(Event::MessageIdsSynced {
            initiated: false,
            next_send: p2,
            next_recv: m2,
        });
        self.emit_mid();
        Ok(true)
    }
}
