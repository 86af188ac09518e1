//! Simultaneous IKE SA rekeying (RFC 7296 §2.8.2): the two extra SPI pairs
//! a collision creates. While our own IKE rekey is outstanding, the peer's
//! new SA waits in `ike_collision`; when both exchanges are done the one
//! created with the lowest of the four nonces is redundant and is deleted by
//! its creator, the other inherits the CHILD SAs. The redundant SA lives in
//! `redundant` until its Delete exchange ends. If the peer completed its
//! rekey without noticing ours (it refuses ours with TEMPORARY_FAILURE, or
//! deletes the old SA), its new SA simply becomes the successor.

use super::*;

impl IkeSa {
    /// True when the SPIs are those of the colliding or redundant new SA.
    pub(super) fn is_side_channel(&self, spi_i: u64, spi_r: u64) -> bool {
        let is = |c: &Channel| c.spi_i == spi_i && c.spi_r == spi_r;
        self.ike_collision.as_ref().is_some_and(|(c, _)| is(c))
            || self.redundant.as_ref().is_some_and(is)
    }

    fn take_side_channel(&mut self, spi_i: u64, spi_r: u64) -> Option<Channel> {
        let is = |c: &Channel| c.spi_i == spi_i && c.spi_r == spi_r;
        if self.redundant.as_ref().is_some_and(is) {
            return self.redundant.take();
        }
        if self.ike_collision.as_ref().is_some_and(|(c, _)| is(c)) {
            return self.ike_collision.take().map(|(c, _)| c);
        }
        None
    }

    fn side_deleted(&mut self, ch: &Channel) {
        self.events.push_back(Event::IkeSaDeleted {
            spi_i: ch.spi_i,
            spi_r: ch.spi_r,
            reason: DeleteReason::Redundant,
        });
    }

    /// A message on a redundant (or not yet resolved colliding) new SA: the
    /// answer to our Delete of it, or the peer's Delete of it. Anything else
    /// is dropped; the SA carries nothing else.
    pub(super) fn handle_side(&mut self, now: Instant, data: &[u8], msg: Message) -> Result<()> {
        let h = &msg.header;
        let Some(mut ch) = self.take_side_channel(h.spi_i, h.spi_r) else {
            return Err(IkeError::WrongSa);
        };
        if h.flags.initiator() == ch.initiator {
            self.put_side_back(ch);
            return Err(IkeError::Unexpected("initiator flag"));
        }
        let payloads = match open_on(&ch, data, &msg) {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                self.put_side_back(ch);
                return Err(IkeError::Decode(e));
            }
            Err(e) => {
                self.put_side_back(ch);
                return Err(e);
            }
        };
        self.last_peer_activity = Some(now);
        if h.flags.response() {
            let ours = ch
                .outstanding
                .as_ref()
                .is_some_and(|o| o.mid == h.message_id);
            if !ours {
                self.put_side_back(ch);
                return Err(IkeError::Unexpected("response on a redundant IKE SA"));
            }
            // Our Delete of the redundant SA was answered.
            self.side_deleted(&ch);
            return Ok(());
        }
        let deletes_it = h.exchange == ExchangeType::INFORMATIONAL
            && payloads
                .iter()
                .any(|x| matches!(x, Payload::Delete(d) if d.protocol == ProtocolId::IKE));
        if !deletes_it || h.message_id != ch.next_recv {
            self.put_side_back(ch);
            return Err(IkeError::Unexpected("request on a redundant IKE SA"));
        }
        // §1.4.1: an empty INFORMATIONAL response, then the SA is gone.
        let bytes = seal_on(
            &mut *self.entropy,
            &ch,
            ExchangeType::INFORMATIONAL,
            h.message_id,
            true,
            &[],
        )?;
        self.push_transmit(bytes);
        ch.outstanding = None;
        self.side_deleted(&ch);
        Ok(())
    }

    /// Keeps the peer's redundant SA until the peer deletes it, or until the
    /// peer's retransmission schedule would have run out.
    pub(super) fn await_redundant_delete(&mut self, now: Instant, ch: Channel) {
        let wait = self.cfg.retransmit.timeouts.iter().sum::<Duration>();
        self.redundant = Some(ch);
        self.redundant_until = Some(now + wait);
    }

    fn put_side_back(&mut self, ch: Channel) {
        if self.redundant.is_none() {
            self.redundant = Some(ch);
        }
    }

    /// Deletes `ch`, a redundant SA we created, over itself.
    pub(super) fn delete_redundant(&mut self, now: Instant, mut ch: Channel) -> Result<()> {
        let mid = ch.next_send;
        let del = [Payload::Delete(DeletePayload {
            protocol: ProtocolId::IKE,
            spi_size: 0,
            spis: Vec::new(),
        })];
        let bytes = seal_on(
            &mut *self.entropy,
            &ch,
            ExchangeType::INFORMATIONAL,
            mid,
            false,
            &del,
        )?;
        ch.next_send = mid.wrapping_add(1);
        let first = self
            .cfg
            .retransmit
            .timeouts
            .first()
            .copied()
            .unwrap_or(Duration::from_secs(2));
        ch.outstanding = Some(Box::new(Outstanding {
            mid,
            bytes: bytes.clone(),
            task: Task::DeleteIke,
            tries: 0,
            deadline: now + first,
            reseal: None,
        }));
        self.redundant = Some(ch);
        self.redundant_until = None;
        self.push_transmit(bytes);
        Ok(())
    }

    /// Retransmits our Delete of a redundant SA; gives up after the schedule.
    pub(super) fn redundant_timeout(&mut self, now: Instant) {
        if self.redundant.is_some() && self.redundant_until.is_some_and(|t| t <= now) {
            self.redundant_until = None;
            if let Some(r) = self.redundant.take() {
                self.side_deleted(&r);
            }
            return;
        }
        let timeouts = &self.cfg.retransmit.timeouts;
        let Some(o) = self.redundant.as_mut().and_then(|r| r.outstanding.as_mut()) else {
            return;
        };
        if o.deadline > now {
            return;
        }
        o.tries += 1;
        match timeouts.get(o.tries) {
            Some(wait) => {
                o.deadline = now + *wait;
                let bytes = o.bytes.clone();
                self.push_transmit(bytes);
            }
            None => {
                if let Some(r) = self.redundant.take() {
                    self.side_deleted(&r);
                }
            }
        }
    }
}

/// Header for a message on channel `ch`.
fn header_on(ch: &Channel, exchange: ExchangeType, mid: u32, response: bool) -> Header {
    Header {
        spi_i: ch.spi_i,
        spi_r: ch.spi_r,
        next_payload: PayloadType::NONE,
        version: IKEV2_VERSION,
        exchange,
        flags: Flags::new(ch.initiator, response),
        message_id: mid,
        length: 0,
    }
}

/// Encrypts `payloads` with `ch`'s keys.
fn seal_on(
    entropy: &mut dyn Entropy,
    ch: &Channel,
    exchange: ExchangeType,
    mid: u32,
    response: bool,
    payloads: &[Payload],
) -> Result<Vec<u8>> {
    let keys = ch.keys.as_ref().ok_or(IkeError::NotEstablished)?;
    let mut iv = vec![0u8; keys.suite.encr.iv_len()];
    entropy.fill(&mut iv)?;
    let mut inner = Vec::new();
    let first = encode_chain(payloads, &mut inner);
    let header = header_on(ch, exchange, mid, response);
    Ok(keys.out.seal(&header, first, &inner, &iv)?)
}

/// Verifies and decrypts a message of `ch`.
fn open_on(
    ch: &Channel,
    data: &[u8],
    msg: &Message,
) -> Result<std::result::Result<Vec<Payload>, DecodeError>> {
    let keys = ch.keys.as_ref().ok_or(IkeError::NotEstablished)?;
    let (first, off) = match (msg.payloads.last(), msg.sk_offset) {
        (Some(Payload::Sk { first_inner, .. }), Some(off)) => (*first_inner, off),
        _ => return Err(IkeError::Unexpected("missing SK payload")),
    };
    let inner = keys.inb.open(data, off)?;
    Ok(match decode_chain(first, &inner) {
        Ok((_, Some(_))) => Err(DecodeError::InvalidSyntax("nested SK payload")),
        Ok((payloads, None)) => Ok(payloads),
        Err(e) => Err(e),
    })
}
