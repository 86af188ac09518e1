//! The exchanges: IKE_SA_INIT and IKE_AUTH (§1.2), CREATE_CHILD_SA (§1.3)
//! and INFORMATIONAL (§1.4), each as request building on one side and
//! request/response processing on the other.

use super::*;
use crate::crypto::ChildKeys;
use crate::wire::IdType;

/// Parts of a responder's CHILD SA answer.
struct ChildReply {
    sa: Payload,
    ke: Option<Payload>,
    tsi: Payload,
    tsr: Payload,
}

type NotifyErr = (NotifyType, Vec<u8>);

/// Delay before retrying a failed rekey: 2 s plus up to 8 s at random, so
/// two peers that refused each other's simultaneous rekeys do not collide
/// again (independent of the configured jitter, which may be zero).
fn sa_retry_delay(sa: &mut IkeSa) -> Duration {
    let mut b = [0u8; 2];
    let r = if sa.entropy.fill(&mut b).is_ok() {
        u64::from(u16::from_be_bytes(b)) % 8000
    } else {
        4000
    };
    Duration::from_millis(2000 + r)
}

/// `peerid` check: string identities (FQDN, RFC822, KEY_ID) match on their
/// text whatever type the peer chose, as FortiOS compares `peerid`
/// strings; other types must match exactly.
pub(super) fn id_matches(want: &IdPayload, got: &IdPayload) -> bool {
    let textual = |t| matches!(t, IdType::FQDN | IdType::RFC822_ADDR | IdType::KEY_ID);
    if textual(want.id_type) && textual(got.id_type) {
        want.data == got.data
    } else {
        want == got
    }
}

fn notify(ty: NotifyType) -> Payload {
    Payload::Notify(NotifyPayload::new(ty, Vec::new()))
}

impl IkeSa {
    fn ike_info(&self, ch: &Channel) -> Option<IkeSaInfo> {
        let k = ch.keys.as_ref()?;
        Some(IkeSaInfo {
            spi_i: ch.spi_i,
            spi_r: ch.spi_r,
            initiator: ch.initiator,
            suite: k.suite,
            local_id: self.cfg.local_id.clone(),
            remote_id: self.remote_id.clone()?,
            local_behind_nat: self.nat.0,
            remote_behind_nat: self.nat.1,
            lifetime: self.cfg.ike_lifetime,
        })
    }

    pub(super) fn ike_info_current(&self) -> Option<IkeSaInfo> {
        self.ike_info(&self.chan)
    }

    fn jitter(&mut self) -> Duration {
        let ms = u64::try_from(self.cfg.rekey_jitter.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return Duration::ZERO;
        }
        let mut b = [0u8; 8];
        if self.entropy.fill(&mut b).is_err() {
            return Duration::ZERO;
        }
        Duration::from_millis(u64::from_be_bytes(b) % ms)
    }

    fn soft_after(&mut self, lifetime: Duration) -> Duration {
        let early = self.cfg.rekey_margin + self.jitter();
        lifetime
            .checked_sub(early)
            .filter(|d| *d >= lifetime / 2)
            .unwrap_or(lifetime / 2)
    }

    fn set_ike_lifetimes(&mut self, now: Instant) {
        let life = self.cfg.ike_lifetime;
        let soft = self.soft_after(life);
        self.ike_hard = Some(now + life);
        self.ike_soft = Some(now + soft);
    }

    fn establish(&mut self, now: Instant, proof: AuthVerified, remote_id: IdPayload) {
        self.auth = Some(proof);
        self.remote_id = Some(remote_id);
        self.state = State::Established;
        self.set_ike_lifetimes(now);
        if let Some(info) = self.ike_info(&self.chan) {
            self.events.push_back(Event::IkeSaEstablished(info));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn install_child(
        &mut self,
        now: Instant,
        _proof: AuthVerified,
        suite: EspSuite,
        inbound_spi: u32,
        outbound_spi: u32,
        keys: ChildKeys,
        initiator: bool,
        local_ts: Vec<TrafficSelector>,
        remote_ts: Vec<TrafficSelector>,
        rekey_of: Option<u32>,
        policy: usize,
    ) {
        let ChildKeys {
            encr_i,
            integ_i,
            encr_r,
            integ_r,
        } = keys;
        let keys = if initiator {
            ChildSaKeys {
                encr_in: encr_r,
                integ_in: integ_r,
                encr_out: encr_i,
                integ_out: integ_i,
            }
        } else {
            ChildSaKeys {
                encr_in: encr_i,
                integ_in: integ_i,
                encr_out: encr_r,
                integ_out: integ_r,
            }
        };
        let lifetime = self
            .cfg
            .policy(policy)
            .map_or(self.cfg.child_lifetime, |p| p.lifetime);
        let soft = self.soft_after(lifetime);
        let info = ChildSaInfo {
            ike_spi_i: self.chan.spi_i,
            ike_spi_r: self.chan.spi_r,
            inbound_spi,
            outbound_spi,
            encr: suite.encr,
            integ: suite.integ,
            esn: suite.esn,
            pfs_group: suite.dh,
            keys,
            local_ts,
            remote_ts,
            lifetime,
            soft_lifetime: soft,
            rekey_of,
            initiator,
            policy,
        };
        // Room for this one only: a Vec grows to four at once, 1 KB an SA kept for ever.
        self.children.reserve_exact(1);
        self.children.push(ChildSa {
            info: info.clone(),
            soft: now + soft,
            hard: now + lifetime,
            rekeying: false,
            replaced: false,
            collision: None,
        });
        self.events
            .push_back(Event::ChildSaEstablished(Box::new(info)));
    }

    fn child_mut(&mut self, inbound: u32) -> Option<&mut ChildSa> {
        self.children
            .iter_mut()
            .find(|c| c.info.inbound_spi == inbound)
    }

    // ------------------------------------------------------------------
    // Responses (we are the requester)
    // ------------------------------------------------------------------

    pub(super) fn handle_response(
        &mut self,
        now: Instant,
        path: Addresses,
        old: bool,
        data: &[u8],
        msg: Message,
    ) -> Result<()> {
        let mid = msg.header.message_id;
        if !old
            && mid == 0
            && self.mid_sync.is_some()
            && msg.header.exchange == ExchangeType::INFORMATIONAL
        {
            return self.mid_sync_response(now, path, data, &msg);
        }
        let ch = if old {
            self.old.as_ref().ok_or(IkeError::WrongSa)?
        } else {
            &self.chan
        };
        let o = ch
            .outstanding
            .as_ref()
            .ok_or(IkeError::Unexpected("response without request"))?;
        if o.mid != mid {
            return Err(IkeError::InvalidMessageId {
                got: mid,
                expected: o.mid,
            });
        }
        if msg.header.exchange == ExchangeType::IKE_SA_INIT {
            if old || !matches!(o.task, Task::Init) {
                return Err(IkeError::Unexpected("IKE_SA_INIT response"));
            }
            return self.init_response(now, data, &msg);
        }
        let expected_exchange = match o.task {
            Task::Init => ExchangeType::IKE_SA_INIT,
            Task::Auth => ExchangeType::IKE_AUTH,
            Task::Liveness | Task::DeleteChild | Task::DeleteIke => ExchangeType::INFORMATIONAL,
            Task::CreateChild { .. } | Task::RekeyIke { .. } => ExchangeType::CREATE_CHILD_SA,
        };
        if msg.header.exchange != expected_exchange {
            return Err(IkeError::Unexpected("exchange type of response"));
        }
        let payloads = self.decrypt(old, data, &msg)??;
        self.last_peer_activity = Some(now);
        self.note_path(path);
        if old {
            // Only our Delete of the rekeyed SA is ever outstanding there.
            if let Some(o) = self.old.take() {
                self.events.push_back(Event::IkeSaDeleted {
                    spi_i: o.spi_i,
                    spi_r: o.spi_r,
                    reason: DeleteReason::Rekeyed,
                });
            }
            return self.kick(now);
        }
        let task = self
            .chan
            .outstanding
            .take()
            .map(|o| o.task)
            .ok_or(IkeError::Unexpected("response without request"))?;
        match task {
            Task::Init => return Err(IkeError::Unexpected("IKE_SA_INIT task")),
            Task::Auth => self.auth_response(now, &payloads)?,
            Task::Liveness => self.events.push_back(Event::LivenessReply),
            Task::DeleteChild => {}
            Task::DeleteIke => {
                self.close(DeleteReason::Local);
                return Ok(());
            }
            Task::CreateChild {
                spi,
                ni,
                kex,
                rekey_of,
                policy,
            } => self.create_child_response(now, spi, ni, kex, rekey_of, policy, &payloads)?,
            Task::RekeyIke { spi, ni, kex } => {
                self.rekey_ike_response(now, spi, ni, kex, &payloads)?
            }
        }
        self.kick(now)
    }

    fn init_response(&mut self, now: Instant, data: &[u8], msg: &Message) -> Result<()> {
        let p = &msg.payloads;
        let h = &msg.header;
        if let Some(n) = find_notify(p, NotifyType::COOKIE) {
            let hs = self
                .hs
                .as_mut()
                .ok_or(IkeError::Unexpected("no handshake"))?;
            // §2.6: resend IKE_SA_INIT with the cookie first, same nonce and KE.
            if n.data.is_empty() || n.data.len() > 64 || hs.cookie_rounds >= MAX_COOKIE_ROUNDS {
                return Err(IkeError::Unexpected("cookie"));
            }
            hs.cookie_rounds += 1;
            hs.cookie = Some(n.data.clone());
            self.chan.outstanding = None;
            return self.send_init(now);
        }
        if let Some(n) = find_notify(p, NotifyType::INVALID_KE_PAYLOAD) {
            let group = <[u8; 2]>::try_from(n.data.as_slice())
                .map(|b| DhGroup(u16::from_be_bytes(b)))
                .map_err(|_| IkeError::Unexpected("INVALID_KE_PAYLOAD data"))?;
            let hs = self
                .hs
                .as_mut()
                .ok_or(IkeError::Unexpected("no handshake"))?;
            let current = hs.kex.as_ref().map(|k| k.group());
            // §1.2: retry with the responder's group if we offered it.
            if self.cfg.ike_groups.contains(&group)
                && Some(group) != current
                && hs.ke_rounds < MAX_KE_ROUNDS
            {
                hs.ke_rounds += 1;
                hs.kex = Some(KeyExchange::generate(group)?);
                self.chan.outstanding = None;
                return self.send_init(now);
            }
            self.close(DeleteReason::Failed(NotifyType::INVALID_KE_PAYLOAD));
            return Ok(());
        }
        if let Some(e) = first_error_notify(p) {
            self.close(DeleteReason::Failed(e));
            return Ok(());
        }
        if h.spi_r == 0 {
            return Err(IkeError::Unexpected("responder SPI zero"));
        }
        let offered = sa_of(p).ok_or(IkeError::Unexpected("missing SA"))?;
        let Some(suite) = accept_ike_reply(offered, &self.cfg.ike_proposals, &self.cfg.ike_groups)
        else {
            self.close(DeleteReason::Failed(NotifyType::NO_PROPOSAL_CHOSEN));
            return Ok(());
        };
        let ke = ke_of(p).ok_or(IkeError::Unexpected("missing KE"))?;
        let nr = nonce_of(p)?;
        let hs = self
            .hs
            .as_ref()
            .ok_or(IkeError::Unexpected("no handshake"))?;
        let kex = hs.kex.as_ref().ok_or(IkeError::Unexpected("no KE"))?;
        if ke.group != suite.dh || kex.group() != suite.dh {
            return Err(IkeError::Unexpected(
                "KE group differs from the chosen group",
            ));
        }
        let shared = kex.compute_shared(&ke.data)?;
        let seed = skeyseed(suite.prf, &hs.ni, &nr, shared.as_bytes())?;
        let sk = derive_ike_keys(
            suite.prf,
            suite.encr,
            suite.integ,
            &seed,
            &hs.ni,
            &nr,
            h.spi_i,
            h.spi_r,
        )?;
        let nat = self.check_nat(p, h.spi_i, h.spi_r)?;
        self.nat = nat;
        // §2.23: with a NAT on the path, IKE_AUTH and later go to 4500.
        if (nat.0 || nat.1) && self.addrs.local.port() != NAT_T_PORT {
            self.addrs.local.set_port(NAT_T_PORT);
            self.addrs.remote.set_port(NAT_T_PORT);
        }
        self.chan.spi_r = h.spi_r;
        self.chan.keys = Some(Keys::new(suite, sk, true));
        self.chan.outstanding = None;
        let peer_hashes = find_notify(p, NotifyType::SIGNATURE_HASH_ALGORITHMS)
            .map(|n| crate::cert::parse_hash_algs(&n.data))
            .unwrap_or_default();
        if let Some(hs) = self.hs.as_mut() {
            hs.nr = nr;
            hs.response = data.to_vec();
            hs.kex = None;
            hs.peer_hashes = peer_hashes;
        }
        self.last_peer_activity = Some(now);
        self.send_auth(now)
    }

    /// Our AUTH payload over `real_message` | `peer_nonce` | prf(`sk_p`,
    /// IDbody) (§2.15), with PSK or our certificate's key; for signatures
    /// also our CERT payloads (end-entity first).
    fn local_auth(
        &self,
        real_message: &[u8],
        peer_nonce: &[u8],
        sk_p: &[u8],
        peer_hashes: &[u16],
    ) -> Result<(Vec<Payload>, AuthPayload)> {
        let keys = self.chan.keys.as_ref().ok_or(IkeError::NotEstablished)?;
        let Some(cert) = &self.cfg.cert else {
            let data = psk_auth(
                &keys.suite,
                self.cfg.psk.as_bytes(),
                real_message,
                peer_nonce,
                sk_p,
                &self.cfg.local_id,
            )?;
            let auth = AuthPayload {
                method: AuthMethod::SHARED_KEY_MIC,
                data,
            };
            return Ok((Vec::new(), auth));
        };
        let octets = signed_octets(
            &keys.suite,
            real_message,
            peer_nonce,
            sk_p,
            &self.cfg.local_id,
        )?;
        let auth = cert
            .local
            .sign(&octets, peer_hashes)
            .map_err(|_| IkeError::Internal("signing AUTH failed"))?;
        let certs = cert
            .local
            .cert_ders()
            .into_iter()
            .map(|d| Payload::Cert(crate::wire::CertEncoding::X509_SIG, d))
            .collect();
        Ok((certs, auth))
    }

    /// Checks the peer's AUTH over `real_message` | `our_nonce` |
    /// prf(`sk_p`, IDbody): PSK, or a certificate signature when we use
    /// certificates (a PSK AUTH is then refused, and the other way round).
    #[allow(clippy::too_many_arguments)]
    fn peer_auth(
        &self,
        now: Instant,
        p: &[Payload],
        id: &IdPayload,
        auth: &AuthPayload,
        real_message: &[u8],
        our_nonce: &[u8],
        sk_p: &[u8],
    ) -> Result<std::result::Result<AuthVerified, &'static str>> {
        let keys = self.chan.keys.as_ref().ok_or(IkeError::NotEstablished)?;
        match &self.cfg.cert {
            None => {
                let expected = psk_auth(
                    &keys.suite,
                    self.cfg.psk.as_bytes(),
                    real_message,
                    our_nonce,
                    sk_p,
                    id,
                )?;
                Ok(verify_auth(&expected, auth).ok_or("AUTH does not verify"))
            }
            Some(_) if auth.method == AuthMethod::SHARED_KEY_MIC => {
                Ok(Err("peer used a PSK where a certificate is required"))
            }
            Some(cert) => {
                let octets = signed_octets(&keys.suite, real_message, our_nonce, sk_p, id)?;
                Ok(verify_cert_auth(cert, now, p, id, auth, &octets))
            }
        }
    }

    fn send_auth(&mut self, now: Instant) -> Result<()> {
        let child_spi = self.random_spi32()?;
        let keys = self.chan.keys.as_ref().ok_or(IkeError::NotEstablished)?;
        let sk_pi = keys.sk.sk_pi.as_bytes().to_vec();
        let hs = self
            .hs
            .as_mut()
            .ok_or(IkeError::Unexpected("no handshake"))?;
        hs.child_spi = child_spi;
        let (request, nr, hashes) = (hs.request.clone(), hs.nr.clone(), hs.peer_hashes.clone());
        let (certs, auth) = self.local_auth(&request, &nr, &sk_pi, &hashes)?;
        // §1.2: IDi, [CERT,] [CERTREQ,] [IDr,] AUTH, SAi2, TSi, TSr.
        let mut p = vec![Payload::IdI(self.cfg.local_id.clone())];
        p.extend(certs);
        if let Some(cert) = self.cfg.cert.as_ref().filter(|c| !c.trust.is_empty()) {
            p.push(Payload::CertReq(
                crate::wire::CertEncoding::X509_SIG,
                cert.trust.certreq(),
            ));
        }
        if let Some(id) = &self.cfg.peer_id {
            p.push(Payload::IdR(id.clone()));
        }
        p.push(Payload::Auth(auth));
        // No DH transforms in IKE_AUTH: the first CHILD SA uses SK_d only.
        p.push(Payload::Sa(esp_proposals(
            &self.cfg.esp_proposals,
            &[],
            child_spi,
        )));
        p.push(Payload::TsI(self.cfg.local_ts.clone()));
        p.push(Payload::TsR(self.cfg.remote_ts.clone()));
        // RFC 6311 §3: we answer (and send) message ID synchronisation.
        p.push(notify(NotifyType::IKEV2_MESSAGE_ID_SYNC_SUPPORTED));
        let bytes = self.seal(false, ExchangeType::IKE_AUTH, 1, false, &p)?;
        self.chan.next_send = 2;
        self.state = State::AuthSent;
        self.send_request(now, false, 1, bytes, Task::Auth);
        Ok(())
    }

    fn auth_response(&mut self, now: Instant, p: &[Payload]) -> Result<()> {
        if find_notify(p, NotifyType::AUTHENTICATION_FAILED).is_some() {
            self.events.push_back(Event::AuthFailed {
                reason: "peer rejected our AUTH",
            });
            self.close(DeleteReason::AuthFailed);
            return Ok(());
        }
        let idr = p.iter().find_map(|x| match x {
            Payload::IdR(i) => Some(i.clone()),
            _ => None,
        });
        let auth = p.iter().find_map(|x| match x {
            Payload::Auth(a) => Some(a.clone()),
            _ => None,
        });
        let (Some(idr), Some(auth)) = (idr, auth) else {
            let e = first_error_notify(p).unwrap_or(NotifyType::INVALID_SYNTAX);
            self.close(DeleteReason::Failed(e));
            return Ok(());
        };
        if self
            .cfg
            .peer_id
            .as_ref()
            .is_some_and(|want| !id_matches(want, &idr))
        {
            self.events.push_back(Event::AuthFailed {
                reason: "peer identity does not match peerid",
            });
            self.notify_auth_failed();
            self.close(DeleteReason::AuthFailed);
            return Ok(());
        }
        let keys = self.chan.keys.as_ref().ok_or(IkeError::NotEstablished)?;
        let sk_pr = keys.sk.sk_pr.as_bytes().to_vec();
        let hs = self
            .hs
            .as_ref()
            .ok_or(IkeError::Unexpected("no handshake"))?;
        let checked = self.peer_auth(now, p, &idr, &auth, &hs.response, &hs.ni, &sk_pr)?;
        let proof = match checked {
            Ok(proof) => proof,
            Err(why) => {
                let reason = if self.cfg.cert.is_some() {
                    why
                } else {
                    "responder AUTH does not verify"
                };
                self.events.push_back(Event::AuthFailed { reason });
                self.notify_auth_failed();
                self.close(DeleteReason::AuthFailed);
                return Ok(());
            }
        };
        let hs = self
            .hs
            .as_ref()
            .ok_or(IkeError::Unexpected("no handshake"))?;
        let (ni, nr, child_spi) = (hs.ni.clone(), hs.nr.clone(), hs.child_spi);
        self.peer_mid_sync = find_notify(p, NotifyType::IKEV2_MESSAGE_ID_SYNC_SUPPORTED).is_some();
        self.establish(now, proof, idr);
        self.emit_mid();
        self.hs = None;
        // Every further phase2 gets its own CHILD SA (CREATE_CHILD_SA, §1.3.1).
        for policy in 1..self.cfg.policy_count() {
            self.pending.push_back(Request::CreateChild(policy));
        }
        if let Some(e) = first_error_notify(p) {
            self.events.push_back(Event::ChildSaFailed { notify: e });
            return Ok(());
        }
        let local = self.cfg.local_ts.clone();
        let remote = self.cfg.remote_ts.clone();
        let esp = self.cfg.esp_proposals.clone();
        match self.accept_child(p, &esp, &[], None, &ni, &nr, &local, &remote) {
            Ok((suite, peer_spi, keys, tsi, tsr)) => {
                self.install_child(
                    now, proof, suite, child_spi, peer_spi, keys, true, tsi, tsr, None, 0,
                );
            }
            Err(n) => self.events.push_back(Event::ChildSaFailed { notify: n }),
        }
        Ok(())
    }

    /// §2.21.2: an initiator that rejects the responder's authentication
    /// says so in a separate INFORMATIONAL (sent once, not retransmitted).
    fn notify_auth_failed(&mut self) {
        let mid = self.chan.next_send;
        let p = [notify(NotifyType::AUTHENTICATION_FAILED)];
        if let Ok(bytes) = self.seal(false, ExchangeType::INFORMATIONAL, mid, false, &p) {
            self.chan.next_send = mid.wrapping_add(1);
            self.push_transmit(bytes);
        }
    }

    /// Initiator's check of a CHILD SA answer; derives the keys.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn accept_child(
        &mut self,
        p: &[Payload],
        esp: &[EspAlgs],
        pfs: &[DhGroup],
        kex: Option<&KeyExchange>,
        ni: &[u8],
        nr: &[u8],
        local: &[TrafficSelector],
        remote: &[TrafficSelector],
    ) -> std::result::Result<
        (
            EspSuite,
            u32,
            ChildKeys,
            Vec<TrafficSelector>,
            Vec<TrafficSelector>,
        ),
        NotifyType,
    > {
        let sa = sa_of(p).ok_or(NotifyType::INVALID_SYNTAX)?;
        let (suite, peer_spi) =
            accept_esp_reply(sa, esp, pfs).ok_or(NotifyType::NO_PROPOSAL_CHOSEN)?;
        let shared = match (suite.dh, kex) {
            (Some(g), Some(k)) if k.group() == g => {
                let ke = ke_of(p).ok_or(NotifyType::INVALID_SYNTAX)?;
                if ke.group != g {
                    return Err(NotifyType::INVALID_KE_PAYLOAD);
                }
                Some(
                    k.compute_shared(&ke.data)
                        .map_err(|_| NotifyType::INVALID_KE_PAYLOAD)?,
                )
            }
            (None, _) => None,
            _ => return Err(NotifyType::NO_PROPOSAL_CHOSEN),
        };
        let (tsi, tsr) = ts_of(p);
        let (tsi, tsr) = (
            tsi.ok_or(NotifyType::INVALID_SYNTAX)?,
            tsr.ok_or(NotifyType::INVALID_SYNTAX)?,
        );
        if !ts::all_within(tsi, local) || !ts::all_within(tsr, remote) {
            return Err(NotifyType::TS_UNACCEPTABLE);
        }
        let k = self.chan.keys.as_ref().ok_or(NotifyType::INVALID_SYNTAX)?;
        let keys = derive_child_keys(
            k.suite.prf,
            k.sk.sk_d.as_bytes(),
            shared.as_ref().map(|s| s.as_bytes()),
            ni,
            nr,
            suite.encr,
            suite.integ,
        )
        .map_err(|_| NotifyType::TEMPORARY_FAILURE)?;
        Ok((suite, peer_spi, keys, tsi.to_vec(), tsr.to_vec()))
    }

    #[allow(clippy::too_many_arguments)]
    fn create_child_response(
        &mut self,
        now: Instant,
        spi: u32,
        ni: Vec<u8>,
        kex: Option<KeyExchange>,
        rekey_of: Option<u32>,
        policy: usize,
        p: &[Payload],
    ) -> Result<()> {
        let pol = self
            .cfg
            .policy(policy)
            .ok_or(IkeError::Internal("no such CHILD SA policy"))?;
        let proof = self.auth.ok_or(IkeError::NotEstablished)?;
        let retry = now + sa_retry_delay(self);
        let failed = |sa: &mut IkeSa, n: NotifyType| {
            if let Some(old) = rekey_of {
                if let Some(c) = sa.child_mut(old) {
                    c.rekeying = false;
                    // Try again later rather than at once.
                    c.soft = c.soft.max(retry);
                    // The peer's rekey of this SA won the collision (§2.8.1):
                    // it will delete the old SA.
                    if c.collision.take().is_some() {
                        c.replaced = true;
                    }
                }
            }
            sa.events.push_back(Event::ChildSaFailed { notify: n });
        };
        if let Some(n) = find_notify(p, NotifyType::INVALID_KE_PAYLOAD) {
            // §1.3: retry once with the group the responder wants, if we
            // allow it and did not just use it.
            let want = <[u8; 2]>::try_from(n.data.as_slice())
                .ok()
                .map(|b| DhGroup(u16::from_be_bytes(b)));
            let used = kex.as_ref().map(|k| k.group());
            if let Some(g) = want.filter(|g| pol.pfs_groups.contains(g) && Some(*g) != used) {
                self.pfs_retry = Some(g);
                let again = match rekey_of {
                    Some(old) => Request::RekeyChild(old),
                    None => Request::CreateChild(policy),
                };
                self.pending.push_front(again);
                return Ok(());
            }
        }
        if let Some(e) = first_error_notify(p) {
            failed(self, e);
            return Ok(());
        }
        let nr = match nonce_of(p) {
            Ok(n) => n,
            Err(_) => {
                failed(self, NotifyType::INVALID_SYNTAX);
                return Ok(());
            }
        };
        let (local, remote) = match rekey_of.and_then(|o| {
            self.children
                .iter()
                .find(|c| c.info.inbound_spi == o)
                .map(|c| (c.info.local_ts.clone(), c.info.remote_ts.clone()))
        }) {
            Some(x) => x,
            None => (pol.local_ts.clone(), pol.remote_ts.clone()),
        };
        match self.accept_child(
            p,
            &pol.esp_proposals,
            &pol.pfs_groups,
            kex.as_ref(),
            &ni,
            &nr,
            &local,
            &remote,
        ) {
            Ok((suite, peer_spi, keys, tsi, tsr)) => {
                self.install_child(
                    now, proof, suite, spi, peer_spi, keys, true, tsi, tsr, rekey_of, policy,
                );
                if let Some(old) = rekey_of {
                    self.finish_rekey(old, spi, [ni, nr]);
                }
            }
            Err(n) => failed(self, n),
        }
        Ok(())
    }

    /// Our rekey of `old` produced `new`; resolve a collision if the peer
    /// rekeyed `old` at the same time (§2.8.1: the SA created with the
    /// lowest of the four nonces is redundant; its creator deletes it, and
    /// the winner deletes the old SA).
    fn finish_rekey(&mut self, old: u32, new: u32, ours: [Vec<u8>; 2]) {
        let Some(c) = self.child_mut(old) else {
            return;
        };
        c.replaced = true;
        c.rekeying = false;
        match c.collision.take() {
            Some(col) if lowest_nonce(&ours, &col.nonces) => {
                // We lost: our new SA is redundant; the peer deletes `old`.
                self.pending
                    .push_front(Request::DeleteChild(new, DeleteReason::Redundant));
            }
            _ => {
                self.pending
                    .push_front(Request::DeleteChild(old, DeleteReason::Rekeyed));
            }
        }
    }

    /// The channel of the IKE SA that replaces this one (§2.18): SKEYSEED from the old SK_d
    /// and the new shared secret, keys for the new SPIs, on the side we take in the rekey.
    #[allow(clippy::too_many_arguments)]
    fn rekeyed_channel(
        &self,
        suite: IkeSuite,
        shared: &[u8],
        ni: &[u8],
        nr: &[u8],
        spi_i: u64,
        spi_r: u64,
        initiator: bool,
    ) -> Result<Channel> {
        let old_keys = self.chan.keys.as_ref().ok_or(IkeError::NotEstablished)?;
        let seed = skeyseed_rekey(
            old_keys.suite.prf,
            old_keys.sk.sk_d.as_bytes(),
            shared,
            ni,
            nr,
        )?;
        let sk = derive_ike_keys(
            suite.prf,
            suite.encr,
            suite.integ,
            &seed,
            ni,
            nr,
            spi_i,
            spi_r,
        )?;
        let mut new = Channel::new(spi_i, spi_r, initiator);
        new.keys = Some(Keys::new(suite, sk, initiator));
        Ok(new)
    }

    fn rekey_ike_response(
        &mut self,
        now: Instant,
        spi: u64,
        ni: Vec<u8>,
        kex: KeyExchange,
        p: &[Payload],
    ) -> Result<()> {
        self.ike_rekeying = false;
        let collision = self.ike_collision.take();
        if first_error_notify(p).is_some() {
            if let Some((theirs, _)) = collision {
                // §2.8.2: the peer completed its rekey without noticing ours
                // and refused ours: its new SA succeeds; it deletes the old.
                self.swap_in(now, theirs);
                return Ok(());
            }
            // Retry later (the peer is busy): the soft timer fires again
            // after a jitter.
            self.ike_soft = Some(now + sa_retry_delay(self));
            return Ok(());
        }
        let Some(offered) = sa_of(p) else {
            return Err(IkeError::Unexpected("missing SA"));
        };
        let mut groups = vec![kex.group()];
        groups.extend(self.cfg.ike_groups.iter().copied());
        let suite = accept_ike_reply(offered, &self.cfg.ike_proposals, &groups)
            .ok_or(IkeError::NoProposalChosen)?;
        let peer_spi = offered
            .first()
            .and_then(|pr| <[u8; 8]>::try_from(pr.spi.as_slice()).ok())
            .map(u64::from_be_bytes)
            .filter(|s| *s != 0)
            .ok_or(IkeError::Unexpected("IKE rekey SPI"))?;
        let ke = ke_of(p).ok_or(IkeError::Unexpected("missing KE"))?;
        if ke.group != kex.group() || suite.dh != kex.group() {
            return Err(IkeError::Unexpected("KE group"));
        }
        let nr = nonce_of(p)?;
        let shared = kex.compute_shared(&ke.data)?;
        let new = self.rekeyed_channel(suite, shared.as_bytes(), &ni, &nr, spi, peer_spi, true)?;
        match collision {
            Some((theirs, their_nonces)) if lowest_nonce(&[ni, nr], &their_nonces) => {
                // §2.8.2: ours was created with the lowest nonce: it is
                // redundant and we, its creator, delete it; the peer's SA
                // inherits the CHILD SAs and the peer deletes the old SA.
                self.swap_in(now, theirs);
                return self.delete_redundant(now, new);
            }
            Some((theirs, _)) => {
                // The peer's SA is the redundant one: the peer deletes it.
                self.await_redundant_delete(now, theirs);
            }
            None => {}
        }
        self.swap_in(now, new);
        // Delete the old SA over the old SA (§2.18).
        let mid = self.old.as_ref().map(|o| o.next_send).unwrap_or(0);
        let del = [Payload::Delete(DeletePayload {
            protocol: ProtocolId::IKE,
            spi_size: 0,
            spis: Vec::new(),
        })];
        let bytes = self.seal(true, ExchangeType::INFORMATIONAL, mid, false, &del)?;
        if let Some(o) = self.old.as_mut() {
            o.next_send = mid.wrapping_add(1);
        }
        self.send_request(now, true, mid, bytes, Task::DeleteIke);
        Ok(())
    }

    /// Makes `new` the current SA; the previous one becomes `old`.
    pub(super) fn swap_in(&mut self, now: Instant, new: Channel) {
        let prev = std::mem::replace(&mut self.chan, new);
        let (old_spi_i, old_spi_r) = (prev.spi_i, prev.spi_r);
        self.old = Some(prev);
        self.ike_rekeying = false;
        self.pending.retain(|r| *r != Request::RekeyIke);
        self.set_ike_lifetimes(now);
        if let Some(info) = self.ike_info(&self.chan) {
            self.events.push_back(Event::IkeSaRekeyed {
                new: info,
                old_spi_i,
                old_spi_r,
            });
        }
        self.emit_mid();
    }

    // ------------------------------------------------------------------
    // Requests (we are the responder)
    // ------------------------------------------------------------------

    pub(super) fn request_on_old(&mut self, exchange: ExchangeType, p: &[Payload]) -> Vec<Payload> {
        // §2.8.2: a rekey of an SA we are closing is refused.
        if exchange == ExchangeType::CREATE_CHILD_SA {
            return vec![notify(NotifyType::TEMPORARY_FAILURE)];
        }
        if p.iter()
            .any(|x| matches!(x, Payload::Delete(d) if d.protocol == ProtocolId::IKE))
        {
            self.old_deleted = true;
        }
        Vec::new()
    }

    pub(super) fn ike_auth_request(&mut self, now: Instant, p: &[Payload]) -> Result<Vec<Payload>> {
        let fail = |sa: &mut IkeSa, reason: &'static str| {
            sa.events.push_back(Event::AuthFailed { reason });
            Ok(vec![notify(NotifyType::AUTHENTICATION_FAILED)])
        };
        let idi = p.iter().find_map(|x| match x {
            Payload::IdI(i) => Some(i.clone()),
            _ => None,
        });
        let auth = p.iter().find_map(|x| match x {
            Payload::Auth(a) => Some(a.clone()),
            _ => None,
        });
        let (Some(idi), Some(auth)) = (idi, auth) else {
            return fail(self, "IKE_AUTH without IDi or AUTH");
        };
        if self
            .cfg
            .peer_id
            .as_ref()
            .is_some_and(|want| !id_matches(want, &idi))
        {
            return fail(self, "peer identity does not match peerid");
        }
        let keys = self.chan.keys.as_ref().ok_or(IkeError::NotEstablished)?;
        let (sk_pi, sk_pr) = (
            keys.sk.sk_pi.as_bytes().to_vec(),
            keys.sk.sk_pr.as_bytes().to_vec(),
        );
        let hs = self
            .hs
            .as_ref()
            .ok_or(IkeError::Unexpected("no handshake"))?;
        let (request, response) = (hs.request.clone(), hs.response.clone());
        let (ni, nr, hashes) = (hs.ni.clone(), hs.nr.clone(), hs.peer_hashes.clone());
        let proof = match self.peer_auth(now, p, &idi, &auth, &request, &nr, &sk_pi)? {
            Ok(proof) => proof,
            Err(why) if self.cfg.cert.is_some() => return fail(self, why),
            Err(_) => return fail(self, "initiator AUTH does not verify"),
        };
        let (certs, ours) = self.local_auth(&response, &ni, &sk_pr, &hashes)?;
        self.hs = None;
        self.peer_mid_sync = find_notify(p, NotifyType::IKEV2_MESSAGE_ID_SYNC_SUPPORTED).is_some();
        self.establish(now, proof, idi);
        // §1.2: IDr, [CERT,] AUTH, SAr2, TSi, TSr.
        let mut reply = vec![Payload::IdR(self.cfg.local_id.clone())];
        reply.extend(certs);
        reply.push(Payload::Auth(ours));
        match self.answer_child(now, proof, p, false, &ni, &nr, None) {
            Ok(c) => {
                reply.push(c.sa);
                reply.push(c.tsi);
                reply.push(c.tsr);
            }
            Err((n, data)) => {
                self.events.push_back(Event::ChildSaFailed { notify: n });
                reply.push(Payload::Notify(NotifyPayload::new(n, data)));
            }
        }
        // RFC 6311 §3: we answer (and send) message ID synchronisation.
        reply.push(notify(NotifyType::IKEV2_MESSAGE_ID_SYNC_SUPPORTED));
        Ok(reply)
    }

    /// Responder side of a CHILD SA: policy, proposal, optional KE (`pfs`:
    /// a CREATE_CHILD_SA may carry one, IKE_AUTH not), selectors, keys. A
    /// rekey keeps the policy of the SA it replaces; a new CHILD SA takes
    /// the first policy (phase2) whose proposals and narrowed selectors fit,
    /// trying the policies without a current CHILD SA first.
    #[allow(clippy::too_many_arguments)]
    fn answer_child(
        &mut self,
        now: Instant,
        proof: AuthVerified,
        p: &[Payload],
        pfs: bool,
        ni: &[u8],
        nr: &[u8],
        rekey_of: Option<u32>,
    ) -> std::result::Result<ChildReply, NotifyErr> {
        let syntax = || (NotifyType::INVALID_SYNTAX, Vec::new());
        let offered = sa_of(p).ok_or_else(syntax)?;
        let (tsi, tsr) = ts_of(p);
        let (tsi, tsr) = (tsi.ok_or_else(syntax)?, tsr.ok_or_else(syntax)?);
        let our_spi = self
            .random_spi32()
            .map_err(|_| (NotifyType::TEMPORARY_FAILURE, Vec::new()))?;
        let rekeyed_policy = rekey_of.and_then(|o| {
            self.children
                .iter()
                .find(|c| c.info.inbound_spi == o)
                .map(|c| c.info.policy)
        });
        let candidates: Vec<usize> = match rekeyed_policy {
            Some(policy) => vec![policy],
            None => {
                let busy = self.child_policies();
                let (free, taken): (Vec<usize>, Vec<usize>) =
                    (0..self.cfg.policy_count()).partition(|i| !busy.contains(i));
                free.into_iter().chain(taken).collect()
            }
        };
        let mut refusal = (NotifyType::NO_PROPOSAL_CHOSEN, Vec::new());
        let mut chosen = None;
        for policy in candidates {
            let Some(pol) = self.cfg.policy(policy) else {
                continue;
            };
            let groups = pfs.then_some(pol.pfs_groups.as_slice());
            let Some((reply, suite, peer_spi)) =
                select_esp(offered, &pol.esp_proposals, groups, our_spi)
            else {
                continue;
            };
            // §2.9: TSi is the peer's side (our remote), TSr ours.
            let n_i = ts::narrow(tsi, &pol.remote_ts);
            let n_r = ts::narrow(tsr, &pol.local_ts);
            if n_i.is_empty() || n_r.is_empty() {
                refusal = (NotifyType::TS_UNACCEPTABLE, Vec::new());
                continue;
            }
            chosen = Some((policy, reply, suite, peer_spi, n_i, n_r));
            break;
        }
        let (policy, reply, suite, peer_spi, n_i, n_r) = chosen.ok_or(refusal)?;
        let (shared, ke) = match suite.dh {
            Some(g) => {
                let ke = ke_of(p).ok_or_else(syntax)?;
                if ke.group != g {
                    return Err((NotifyType::INVALID_KE_PAYLOAD, g.0.to_be_bytes().to_vec()));
                }
                let kex = KeyExchange::generate(g)
                    .map_err(|_| (NotifyType::TEMPORARY_FAILURE, Vec::new()))?;
                let shared = kex
                    .compute_shared(&ke.data)
                    .map_err(|_| (NotifyType::INVALID_KE_PAYLOAD, g.0.to_be_bytes().to_vec()))?;
                (
                    Some(shared),
                    Some(Payload::Ke(KePayload {
                        group: g,
                        data: kex.public_value().to_vec(),
                    })),
                )
            }
            None => (None, None),
        };
        let k = self.chan.keys.as_ref().ok_or_else(syntax)?;
        let keys = derive_child_keys(
            k.suite.prf,
            k.sk.sk_d.as_bytes(),
            shared.as_ref().map(|s| s.as_bytes()),
            ni,
            nr,
            suite.encr,
            suite.integ,
        )
        .map_err(|_| (NotifyType::TEMPORARY_FAILURE, Vec::new()))?;
        self.install_child(
            now,
            proof,
            suite,
            our_spi,
            peer_spi,
            keys,
            false,
            n_r.clone(),
            n_i.clone(),
            rekey_of,
            policy,
        );
        Ok(ChildReply {
            sa: Payload::Sa(vec![reply]),
            ke,
            tsi: Payload::TsI(n_i),
            tsr: Payload::TsR(n_r),
        })
    }

    pub(super) fn informational_request(&mut self, p: &[Payload]) -> Vec<Payload> {
        if find_notify(p, NotifyType::AUTHENTICATION_FAILED).is_some() {
            self.events.push_back(Event::AuthFailed {
                reason: "peer rejected our AUTH",
            });
            self.peer_deleted_ike = true;
            return Vec::new();
        }
        let mut ours = Vec::new();
        for d in p.iter().filter_map(|x| match x {
            Payload::Delete(d) => Some(d),
            _ => None,
        }) {
            if d.protocol == ProtocolId::IKE {
                if let Some((theirs, _)) = self.ike_collision.take() {
                    // §2.8.2: the peer finished its rekey without noticing
                    // ours and deletes the old SA: its new SA succeeds it.
                    self.pending_swap = Some(theirs);
                    self.drop_old_after_swap = true;
                    return Vec::new();
                }
                // §1.4.1: answer with an empty INFORMATIONAL, then close.
                self.peer_deleted_ike = true;
                return Vec::new();
            }
            if d.protocol != ProtocolId::ESP {
                continue;
            }
            for spi in &d.spis {
                let Ok(b) = <[u8; 4]>::try_from(spi.as_slice()) else {
                    continue;
                };
                let out = u32::from_be_bytes(b);
                if let Some(i) = self
                    .children
                    .iter()
                    .position(|c| c.info.outbound_spi == out)
                {
                    let c = self.children.remove(i);
                    ours.push(c.info.inbound_spi.to_be_bytes().to_vec());
                    self.pending
                        .retain(|r| *r != Request::RekeyChild(c.info.inbound_spi));
                    self.events.push_back(Event::ChildSaDeleted {
                        inbound_spi: c.info.inbound_spi,
                        outbound_spi: c.info.outbound_spi,
                        reason: if c.replaced {
                            DeleteReason::Rekeyed
                        } else {
                            DeleteReason::Peer
                        },
                    });
                }
            }
        }
        if ours.is_empty() {
            Vec::new()
        } else {
            vec![Payload::Delete(DeletePayload {
                protocol: ProtocolId::ESP,
                spi_size: 4,
                spis: ours,
            })]
        }
    }

    pub(super) fn create_child_request(
        &mut self,
        now: Instant,
        p: &[Payload],
    ) -> Result<Vec<Payload>> {
        let proof = self.auth.ok_or(IkeError::NotEstablished)?;
        if sa_of(p).is_some_and(|s| s.iter().any(|x| x.protocol == ProtocolId::IKE)) {
            return self.rekey_ike_request(now, p);
        }
        let Ok(ni) = nonce_of(p) else {
            return Ok(vec![notify(NotifyType::INVALID_SYNTAX)]);
        };
        let mut rekey_of = None;
        if let Some(n) = find_notify(p, NotifyType::REKEY_SA) {
            // §3.10: a CHILD SA notify names ESP or AH; 0 or IKE is malformed,
            // and we have no AH SAs (ops/ATTACKS.md).
            if n.protocol == ProtocolId::AH {
                return Ok(vec![Payload::Notify(NotifyPayload {
                    protocol: ProtocolId::AH,
                    spi: n.spi.clone(),
                    ty: NotifyType::CHILD_SA_NOT_FOUND,
                    data: Vec::new(),
                })]);
            }
            if n.protocol != ProtocolId::ESP {
                return Ok(vec![notify(NotifyType::INVALID_SYNTAX)]);
            }
            let Ok(b) = <[u8; 4]>::try_from(n.spi.as_slice()) else {
                return Ok(vec![notify(NotifyType::INVALID_SYNTAX)]);
            };
            // The SPI is the requester's inbound SPI, our outbound (§1.3.3).
            let out = u32::from_be_bytes(b);
            let Some(c) = self.children.iter().find(|c| c.info.outbound_spi == out) else {
                return Ok(vec![Payload::Notify(NotifyPayload {
                    protocol: ProtocolId::ESP,
                    spi: n.spi.clone(),
                    ty: NotifyType::CHILD_SA_NOT_FOUND,
                    data: Vec::new(),
                })]);
            };
            if c.replaced {
                // Already rekeyed by us; our Delete for it is on its way.
                return Ok(vec![notify(NotifyType::TEMPORARY_FAILURE)]);
            }
            rekey_of = Some(c.info.inbound_spi);
        }
        let nr = self.random(NONCE_LEN)?;
        match self.answer_child(now, proof, p, true, &ni, &nr, rekey_of) {
            Ok(c) => {
                if let Some(old) = rekey_of {
                    let ours_outstanding = matches!(
                        self.chan.outstanding.as_deref(),
                        Some(Outstanding { task: Task::CreateChild { rekey_of: Some(o), .. }, .. }) if *o == old
                    );
                    if let Some(oc) = self.child_mut(old) {
                        if ours_outstanding {
                            oc.collision = Some(Collision {
                                nonces: [ni.clone(), nr.clone()],
                            });
                        } else {
                            // The peer rekeyed first; it deletes the old SA.
                            oc.replaced = true;
                            oc.rekeying = false;
                        }
                    }
                    if !ours_outstanding {
                        self.pending.retain(|r| *r != Request::RekeyChild(old));
                    }
                }
                let mut reply = vec![c.sa, Payload::Nonce(nr)];
                reply.extend(c.ke);
                reply.push(c.tsi);
                reply.push(c.tsr);
                Ok(reply)
            }
            Err((n, data)) => {
                self.events.push_back(Event::ChildSaFailed { notify: n });
                Ok(vec![Payload::Notify(NotifyPayload::new(n, data))])
            }
        }
    }

    fn rekey_ike_request(&mut self, _now: Instant, p: &[Payload]) -> Result<Vec<Payload>> {
        // §2.8.2: while a rekey is being finished (old SA still there, or a
        // collision being resolved) another one is refused. A request that
        // crosses our own outstanding IKE rekey is answered, and its SA kept
        // aside until our exchange ends (see `ike_rekey`).
        if self.old.is_some() || self.ike_collision.is_some() || self.redundant.is_some() {
            return Ok(vec![notify(NotifyType::TEMPORARY_FAILURE)]);
        }
        let colliding = self.ike_rekeying;
        let (Some(offered), Some(ke)) = (sa_of(p), ke_of(p)) else {
            return Ok(vec![notify(NotifyType::INVALID_SYNTAX)]);
        };
        let Ok(ni) = nonce_of(p) else {
            return Ok(vec![notify(NotifyType::INVALID_SYNTAX)]);
        };
        let Some((mut reply, suite)) = select_ike(
            offered,
            &self.cfg.ike_proposals,
            &self.cfg.ike_groups,
            Some(ke.group),
        ) else {
            return Ok(vec![notify(NotifyType::NO_PROPOSAL_CHOSEN)]);
        };
        if ke.group != suite.dh {
            return Ok(vec![Payload::Notify(NotifyPayload::new(
                NotifyType::INVALID_KE_PAYLOAD,
                suite.dh.0.to_be_bytes().to_vec(),
            ))]);
        }
        let Some(peer_spi) = <[u8; 8]>::try_from(reply.spi.as_slice())
            .ok()
            .map(u64::from_be_bytes)
            .filter(|s| *s != 0)
        else {
            return Ok(vec![notify(NotifyType::INVALID_SYNTAX)]);
        };
        let kex = KeyExchange::generate(suite.dh)?;
        let Ok(shared) = kex.compute_shared(&ke.data) else {
            return Ok(vec![Payload::Notify(NotifyPayload::new(
                NotifyType::INVALID_KE_PAYLOAD,
                suite.dh.0.to_be_bytes().to_vec(),
            ))]);
        };
        let spi = self.random_u64()?;
        let nr = self.random(NONCE_LEN)?;
        let new = self.rekeyed_channel(suite, shared.as_bytes(), &ni, &nr, peer_spi, spi, false)?;
        if colliding {
            self.ike_collision = Some((new, [ni.clone(), nr.clone()]));
        } else {
            self.pending_swap = Some(new);
        }
        reply.spi = spi.to_be_bytes().to_vec();
        Ok(vec![
            Payload::Sa(vec![reply]),
            Payload::Nonce(nr),
            Payload::Ke(KePayload {
                group: suite.dh,
                data: kex.public_value().to_vec(),
            }),
        ])
    }
}
