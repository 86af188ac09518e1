//! HA side of the IKE manager (DESIGN.md §6, issue 6).
//!
//! What it does:
//! - after every exchange, publishes each established IKE SA as a `Body::IkeSa` record
//!   (`sa.ike`) when its SPIs, message IDs or CHILD SAs changed, so hasyncd can replicate it
//!   to the other cluster members; `IkeSaRemoved` when the SA goes;
//! - while hasyncd says this member is an FGCP secondary (or still in its hello phase),
//!   answers no new IKE_SA_INIT and initiates nothing: the standby copies live in hasyncd;
//! - on `Body::Takeover` restores the IKE SA with ike-proto's `IkeSa::restore` (same SPIs,
//!   keys and message IDs) and installs its CHILD SAs with the outbound sequence numbers
//!   hasyncd computed from the synced leases.
//!
//! The record's `keys` is this module's own encoding of `ike_proto::sa::IkeSaSnapshot`
//! (MessagePack, versioned by [`STATE_VERSION`]); nothing else reads it.
//!
//! - after an ikemgr restart, continues the IKE SAs hasyncd's local replica holds
//!   ([`IkeManager::restore_local`]) and republishes their CHILD SAs unchanged.
//!
//! - after a takeover or a restart, when the peer announced it, sends RFC 6311
//!   `IKEV2_MESSAGE_ID_SYNC` (ike-proto's `sync_message_ids`) so that a copy one exchange
//!   behind does not stall the SA; peers' sync requests are answered in ike-proto.
//!
//! **At most one RFC 6311 sync per AEAD IKE SA, known to every copy** (ike-proto's
//! `mid_sync` module says why: strongSwan cannot encrypt a second response with message ID
//! 0 and destroys the SA). The record says whether a sync was started (`mid_spent` in the
//! state), but a copy can be older than that (its update lost on the HA link). So on an
//! AEAD SA the sync is first reserved (`reserve_mid_sync`: the SA sends nothing
//! meanwhile) and its mark, `SeqMark { spi_out: ike_mid_mark_spi(SPIs), seq_hw: M1 }`, is
//! leased from hasyncd like a sequence number (`SeqLeaseRequest`): hasyncd grants it only
//! once every live member acknowledged it, and only then is the sync sent. A member that
//! takes the SA over later finds the mark among the takeover's `start_seqs`, however old
//! its copy: it sends no sync and continues at M1 (`adopt_mid_sync_mark`). A grant that
//! does not come within [`MID_MARK_WAIT`] gives the sync up (message IDs as copied).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bus_schema::schema::{
    ike_mid_mark_spi, is_ike_mid_mark, ChildSaInfo as BusChild, IkeSaRecord, LifetimeLeft,
    SaLifetime, SeqMark, TakeoverInfo,
};
use bus_schema::Body;
use ike_proto::crypto::{Encr, IkeKeys, Integ, Prf, Secret};
use ike_proto::proposal::IkeSuite;
use ike_proto::sa::{
    Addresses, ChildSaInfo, ChildSaKeys, DeleteReason, IkeSa, IkeSaSnapshot, MidSyncStart,
    OsEntropy,
};
use ike_proto::wire::{
    DhGroup, EncrId, IdPayload, IdType, IntegId, PrfId, TrafficSelector, TsType,
};
use ike_proto::IkeSaInfo;
use serde::{Deserialize, Serialize};

use super::{Entry, Gateway, IkeManager};

/// Version of the `state` encoding; a record of another version is refused.
pub const STATE_VERSION: u8 = 1;

/// Added to our next request's message ID when a restored SA asks the peer to
/// synchronise (RFC 6311 M1): requests the previous owner may have sent after its last
/// published record. ikemgr publishes after every exchange, within one 100 ms tick, and
/// runs one exchange at a time, so a few at most can be missing; the peer moves past any
/// gap without harm.
pub const MID_SYNC_MARGIN: u32 = 4;

/// How long a reserved RFC 6311 sync waits for hasyncd's grant of its mark (every live
/// member acknowledged it; an unreachable member is declared lost within its heartbeat
/// loss time) before it is given up.
pub const MID_MARK_WAIT: Duration = Duration::from_secs(5);

/// How often a reserved sync's mark is asked for again while no grant came (the request
/// is an event: one published while hasyncd's subscription to a restarted ikemgr is not
/// yet connected is lost; hasyncd grants a mark it holds again at once).
pub const MID_MARK_REPEAT: Duration = Duration::from_millis(500);

/// HA state of the manager.
#[derive(Default)]
pub struct HaState {
    /// FGCP secondary / hello: no new IKE SAs here.
    standby: bool,
    /// Standby as the election's outcome (not hello): the SAs held here were dropped.
    flushed: bool,
    /// What was last published per SA (by entry id): SPIs, message IDs, CHILD SPIs.
    published: HashMap<u64, (String, PublishedKey)>,
    /// Outbound SPI -> first sequence number, for CHILD SAs being installed by a takeover.
    start_seq: HashMap<u32, u64>,
    /// Outbound SPI -> what its lifetimes have left, for CHILD SAs being installed by a
    /// takeover (hasyncd's `lifetimes`) or republished after a restart.
    lifetime_left: HashMap<u32, SaLifetime>,
    /// Takeovers done (tunnel -> SPIs), so a repeated Takeover event is ignored.
    taken: BTreeMap<String, (u64, u64)>,
    /// Requests for IKE SAs not held here, for hasyncd (FGSP promotion), at most
    /// [`UNKNOWN_MAX`] between two drains.
    unknown: Vec<(u64, u64)>,
    /// CHILD SAs being republished after an ikemgr restart (see
    /// [`IkeManager::restore_local`]).
    pub(super) restoring: bool,
    /// Tunnel names other cluster members carry (hasyncd's `standby` roles): a new dial-up
    /// instance here takes another name, or the two tunnels would share one ownership entry.
    reserved: std::collections::BTreeSet<String>,
    /// Reserved RFC 6311 syncs waiting for hasyncd's grant of their mark: SA id -> (mark,
    /// deadline, next repetition of the request).
    mark_wait: BTreeMap<u64, (SeqMark, Instant, Instant)>,
}

/// Bound of [`HaState::unknown`] between two drains.
const UNKNOWN_MAX: usize = 16;

type PublishedKey = (u64, u64, u32, u32, Vec<u32>, bool);

#[derive(Serialize, Deserialize)]
struct WireTs {
    t: u8,
    proto: u8,
    sp: u16,
    ep: u16,
    start: Vec<u8>,
    end: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct WireChild {
    ike_spi_i: u64,
    ike_spi_r: u64,
    spi_in: u32,
    spi_out: u32,
    encr: (u16, Option<u16>),
    integ: Option<u16>,
    esn: bool,
    pfs: Option<u16>,
    keys: [Vec<u8>; 4],
    local_ts: Vec<WireTs>,
    remote_ts: Vec<WireTs>,
    lifetime_ms: u64,
    soft_ms: u64,
    rekey_of: Option<u32>,
    initiator: bool,
    left_ms: u64,
    /// Which phase2 of the phase1 the CHILD SA serves (0 = the first).
    #[serde(default)]
    policy: usize,
}

#[derive(Serialize, Deserialize)]
struct WireSa {
    v: u8,
    spi_i: u64,
    spi_r: u64,
    initiator: bool,
    encr: (u16, Option<u16>),
    integ: Option<u16>,
    prf: u16,
    dh: u16,
    local_id: (u8, Vec<u8>),
    remote_id: (u8, Vec<u8>),
    nat: (bool, bool),
    lifetime_ms: u64,
    keys: [Vec<u8>; 7],
    next_send: u32,
    next_recv: u32,
    local: String,
    remote: String,
    expires_ms: u64,
    children: Vec<WireChild>,
    /// The peer announced RFC 6311 message ID synchronisation.
    #[serde(default)]
    mid_sync: bool,
    /// An RFC 6311 sync was started on the SA (at most one on an AEAD SA).
    #[serde(default)]
    mid_spent: bool,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ts_out(ts: &[TrafficSelector]) -> Vec<WireTs> {
    ts.iter()
        .map(|t| WireTs {
            t: t.ts_type.0,
            proto: t.ip_proto,
            sp: t.start_port,
            ep: t.end_port,
            start: t.start.clone(),
            end: t.end.clone(),
        })
        .collect()
}

fn ts_in(ts: Vec<WireTs>) -> Vec<TrafficSelector> {
    ts.into_iter()
        .map(|t| TrafficSelector {
            ts_type: TsType(t.t),
            ip_proto: t.proto,
            start_port: t.sp,
            end_port: t.ep,
            start: t.start,
            end: t.end,
        })
        .collect()
}

fn encr_out(e: Encr) -> (u16, Option<u16>) {
    let (id, bits) = e.id();
    (id.0, bits)
}

fn encr_in(e: (u16, Option<u16>)) -> Result<Encr, String> {
    Encr::from_id(EncrId(e.0), e.1).ok_or_else(|| format!("unknown ENCR {e:?}"))
}

fn integ_in(i: Option<u16>) -> Result<Option<Integ>, String> {
    i.map(|i| Integ::from_id(IntegId(i)).ok_or_else(|| format!("unknown INTEG {i}")))
        .transpose()
}

fn sec(s: &Secret) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Encodes a snapshot as the record's `state`.
pub fn encode_state(s: &IkeSaSnapshot) -> Vec<u8> {
    let i = &s.info;
    let k = &s.keys;
    let w = WireSa {
        v: STATE_VERSION,
        spi_i: i.spi_i,
        spi_r: i.spi_r,
        initiator: i.initiator,
        encr: encr_out(i.suite.encr),
        integ: i.suite.integ.map(|x| x.id().0),
        prf: i.suite.prf.id().0,
        dh: i.suite.dh.0,
        local_id: (i.local_id.id_type.0, i.local_id.data.clone()),
        remote_id: (i.remote_id.id_type.0, i.remote_id.data.clone()),
        nat: (i.local_behind_nat, i.remote_behind_nat),
        lifetime_ms: ms(i.lifetime),
        keys: [
            sec(&k.sk_d),
            sec(&k.sk_ai),
            sec(&k.sk_ar),
            sec(&k.sk_ei),
            sec(&k.sk_er),
            sec(&k.sk_pi),
            sec(&k.sk_pr),
        ],
        next_send: s.next_send,
        next_recv: s.next_recv,
        local: s.addresses.local.to_string(),
        remote: s.addresses.remote.to_string(),
        expires_ms: ms(s.expires_in),
        children: s
            .children
            .iter()
            .map(|(c, left)| WireChild {
                ike_spi_i: c.ike_spi_i,
                ike_spi_r: c.ike_spi_r,
                spi_in: c.inbound_spi,
                spi_out: c.outbound_spi,
                encr: encr_out(c.encr),
                integ: c.integ.map(|x| x.id().0),
                esn: c.esn,
                pfs: c.pfs_group.map(|g| g.0),
                keys: [
                    sec(&c.keys.encr_in),
                    sec(&c.keys.integ_in),
                    sec(&c.keys.encr_out),
                    sec(&c.keys.integ_out),
                ],
                local_ts: ts_out(&c.local_ts),
                remote_ts: ts_out(&c.remote_ts),
                lifetime_ms: ms(c.lifetime),
                soft_ms: ms(c.soft_lifetime),
                rekey_of: c.rekey_of,
                initiator: c.initiator,
                policy: c.policy,
                left_ms: ms(*left),
            })
            .collect(),
        mid_sync: s.mid_sync,
        mid_spent: s.mid_sync_spent,
    };
    rmp_serde::to_vec_named(&w).unwrap_or_default()
}

/// Decodes a record's `state`; the record's plain message IDs win over the encoded ones.
pub fn decode_state(rec: &IkeSaRecord) -> Result<IkeSaSnapshot, String> {
    let w: WireSa = rmp_serde::from_slice(&rec.keys).map_err(|e| format!("IKE SA state: {e}"))?;
    if w.v != STATE_VERSION {
        return Err(format!(
            "IKE SA state version {} (expected {STATE_VERSION})",
            w.v
        ));
    }
    let addr = |s: &str| {
        s.parse::<SocketAddr>()
            .map_err(|e| format!("address {s:?}: {e}"))
    };
    let prf = Prf::from_id(PrfId(w.prf)).ok_or_else(|| format!("unknown PRF {}", w.prf))?;
    let [sk_d, sk_ai, sk_ar, sk_ei, sk_er, sk_pi, sk_pr] = w.keys.map(Secret::new);
    let mut children = Vec::new();
    for c in w.children {
        let [encr_in_k, integ_in_k, encr_out_k, integ_out_k] = c.keys.map(Secret::new);
        children.push((
            ChildSaInfo {
                ike_spi_i: c.ike_spi_i,
                ike_spi_r: c.ike_spi_r,
                inbound_spi: c.spi_in,
                outbound_spi: c.spi_out,
                encr: encr_in(c.encr)?,
                integ: integ_in(c.integ)?,
                esn: c.esn,
                pfs_group: c.pfs.map(DhGroup),
                keys: ChildSaKeys {
                    encr_in: encr_in_k,
                    integ_in: integ_in_k,
                    encr_out: encr_out_k,
                    integ_out: integ_out_k,
                },
                local_ts: ts_in(c.local_ts),
                remote_ts: ts_in(c.remote_ts),
                lifetime: Duration::from_millis(c.lifetime_ms),
                soft_lifetime: Duration::from_millis(c.soft_ms),
                rekey_of: c.rekey_of,
                initiator: c.initiator,
                policy: c.policy,
            },
            Duration::from_millis(c.left_ms),
        ));
    }
    Ok(IkeSaSnapshot {
        info: IkeSaInfo {
            spi_i: w.spi_i,
            spi_r: w.spi_r,
            initiator: w.initiator,
            suite: IkeSuite {
                encr: encr_in(w.encr)?,
                integ: integ_in(w.integ)?,
                prf,
                dh: DhGroup(w.dh),
            },
            local_id: IdPayload {
                id_type: IdType(w.local_id.0),
                data: w.local_id.1,
            },
            remote_id: IdPayload {
                id_type: IdType(w.remote_id.0),
                data: w.remote_id.1,
            },
            local_behind_nat: w.nat.0,
            remote_behind_nat: w.nat.1,
            lifetime: Duration::from_millis(w.lifetime_ms),
        },
        keys: IkeKeys {
            sk_d,
            sk_ai,
            sk_ar,
            sk_ei,
            sk_er,
            sk_pi,
            sk_pr,
        },
        next_send: rec.next_send,
        next_recv: rec.next_recv,
        addresses: Addresses {
            local: addr(&w.local)?,
            remote: addr(&w.remote)?,
        },
        expires_in: Duration::from_millis(w.expires_ms),
        children,
        mid_sync: w.mid_sync,
        mid_sync_spent: w.mid_spent,
    })
}

impl HaState {
    /// First outbound sequence number of a CHILD SA being installed (1 unless a takeover
    /// gave one).
    pub fn initial_seq(&self, spi_out: u32) -> u64 {
        self.start_seq.get(&spi_out).copied().unwrap_or(1).max(1)
    }

    /// The configured lifetimes `l` of the CHILD SA sending on `spi_out`, each limit held to
    /// what a takeover says it has left (a limit the SA does not have stays 0; a left of 0
    /// means the old carrier did not say).
    pub fn cap_lifetime(&self, spi_out: u32, l: SaLifetime) -> SaLifetime {
        let Some(left) = self.lifetime_left.get(&spi_out) else {
            return l;
        };
        let cap = |cfg: u64, left: u64| {
            if cfg == 0 || left == 0 {
                cfg
            } else {
                cfg.min(left)
            }
        };
        SaLifetime {
            soft_secs: cap(l.soft_secs, left.soft_secs),
            hard_secs: cap(l.hard_secs, left.hard_secs),
            soft_bytes: cap(l.soft_bytes, left.soft_bytes),
            hard_bytes: cap(l.hard_bytes, left.hard_bytes),
        }
    }

    /// An SA was removed: its record goes too (after its CHILD SAs and routes, before the
    /// tunnel, as seed 000's flush order).
    pub(super) fn removed(&mut self, id: u64, bodies: &mut Vec<Body>) {
        if let Some((tunnel, key)) = self.published.remove(&id) {
            self.taken.remove(&tunnel);
            // Seed 000's flush: hasyncd tells the other members to delete their copy.
            tracing::debug!(
                "ike 0:{tunnel}:{id}: HA send IKE SA del {:016x}/{:016x}",
                key.0,
                key.1
            );
            if !self.published.values().any(|(t, _)| *t == tunnel) {
                bodies.push(Body::IkeSaRemoved { tunnel });
            }
        }
    }

    /// An IKE request for an IKE SA this member does not hold arrived (RFC 7296 §2.6 SPIs).
    pub(super) fn note_unknown_request(&mut self, spi_i: u64, spi_r: u64) {
        if self.unknown.len() < UNKNOWN_MAX && !self.unknown.contains(&(spi_i, spi_r)) {
            self.unknown.push((spi_i, spi_r));
        }
    }

    /// Whether `name` is a tunnel another member carries.
    pub(super) fn reserved(&self, name: &str) -> bool {
        self.reserved.contains(name)
    }

    /// Whether this member holds standby copies only.
    pub fn standby(&self) -> bool {
        self.standby
    }
}

impl IkeManager {
    /// hasyncd's FGCP role: `standby` on a secondary or in the hello phase. A member that
    /// goes from primary to standby (another member was elected) drops its IKE SAs without
    /// telling the peer: the new primary continues them from its copies.
    ///
    /// `settled`: the role is the election's outcome. A hasyncd in its hello phase (just
    /// restarted) is not: new IKE SAs wait, but the ones held here are kept until it
    /// knows (a primary whose hasyncd alone restarted stays primary).
    pub fn set_ha_standby(&mut self, now: Instant, standby: bool, settled: bool) {
        let flush = standby && settled;
        if flush && !self.ha.flushed {
            let ids: Vec<u64> = self.sas.keys().copied().collect();
            for id in ids {
                self.flush(id, now, "HA standby: another member carries it");
            }
        }
        if (self.ha.standby, self.ha.flushed) != (standby, flush) {
            tracing::info!(
                "ike: HA role {}",
                match (standby, settled) {
                    (true, true) => "standby: new IKE SAs are refused, nothing is initiated",
                    (true, false) =>
                        "hello (hasyncd electing): new IKE SAs wait, the established ones are kept",
                    (false, _) => "primary: IKE SAs are negotiated here",
                }
            );
        }
        self.ha.standby = standby;
        self.ha.flushed = flush;
    }

    /// Tunnel names other members carry (hasyncd's `standby` roles): new dial-up instances
    /// here are named around them.
    pub fn set_ha_reserved(&mut self, names: std::collections::BTreeSet<String>) {
        self.ha.reserved = names;
    }

    /// IKE requests for unknown IKE SAs since the last call: hasyncd promotes an FGSP
    /// standby tunnel whose IKE SA they name (the upstream router moved it here).
    pub fn take_unknown_requests(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.ha.unknown)
    }

    /// hasyncd made `tunnel` standby here (another FGSP member carries it now): its IKE SA
    /// is dropped without telling the peer, as on an FGCP demotion; the new owner continues
    /// it from its copy. Returns whether an SA was dropped.
    pub fn ha_release(&mut self, now: Instant, tunnel: &str) -> bool {
        let ids: Vec<u64> = self
            .sas
            .iter()
            .filter(|(_, e)| e.name == tunnel)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.flush(*id, now, "HA standby: another member carries it");
        }
        self.ha.taken.remove(tunnel);
        !ids.is_empty()
    }

    /// After an SA's events were handled: publish its record if it changed.
    pub(super) fn ha_after_pump(&mut self, id: u64, now: Instant) {
        let Some(e) = self.sas.get(&id) else {
            return;
        };
        if e.name.is_empty() || e.info.is_none() {
            return;
        }
        let Some(snap) = e.sa.snapshot(now) else {
            return;
        };
        let key: PublishedKey = (
            snap.info.spi_i,
            snap.info.spi_r,
            snap.next_send,
            snap.next_recv,
            snap.children.iter().map(|(c, _)| c.inbound_spi).collect(),
            snap.mid_sync_spent,
        );
        if self.ha.published.get(&id).map(|(_, k)| k) == Some(&key) {
            return;
        }
        let rec = IkeSaRecord {
            tunnel: e.name.clone(),
            phase1: e.gateway.clone(),
            spi_i: snap.info.spi_i,
            spi_r: snap.info.spi_r,
            next_send: snap.next_send,
            next_recv: snap.next_recv,
            remote: snap.addresses.remote.to_string(),
            keys: encode_state(&snap),
        };
        tracing::debug!(
            "ike 0:{}:{id}: HA send IKE SA {:016x}/{:016x} message IDs send/recv={}/{}",
            rec.tunnel,
            rec.spi_i,
            rec.spi_r,
            rec.next_send,
            rec.next_recv
        );
        self.ha.published.insert(id, (e.name.clone(), key));
        self.bodies.push(Body::IkeSa(rec));
    }

    /// hasyncd made this member the tunnel's carrier: continue the IKE SA of the record
    /// (same SPIs, keys and message IDs) and install its CHILD SAs at the given outbound
    /// sequence numbers.
    pub fn takeover(&mut self, now: Instant, t: &TakeoverInfo) -> Result<(), String> {
        let rec = &t.ike;
        if t.held_only
            && !self.sas.values().any(|e| {
                e.name == rec.tunnel
                    && e.sa.is_established()
                    && e.sa.spis() == (rec.spi_i, rec.spi_r)
            })
        {
            // Another member's later copy of an SA carried here, which this member no
            // longer holds (DPD flushed it, it was deleted or rekeyed meanwhile): nothing
            // to move up, and nothing to bring back.
            tracing::info!(
                "ike 0:{}: the other member's later copy of IKE SA {:016x}/{:016x} is for an SA not held here (any more): ignored",
                rec.tunnel,
                rec.spi_i,
                rec.spi_r
            );
            return Ok(());
        }
        self.continue_sa(now, t, false)
    }

    /// This ikemgr was restarted (`kill -9`, a crash) and hasyncd's local replica still
    /// holds what the previous one published: continues every IKE SA of `records` (same
    /// SPIs, keys and message IDs) and republishes its CHILD SAs exactly as `children`
    /// (the published `sa.child` records) had them, outbound sequence start included, so
    /// espd sees the same records and keeps its SAs and counters untouched; the peer
    /// notices nothing. Called before this ikemgr publishes anything. Returns how many IKE
    /// SAs were restored.
    /// `marks` are the RFC 6311 sync marks hasyncd recorded (see the module's rule): an
    /// IKE SA with one is not synced again, whatever its record says.
    pub fn restore_local(
        &mut self,
        now: Instant,
        records: &[IkeSaRecord],
        children: &[BusChild],
        marks: &[SeqMark],
    ) -> usize {
        let mut n = 0;
        for rec in records {
            let start_seqs = children
                .iter()
                .filter(|c| c.tunnel == rec.tunnel)
                .map(|c| SeqMark {
                    tunnel: c.tunnel.clone(),
                    spi_out: c.spi_out,
                    seq_hw: c.initial_seq,
                })
                .chain(
                    marks
                        .iter()
                        .filter(|m| {
                            m.tunnel == rec.tunnel
                                && m.spi_out == ike_mid_mark_spi(rec.spi_i, rec.spi_r)
                        })
                        .cloned(),
                )
                .collect();
            // The lifetimes as published (a taken-over SA's are already reduced), so the
            // republished records are the same.
            let lifetimes = children
                .iter()
                .filter(|c| c.tunnel == rec.tunnel)
                .map(|c| LifetimeLeft {
                    spi_out: c.spi_out,
                    left: c.lifetime,
                })
                .collect();
            let t = TakeoverInfo {
                ike: rec.clone(),
                start_seqs,
                lifetimes,
                held_only: false,
            };
            match self.continue_sa(now, &t, true) {
                Ok(()) => n += 1,
                Err(e) => tracing::error!(
                    "ike 0:{}: cannot restore the IKE SA from the local replica: {e}",
                    rec.tunnel
                ),
            }
        }
        n
    }

    /// Continues the IKE SA of `t.ike` here: a takeover from another member, or
    /// (`restart`) the IKE SA this member's previous ikemgr carried.
    fn continue_sa(&mut self, now: Instant, t: &TakeoverInfo, restart: bool) -> Result<(), String> {
        let rec = &t.ike;
        if let Some(e) = self
            .sas
            .values_mut()
            .find(|e| e.name == rec.tunnel && e.sa.is_established())
        {
            // Taken back while the SA stayed established here (this member's hasyncd
            // restarted while its partner carried the tunnel).
            let id = e.serial;
            if restart || !copy_moved_on(e, rec) {
                // The same SA: it is kept, but the partner may have moved the message IDs
                // on (answered the peer's DPD, say); without this the peer's next request
                // is dropped as out of window and its DPD gives the SA up. Sequence
                // numbers move through hasyncd's skip to espd.
                let same = e.sa.spis() == (rec.spi_i, rec.spi_r);
                // The copy is later than the SA here: the other member exchanged messages
                // with the peer, and may have followed it to a new NAT mapping.
                let later = same && !restart && copy_ahead(e, rec);
                if same && e.sa.adopt_copy_message_ids(rec.next_send, rec.next_recv) {
                    let (send, recv) = e.sa.message_ids();
                    tracing::info!(
                        "ike 0:{}:{id}: taken back while established here: message IDs now send/recv={send}/{recv} (the other member's copy)",
                        rec.tunnel
                    );
                }
                if same && !restart {
                    self.adopt_recorded_mid_sync(now, id, rec, &t.start_seqs);
                }
                if later {
                    self.follow_copy_path(id, rec);
                }
                return Ok(());
            }
            // The partner rekeyed the IKE SA or a CHILD SA meanwhile: the peer holds the
            // copy's SAs, not these.
            self.replace_with_copy(now, id, t)?;
            self.ha
                .taken
                .insert(rec.tunnel.clone(), (rec.spi_i, rec.spi_r));
            self.mid_sync_after_takeover(now, id, rec, &t.start_seqs);
            self.pump(id, now);
            return Ok(());
        }
        if self.ha.taken.get(&rec.tunnel) == Some(&(rec.spi_i, rec.spi_r)) {
            return Ok(());
        }
        let Restored {
            g,
            info,
            children,
            addrs,
            sa,
        } = self.restore_copy(now, rec)?;
        let serial = self.next_serial;
        self.next_serial += 1;
        for spi in sa.local_spis() {
            self.by_spi.insert(spi, serial);
        }
        self.note_instance_name(&g.name, &rec.tunnel);
        self.sas.insert(
            serial,
            Entry {
                gateway: g.name.clone(),
                name: rec.tunnel.clone(),
                serial,
                sa,
                info: Some(info.clone()),
                children: BTreeMap::new(),
                routes: Vec::new(),
                activity_reported: None,
                half_open: None,
                probe: None,
                created: now,
                withdrawn: false,
            },
        );
        tracing::info!(
            "ike 0:{}:{serial}: {} of IKE SA {:016x}/{:016x} with {}, message IDs send/recv={}/{}",
            rec.tunnel,
            if restart {
                "restart: continued from the local hasyncd replica"
            } else {
                "HA takeover"
            },
            info.spi_i,
            info.spi_r,
            addrs.remote,
            rec.next_send,
            rec.next_recv
        );
        self.bodies.push(Body::Tunnel(super::tunnel_up_record(
            &g,
            &rec.tunnel,
            &addrs,
        )));
        // A restart republishes each CHILD SA once, outbound on, as espd holds it: no
        // inbound-only step (espd would stop sending on it for a moment).
        self.ha.restoring = restart;
        self.install_copied_children(serial, &g, t, &children);
        self.ha.restoring = false;
        self.ha
            .taken
            .insert(rec.tunnel.clone(), (rec.spi_i, rec.spi_r));
        self.mid_sync_after_takeover(now, serial, rec, &t.start_seqs);
        // Files the restored SA's timers (rekeys, lifetimes) and publishes its record.
        self.pump(serial, now);
        Ok(())
    }

    /// The IKE SA of a copy `rec`, restored (same SPIs, keys and message IDs) with its
    /// phase1, its CHILD SAs and its addresses: what a takeover, a restart and a take-back
    /// of a later copy continue.
    fn restore_copy(&mut self, now: Instant, rec: &IkeSaRecord) -> Result<Restored, String> {
        let g = self
            .gateways
            .get(&rec.phase1)
            .cloned()
            .ok_or_else(|| format!("no phase1 {:?} here", rec.phase1))?;
        let snap = decode_state(rec)?;
        let info = snap.info.clone();
        let children = snap.children.iter().map(|(c, _)| c.clone()).collect();
        let addrs = snap.addresses;
        let cfg = self.per_sa_config(&g, addrs.local.ip());
        let sa = Box::new(IkeSa::restore(now, cfg, Box::new(OsEntropy), snap));
        Ok(Restored {
            g,
            info,
            children,
            addrs,
            sa,
        })
    }

    /// Installs `children` (a copy's CHILD SAs) on SA `id`, each outbound at the start
    /// `t` gives it and with the lifetime it says is left.
    fn install_copied_children(
        &mut self,
        id: u64,
        g: &Gateway,
        t: &TakeoverInfo,
        children: &[ChildSaInfo],
    ) {
        for m in t.start_seqs.iter().filter(|m| !is_ike_mid_mark(m.spi_out)) {
            self.ha.start_seq.insert(m.spi_out, m.seq_hw);
        }
        for l in &t.lifetimes {
            self.ha.lifetime_left.insert(l.spi_out, l.left);
        }
        for c in children {
            tracing::info!(
                "ike 0:{}:{id}: HA CHILD SA out {:08x} starts at sequence {}",
                t.ike.tunnel,
                c.outbound_spi,
                self.ha.initial_seq(c.outbound_spi)
            );
            self.child_up(id, g, c);
        }
        for c in children {
            self.ha.start_seq.remove(&c.outbound_spi);
            self.ha.lifetime_left.remove(&c.outbound_spi);
        }
    }

    /// Taken back while established here, but the copy `t` is a later state of the
    /// tunnel than SA `id` (the partner rekeyed the IKE SA or a CHILD SA while it carried
    /// it): the IKE SA is replaced by the copy in place (same serial, tunnel and routes),
    /// the CHILD SAs the copy no longer has are removed, the ones it added are installed
    /// at the takeover's starts, and the ones both hold stay as espd has them (hasyncd's
    /// skip moved their counters). The tunnel stays up throughout.
    fn replace_with_copy(&mut self, now: Instant, id: u64, t: &TakeoverInfo) -> Result<(), String> {
        let rec = &t.ike;
        let Restored {
            g,
            info,
            children,
            sa,
            ..
        } = self.restore_copy(now, rec)?;
        let Some(e) = self.sas.get_mut(&id) else {
            return Err(format!("SA {id} is gone"));
        };
        let (old_i, old_r) = e.sa.spis();
        let old_children: Vec<u32> = e.children.keys().copied().collect();
        for spi in e.sa.local_spis() {
            if self.by_spi.get(&spi) == Some(&id) {
                self.by_spi.remove(&spi);
            }
        }
        self.by_peer_spi.retain(|_, v| *v != id);
        for spi in sa.local_spis() {
            self.by_spi.insert(spi, id);
        }
        e.sa = sa;
        e.info = Some(info);
        e.probe = None;
        self.ha.mark_wait.remove(&id);
        tracing::info!(
            "ike 0:{}:{id}: taken back while established here, but the other member's copy is later (IKE SA {old_i:016x}/{old_r:016x} -> {:016x}/{:016x}, message IDs send/recv={}/{}, CHILD SAs {:08x?} -> {:08x?}): continuing the copy",
            rec.tunnel,
            rec.spi_i,
            rec.spi_r,
            rec.next_send,
            rec.next_recv,
            old_children,
            children.iter().map(|c| c.inbound_spi).collect::<Vec<_>>()
        );
        for spi in old_children
            .iter()
            .filter(|s| !children.iter().any(|c| c.inbound_spi == **s))
        {
            self.child_down(id, &g, *spi, DeleteReason::Rekeyed);
        }
        let added: Vec<ChildSaInfo> = children
            .into_iter()
            .filter(|c| !old_children.contains(&c.inbound_spi))
            .collect();
        self.install_copied_children(id, &g, t, &added);
        Ok(())
    }

    /// SA `id`, established here, was taken back from a member that recorded an RFC 6311
    /// sync of it (its mark among `start_seqs`) while it held the tunnel: that member may
    /// have sent it, so this one sends none (strongSwan deletes an AEAD IKE SA asked twice),
    /// gives up its own if reserved and not yet sent, and continues at or above the mark's
    /// M1, as the peer does after the sync.
    fn adopt_recorded_mid_sync(
        &mut self,
        now: Instant,
        id: u64,
        rec: &IkeSaRecord,
        start_seqs: &[SeqMark],
    ) {
        let Some(m1) = recorded_mid_mark(rec, start_seqs) else {
            return;
        };
        let waited = self.ha.mark_wait.remove(&id).is_some();
        let Some(e) = self.sas.get_mut(&id) else {
            return;
        };
        e.sa.adopt_mid_sync_mark(m1);
        let reserved = e.sa.mid_sync_reserved();
        if reserved {
            let _ = e.sa.release_mid_sync(now);
        }
        let (send, recv) = e.sa.message_ids();
        tracing::info!(
            "ike 0:{}:{id}: another member recorded an RFC 6311 sync of this IKE SA while it held the tunnel (M1={m1}){}: continuing at send/recv msg IDs={send}/{recv}",
            rec.tunnel,
            if reserved || waited {
                "; the sync reserved here is given up"
            } else {
                ""
            }
        );
        self.pump(id, now);
    }

    /// After a takeover of `rec` continued as SA `id`: the copy may be behind (an exchange
    /// in flight when the old owner died, or done within its last publishing tick), so
    /// RFC 6311 when the peer announced it, at most once on an AEAD SA (see the module's
    /// rule), or the mark another member recorded among `start_seqs`.
    fn mid_sync_after_takeover(
        &mut self,
        now: Instant,
        serial: u64,
        rec: &IkeSaRecord,
        start_seqs: &[SeqMark],
    ) {
        let mark_spi = ike_mid_mark_spi(rec.spi_i, rec.spi_r);
        let mark = recorded_mid_mark(rec, start_seqs);
        if let Some(e) = self.sas.get_mut(&serial) {
            if let Some(m1) = mark {
                // A member recorded a sync on this SA (its copy here may be older).
                e.sa.adopt_mid_sync_mark(m1);
                tracing::info!(
                    "ike 0:{}:{serial}: the cluster recorded an RFC 6311 sync of this IKE SA (M1={m1}): continuing at send/recv msg IDs={}/{}",
                    rec.tunnel,
                    e.sa.message_ids().0,
                    e.sa.message_ids().1
                );
            }
            let start = if e.sa.mid_sync_once_only() {
                e.sa.reserve_mid_sync(MID_SYNC_MARGIN)
            } else {
                e.sa.sync_message_ids(now, MID_SYNC_MARGIN)
            };
            match start {
                Ok(MidSyncStart::Sent) => tracing::info!(
                    "ike 0:{}:{serial}: sending IKEV2_MESSAGE_ID_SYNC, expected send/recv msg IDs={}/{}",
                    rec.tunnel,
                    rec.next_send.saturating_add(MID_SYNC_MARGIN),
                    rec.next_recv
                ),
                Ok(MidSyncStart::Reserved { next_send }) => {
                    tracing::info!(
                        "ike 0:{}:{serial}: RFC 6311 sync reserved (AEAD IKE SA: one sync only): waiting until every cluster member recorded it (M1={next_send})",
                        rec.tunnel
                    );
                    let m = SeqMark {
                        tunnel: rec.tunnel.clone(),
                        spi_out: mark_spi,
                        seq_hw: u64::from(next_send),
                    };
                    self.ha.mark_wait.insert(
                        serial,
                        (m.clone(), now + MID_MARK_WAIT, now + MID_MARK_REPEAT),
                    );
                    self.bodies.push(Body::SeqLeaseRequest { sas: vec![m] });
                }
                Ok(MidSyncStart::NotSupported) => tracing::info!(
                    "ike 0:{}:{serial}: peer did not announce RFC 6311: message IDs as synced",
                    rec.tunnel
                ),
                Ok(MidSyncStart::AeadIvReuse) => tracing::info!(
                    "ike 0:{}:{serial}: no RFC 6311 sync on this AEAD IKE SA (the peer's response would reuse message ID 0, which may reuse its IV): message IDs as synced",
                    rec.tunnel
                ),
                Ok(MidSyncStart::AlreadySynced) => tracing::info!(
                    "ike 0:{}:{serial}: no RFC 6311 sync: this AEAD IKE SA was synced already (a second response with message ID 0 would reuse the peer's IV): message IDs as synced",
                    rec.tunnel
                ),
                Err(err) => tracing::warn!(
                    "ike 0:{}:{serial}: no message ID sync: {err}",
                    rec.tunnel
                ),
            }
        }
    }
}

/// The RFC 6311 sync mark (M1) recorded for `rec`'s IKE SA among `start_seqs`, if any.
fn recorded_mid_mark(rec: &IkeSaRecord, start_seqs: &[SeqMark]) -> Option<u32> {
    let mark_spi = ike_mid_mark_spi(rec.spi_i, rec.spi_r);
    start_seqs
        .iter()
        .find(|m| m.spi_out == mark_spi)
        .map(|m| u32::try_from(m.seq_hw).unwrap_or(u32::MAX))
}

/// An IKE SA restored from a copy ([`IkeManager::restore_copy`]).
struct Restored {
    g: std::sync::Arc<Gateway>,
    info: ike_proto::IkeSaInfo,
    children: Vec<ChildSaInfo>,
    addrs: Addresses,
    sa: Box<IkeSa>,
}

/// Whether the copy `rec` of the tunnel SA `e` carries here is a later state of it: the
/// IKE SA rekeyed (other SPIs), or a CHILD SA rekeyed, added or deleted (other CHILD SAs)
/// by an exchange that moved the message IDs past this SA's. A copy as old as this SA or
/// older (a repeated takeover) is not.
fn copy_moved_on(e: &Entry, rec: &IkeSaRecord) -> bool {
    if e.sa.spis() != (rec.spi_i, rec.spi_r) {
        return true;
    }
    if !copy_ahead(e, rec) {
        return false;
    }
    let Ok(snap) = decode_state(rec) else {
        return false;
    };
    let mut copied: Vec<u32> = snap.children.iter().map(|(c, _)| c.inbound_spi).collect();
    copied.sort_unstable();
    let held: Vec<u32> = e.children.keys().copied().collect();
    copied != held
}

/// The copy `rec` of SA `e` (same SPIs) is later than `e`: its message IDs are past
/// `e`'s, never behind.
fn copy_ahead(e: &Entry, rec: &IkeSaRecord) -> bool {
    let (send, recv) = e.sa.message_ids();
    (rec.next_send, rec.next_recv) != (send, recv) && rec.next_send >= send && rec.next_recv >= recv
}

impl IkeManager {
    /// SA `id` was taken back with a later copy `rec` of itself: when the other member
    /// followed the peer to another address or port meanwhile (a NAT rebinding), the SA
    /// here follows too and its UDP-encapsulated CHILD SAs are re-published with the new
    /// destination. Otherwise the peer would never hear this member again: its NAT no
    /// longer maps the old port.
    fn follow_copy_path(&mut self, id: u64, rec: &IkeSaRecord) {
        let path = match decode_state(rec) {
            Ok(snap) => snap.addresses,
            Err(err) => {
                tracing::warn!(
                    "ike 0:{}:{id}: the other member's copy does not decode ({err}): the peer's address stays as held here",
                    rec.tunnel
                );
                return;
            }
        };
        let Some(e) = self.sas.get_mut(&id) else {
            return;
        };
        let before = e.sa.addresses().remote;
        if e.sa.adopt_copy_path(path) {
            tracing::info!(
                "ike 0:{}:{id}: the other member followed the peer from {before} to {} while it carried the tunnel: following",
                rec.tunnel,
                e.sa.addresses().remote
            );
            self.follow_peer(id);
        }
    }

    /// hasyncd granted leases (`SeqLeaseGranted`): a reserved RFC 6311 sync whose mark is
    /// among them is recorded by every live member and goes out now.
    pub fn mid_marks_granted(&mut self, now: Instant, marks: &[SeqMark]) {
        let ready: Vec<u64> = self
            .ha
            .mark_wait
            .iter()
            .filter(|(_, (w, _, _))| {
                marks
                    .iter()
                    .any(|m| m.tunnel == w.tunnel && m.spi_out == w.spi_out && m.seq_hw >= w.seq_hw)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            self.ha.mark_wait.remove(&id);
            let Some(e) = self.sas.get_mut(&id) else {
                continue;
            };
            if !e.sa.mid_sync_reserved() {
                continue;
            }
            match e.sa.sync_message_ids(now, MID_SYNC_MARGIN) {
                Ok(_) => {
                    let (send, recv) = e.sa.message_ids();
                    tracing::info!(
                        "ike 0:{}:{id}: every cluster member recorded the sync: sending IKEV2_MESSAGE_ID_SYNC, our send/recv msg IDs={send}/{recv}",
                        e.name
                    );
                }
                Err(err) => {
                    tracing::warn!("ike 0:{}:{id}: no message ID sync: {err}", e.name);
                    let _ = e.sa.release_mid_sync(now);
                }
            }
            self.pump(id, now);
        }
    }

    /// Reserved syncs: the mark is asked for again every [`MID_MARK_REPEAT`]; one not
    /// granted within [`MID_MARK_WAIT`] is given up.
    pub(super) fn mid_mark_timers(&mut self, now: Instant) {
        let mut again = Vec::new();
        for (m, _, repeat) in self.ha.mark_wait.values_mut() {
            if *repeat <= now {
                *repeat = now + MID_MARK_REPEAT;
                again.push(m.clone());
            }
        }
        if !again.is_empty() {
            self.bodies.push(Body::SeqLeaseRequest { sas: again });
        }
        let late: Vec<u64> = self
            .ha
            .mark_wait
            .iter()
            .filter(|(_, (_, deadline, _))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.ha.mark_wait.remove(&id);
            let Some(e) = self.sas.get_mut(&id) else {
                continue;
            };
            tracing::warn!(
                "ike 0:{}:{id}: the cluster did not record the RFC 6311 sync within {:?}: no sync, message IDs as synced",
                e.name,
                MID_MARK_WAIT
            );
            let _ = e.sa.release_mid_sync(now);
            self.pump(id, now);
        }
    }

    /// Deadline of the earliest reserved sync.
    pub(super) fn mid_mark_deadline(&self) -> Option<Instant> {
        self.ha.mark_wait.values().map(|(_, d, r)| *d.min(r)).min()
    }
}

impl IkeManager {
    /// Starts a rekey of `tunnel`'s IKE SA (`ike`) or of its first current CHILD SA now,
    /// as the lifetimes would (operator command `ike-rekey`, used to show rekeys on a
    /// taken-over tunnel). Returns what was started. A CHILD SA the peer has just replaced
    /// by its own rekey is not current: until its Delete arrives it is still listed, and the
    /// peer answers a rekey of it with TEMPORARY_FAILURE (the `ha_haven_peer` split-brain
    /// test once asked for a rekey 3 ms after answering the peer's, and timed out).
    pub fn rekey_now(&mut self, now: Instant, tunnel: &str, ike: bool) -> Result<String, String> {
        let id = self
            .entry_by_tunnel(tunnel)
            .ok_or_else(|| format!("no established IKE SA for {tunnel:?}"))?;
        let what = {
            let e = self.sas.get_mut(&id).ok_or("SA gone")?;
            if ike {
                e.sa.rekey_ike(now).map_err(|e| e.to_string())?;
                let (i, r) = e.sa.spis();
                format!("IKE SA {i:016x}/{r:016x} rekey started")
            } else {
                let spi = *e.sa.current_child_spis().first().ok_or("no CHILD SA")?;
                e.sa.rekey_child(now, spi).map_err(|e| e.to_string())?;
                format!("CHILD SA {spi:08x} rekey started")
            }
        };
        tracing::info!("ike 0:{tunnel}:{id}: {what}");
        self.pump(id, now);
        Ok(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    use crate::ike::tests::{mgr, shuttle, DIAL, HUB};

    fn records(bodies: &[Body]) -> Vec<IkeSaRecord> {
        bodies
            .iter()
            .filter_map(|b| match b {
                Body::IkeSa(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// The RFC 6311 sync marks asked of hasyncd among `bodies`.
    fn mark_requests(bodies: &[Body]) -> Vec<SeqMark> {
        bodies
            .iter()
            .filter_map(|b| match b {
                Body::SeqLeaseRequest { sas } => Some(sas.clone()),
                _ => None,
            })
            .flatten()
            .filter(|m| is_ike_mid_mark(m.spi_out))
            .collect()
    }

    /// The hub's liveness check `round` reaches `m` and is answered.
    fn probe_answered(hub: &mut IkeManager, m: &mut IkeManager, now: Instant, round: u64) -> bool {
        hub.probe(now, "hub", round);
        shuttle(hub, m, now);
        hub.drain_bodies()
            .iter()
            .any(|x| matches!(x, Body::ProbeResult { outcome, .. } if outcome == "reply"))
    }

    fn connect(hub: &mut IkeManager, dial: &mut IkeManager, now: Instant) {
        let gw_b: IpAddr = "192.0.2.2".parse().unwrap();
        hub.initiate(now, "hub", "192.0.2.1".parse().unwrap(), gw_b);
        shuttle(hub, dial, now);
    }

    #[test]
    fn a_request_for_an_unknown_ike_sa_is_reported_and_a_released_tunnel_goes_silently() {
        let now = Instant::now();
        let mut hub = mgr(HUB, now);
        let mut dial = mgr(DIAL, now);
        connect(&mut hub, &mut dial, now);
        let (spis, tunnel) = {
            let e = dial.sas.values().next().expect("dial-up SA");
            (e.sa.spis(), e.name.clone())
        };
        // Another member without the SA gets the hub's next request (a liveness check).
        let mut other = mgr(DIAL, now);
        hub.probe(now, "hub", 1);
        let t = hub.poll_transmit().expect("probe");
        other.handle_datagram(now, t.destination, t.source, &t.payload);
        assert_eq!(other.take_unknown_requests(), vec![spis]);
        assert!(other.take_unknown_requests().is_empty());
        // A response for an unknown SA is not a reason to promote anything.
        other.handle_datagram(now, t.destination, t.source, &{
            let mut p = t.payload.clone();
            p[19] |= 0x20;
            p
        });
        assert!(other.take_unknown_requests().is_empty());
        // The tunnel another member took: dropped without a word to the peer.
        dial.drain_bodies();
        assert!(dial.ha_release(now, &tunnel));
        assert!(dial.sas.is_empty());
        assert!(dial.poll_transmit().is_none());
        assert!(dial
            .drain_bodies()
            .iter()
            .any(|b| matches!(b, Body::IkeSaRemoved { .. })));
        assert!(!dial.ha_release(now, &tunnel));
    }

    #[test]
    fn a_dialup_instance_is_not_named_after_a_tunnel_another_member_carries() {
        let now = Instant::now();
        let mut hub = mgr(HUB, now);
        let mut dial = mgr(DIAL, now);
        dial.set_ha_reserved(["vpn1_1".to_string()].into_iter().collect());
        connect(&mut hub, &mut dial, now);
        let names: Vec<&str> = dial.sas.values().map(|e| e.name.as_str()).collect();
        assert_eq!(names, vec!["vpn1_2"]);
    }

    /// FGSP members name new instances of a synced dial-up phase1 from disjoint classes
    /// of numbers: two members establishing tunnels at the same moment, neither knowing
    /// of the other's, never pick the same name. A phase1 without `fgsp-sync` numbers as
    /// before.
    #[test]
    fn fgsp_members_name_simultaneous_dialup_instances_apart() {
        let now = Instant::now();
        let fgsp = |member: u8, sync: bool| {
            let text = format!(
                "config system standalone-cluster\n    set standalone-group-id 1\n    \
                 set group-member-id {member}\n    config cluster-peer\n        edit 1\n            \
                 set peerip 172.31.1.9\n        next\n    end\nend\n{}",
                DIAL.replace(
                    "set type dynamic",
                    if sync {
                        "set type dynamic\n        set fgsp-sync enable"
                    } else {
                        "set type dynamic"
                    }
                )
            );
            mgr(&text, now)
        };
        // Each member's instances, as the hub's peers dial in one after the other.
        let names = |m: &mut IkeManager, peers: usize| -> Vec<String> {
            for _ in 0..peers {
                let mut hub = mgr(HUB, now);
                connect(&mut hub, m, now);
            }
            let mut v: Vec<String> = m.sas.values().map(|e| e.name.clone()).collect();
            v.sort_by_key(|n| n.trim_start_matches("vpn1_").parse::<u32>().unwrap());
            v
        };
        let mut a = fgsp(0, true);
        let mut b = fgsp(1, true);
        let mut last = fgsp(15, true);
        assert_eq!(names(&mut a, 2), ["vpn1_16", "vpn1_32"]);
        assert_eq!(names(&mut b, 2), ["vpn1_1", "vpn1_17"]);
        assert_eq!(names(&mut last, 2), ["vpn1_15", "vpn1_31"]);
        // Names reserved by other members are still skipped within the class.
        let mut c = fgsp(1, true);
        c.set_ha_reserved(["vpn1_1".to_string()].into_iter().collect());
        assert_eq!(names(&mut c, 1), ["vpn1_17"]);
        // Without fgsp-sync the phase1 is not shared: plain numbering.
        let mut plain = fgsp(1, false);
        assert_eq!(names(&mut plain, 2), ["vpn1_1", "vpn1_2"]);
    }

    /// The hub's peer, and a member that took its AEAD IKE SA over from a copy and reserved
    /// an RFC 6311 sync (nothing sent yet): (hub, member, the copy, the mark it asked for).
    fn taken_over_with_a_reserved_sync(
        now: Instant,
    ) -> (IkeManager, IkeManager, IkeSaRecord, Vec<SeqMark>) {
        let mut hub = mgr(HUB, now);
        let mut dial = mgr(DIAL, now);
        connect(&mut hub, &mut dial, now);
        let rec = records(&dial.drain_bodies()).pop().expect("record");
        drop(dial);
        let mut m = mgr(DIAL, now);
        m.takeover(
            now,
            &TakeoverInfo {
                ike: rec.clone(),
                start_seqs: vec![],
                lifetimes: vec![],
                held_only: false,
            },
        )
        .unwrap();
        let marks = mark_requests(&m.drain_bodies());
        assert_eq!(marks.len(), 1);
        (hub, m, rec, marks)
    }

    /// A reserved RFC 6311 sync asks hasyncd for its mark again every MID_MARK_REPEAT
    /// until the grant arrives: a grant (or request) lost on the bus delays the sync, it
    /// does not lose it. The sync goes out only once granted.
    #[test]
    fn a_reserved_syncs_mark_is_asked_again_until_granted() {
        let now = Instant::now();
        let (mut hub, mut m, _, marks) = taken_over_with_a_reserved_sync(now);
        // No grant: asked again at each repeat, nothing sent to the peer meanwhile.
        for k in 1..=3 {
            m.handle_timeout(now + MID_MARK_REPEAT * k);
            assert_eq!(mark_requests(&m.drain_bodies()), marks, "repeat {k}");
            assert!(m.poll_transmit().is_none(), "no sync before the grant");
        }
        m.mid_marks_granted(now + MID_MARK_REPEAT * 3, &marks);
        let sync = m.poll_transmit().expect("the sync once granted");
        hub.handle_datagram(now, sync.destination, sync.source, &sync.payload);
        shuttle(&mut hub, &mut m, now);
        assert!(probe_answered(&mut hub, &mut m, now, 1));
    }

    /// Taken back from a member that synced the IKE SA while it held the tunnel (its mark
    /// comes as a held-only takeover): the sync reserved here is given up, our next
    /// request carries at least the mark's M1, and a grant arriving late sends nothing.
    #[test]
    fn a_sync_recorded_by_the_member_a_tunnel_was_taken_back_from_replaces_the_one_reserved_here() {
        let now = Instant::now();
        let (_hub, mut m, rec, marks) = taken_over_with_a_reserved_sync(now);
        let m1 = u32::try_from(marks[0].seq_hw).unwrap();
        assert!(m.poll_transmit().is_none(), "reserved, not sent");
        m.takeover(
            now,
            &TakeoverInfo {
                ike: rec.clone(),
                start_seqs: marks.clone(),
                lifetimes: vec![],
                held_only: true,
            },
        )
        .unwrap();
        let ids = m.sas.values().next().unwrap().sa.message_ids();
        assert_eq!(ids, (m1, rec.next_recv));
        m.handle_timeout(now + MID_MARK_REPEAT);
        assert!(
            mark_requests(&m.drain_bodies()).is_empty(),
            "the mark is not asked for again"
        );
        m.mid_marks_granted(now + MID_MARK_REPEAT, &marks);
        assert!(m.poll_transmit().is_none(), "no sync after all");
    }

    #[test]
    fn a_standby_refuses_new_ike_sas() {
        let now = Instant::now();
        let mut hub = mgr(HUB, now);
        let mut dial = mgr(DIAL, now);
        dial.set_ha_standby(now, true, true);
        connect(&mut hub, &mut dial, now);
        assert!(dial.sas.is_empty());
        assert!(dial.drain_bodies().is_empty());
        dial.set_ha_standby(now, false, true);
        hub.clear(now, None);
        connect(&mut hub, &mut dial, now);
        assert_eq!(dial.sas.len(), 1);
        dial.drain_bodies();
        // Demoted: the SAs go silently (the new primary continues them).
        dial.set_ha_standby(now, true, true);
        assert!(dial.sas.is_empty());
        assert!(dial.poll_transmit().is_none());
        let b = dial.drain_bodies();
        assert!(
            b.iter().any(|x| matches!(x, Body::IkeSaRemoved { .. })),
            "{b:?}"
        );
        assert!(
            b.iter().any(|x| matches!(x, Body::ChildSaRemoved { .. })),
            "{b:?}"
        );
    }

    /// hasyncd restarted on the primary and is electing (hello): new IKE SAs wait, the
    /// established ones stay (they used to be dropped, and the tunnel with them, although
    /// nobody else had taken it); they go once the election makes this member secondary.
    #[test]
    fn a_hello_keeps_the_sas_and_a_settled_standby_drops_them() {
        let now = Instant::now();
        let mut hub = mgr(HUB, now);
        let mut dial = mgr(DIAL, now);
        connect(&mut hub, &mut dial, now);
        assert_eq!(dial.sas.len(), 1);
        dial.drain_bodies();
        dial.set_ha_standby(now, true, false);
        assert_eq!(dial.sas.len(), 1, "kept while hasyncd elects");
        assert!(dial.drain_bodies().is_empty(), "nothing removed");
        // Primary again: kept, nothing happened.
        dial.set_ha_standby(now, false, true);
        assert_eq!(dial.sas.len(), 1);
        // Hello, then secondary: dropped then.
        dial.set_ha_standby(now, true, false);
        assert_eq!(dial.sas.len(), 1);
        dial.set_ha_standby(now, true, true);
        assert!(dial.sas.is_empty(), "a settled standby drops them");
        assert!(dial.poll_transmit().is_none(), "silently");
    }

    /// A takeover of a tunnel whose IKE SA is still established here (taken back after the
    /// partner carried it) keeps the SA and moves its message IDs up to the copy's, never
    /// down.
    #[test]
    fn a_tunnel_taken_back_while_established_adopts_the_copys_message_ids() {
        let now = Instant::now();
        let mut hub = mgr(HUB, now);
        let mut dial = mgr(DIAL, now);
        connect(&mut hub, &mut dial, now);
        let rec = records(&dial.drain_bodies()).pop().expect("IKE SA record");
        let ids = |m: &IkeManager| m.sas.values().next().unwrap().sa.message_ids();
        assert_eq!(ids(&dial), (rec.next_send, rec.next_recv));
        // The partner answered two of the peer's requests and sent one of its own.
        let mut newer = rec.clone();
        newer.next_send += 1;
        newer.next_recv += 2;
        let back = |ike: &IkeSaRecord| TakeoverInfo {
            ike: ike.clone(),
            start_seqs: vec![],
            lifetimes: vec![],
            held_only: false,
        };
        dial.takeover(now, &back(&newer)).unwrap();
        assert_eq!(
            dial.sas.len(),
            1,
            "the SA is kept, not restored a second time"
        );
        assert_eq!(ids(&dial), (newer.next_send, newer.next_recv));
        dial.takeover(now, &back(&rec)).unwrap();
        assert_eq!(ids(&dial), (newer.next_send, newer.next_recv), "never down");
    }

    /// Another member's later copy of an SA carried here (`held_only`, after a split
    /// brain) moves the IDs of the SA held here, and brings back nothing this member no
    /// longer holds: a DPD flush just before it arrived must stay a flush.
    #[test]
    fn a_later_copy_only_moves_an_sa_held_here() {
        let now = Instant::now();
        let mut hub = mgr(HUB, now);
        let mut dial = mgr(DIAL, now);
        connect(&mut hub, &mut dial, now);
        let rec = records(&dial.drain_bodies()).pop().expect("IKE SA record");
        let mut newer = rec.clone();
        newer.next_send += 4;
        let later = TakeoverInfo {
            ike: newer.clone(),
            start_seqs: vec![],
            lifetimes: vec![],
            held_only: true,
        };
        dial.takeover(now, &later).unwrap();
        let ids = |m: &IkeManager| m.sas.values().next().unwrap().sa.message_ids();
        assert_eq!(ids(&dial), (newer.next_send, newer.next_recv));
        // Another IKE SA's copy, or any copy once the SA is gone, restores nothing.
        let mut other = later.clone();
        other.ike.spi_r ^= 1;
        dial.takeover(now, &other).unwrap();
        assert_eq!(dial.sas.len(), 1);
        assert_eq!(
            dial.sas.values().next().unwrap().sa.spis(),
            (rec.spi_i, rec.spi_r)
        );
        let id = *dial.sas.keys().next().unwrap();
        dial.flush(id, now, "test: DPD");
        assert!(dial.sas.is_empty());
        dial.takeover(now, &later).unwrap();
        assert!(dial.sas.is_empty(), "a flushed SA came back");
        // The same copy as a takeover (held_only unset) does restore it.
        dial.takeover(
            now,
            &TakeoverInfo {
                held_only: false,
                ..later
            },
        )
        .unwrap();
        assert_eq!(dial.sas.len(), 1);
    }

    /// Taken back while established here after the peer's NAT mapping changed while the
    /// partner carried the tunnel: the partner followed the peer to its new address and
    /// port, and so does the SA taken back, with its UDP-encapsulated CHILD SA re-published
    /// towards the new mapping. An older copy (or this member's own replica) moves nothing.
    #[test]
    fn a_tunnel_taken_back_follows_a_nat_rebinding_the_partner_saw() {
        let now = Instant::now();
        let mut hub = mgr(
            &HUB.replace(
                "set dhgrp 19",
                "set dhgrp 19\n        set nattraversal forced",
            ),
            now,
        );
        let mut dial = mgr(DIAL, now);
        connect(&mut hub, &mut dial, now);
        let rec = records(&dial.drain_bodies()).pop().expect("IKE SA record");
        let remote = |m: &IkeManager| m.sas.values().next().unwrap().sa.addresses().remote;
        let first = remote(&dial);
        assert_eq!(first.port(), ike_proto::sa::NAT_T_PORT, "floated");
        let back = |ike: &IkeSaRecord| TakeoverInfo {
            ike: ike.clone(),
            start_seqs: vec![],
            lifetimes: vec![],
            held_only: false,
        };

        // The partner takes the tunnel over; then the peer's NAT maps it to another
        // address and port, and its next liveness check reaches the partner from there.
        let mut partner = mgr(DIAL, now);
        partner.takeover(now, &back(&rec)).unwrap();
        let marks = mark_requests(&partner.drain_bodies());
        partner.mid_marks_granted(now, &marks);
        let nat: std::net::SocketAddr = "198.51.100.7:31000".parse().unwrap();
        let mut answered = false;
        for round in 0..2 {
            if round == 1 {
                hub.probe(now, "hub", 1);
            }
            for _ in 0..10 {
                while let Some(t) = partner.poll_transmit() {
                    let to = if t.destination == nat {
                        first
                    } else {
                        t.destination
                    };
                    hub.handle_datagram(now, to, t.source, &t.payload);
                }
                while let Some(t) = hub.poll_transmit() {
                    partner.handle_datagram(now, t.destination, nat, &t.payload);
                }
            }
            answered |= hub
                .drain_bodies()
                .iter()
                .any(|x| matches!(x, Body::ProbeResult { outcome, .. } if outcome == "reply"));
        }
        assert!(answered, "the partner answered the peer's check");
        assert_eq!(remote(&partner), nat, "the partner followed the peer");
        let copy = records(&partner.drain_bodies()).pop().expect("record");
        drop(partner);

        // This member's own older record moves nothing.
        dial.takeover(now, &back(&rec)).unwrap();
        assert_eq!(remote(&dial), first);
        assert!(dial.drain_bodies().is_empty());

        // Taken back with the partner's copy: same SA, new path, CHILD SA re-published.
        dial.takeover(now, &back(&copy)).unwrap();
        assert_eq!(dial.sas.len(), 1);
        assert_eq!(remote(&dial), nat);
        let b = dial.drain_bodies();
        assert!(
            b.iter().any(|x| matches!(
                x,
                Body::ChildSa(c) if c.remote == "198.51.100.7"
                    && c.encap == (bus_schema::schema::EspEncap::Udp { local_port: ike_proto::sa::NAT_T_PORT, remote_port: 31000 })
            )),
            "{b:?}"
        );
        assert!(
            !b.iter().any(|x| matches!(
                x,
                Body::IkeSaRemoved { .. }
                    | Body::TunnelRemoved { .. }
                    | Body::ChildSaRemoved { .. }
            )),
            "{b:?}"
        );
        // The peer reaches this member through its new mapping, and is answered there.
        assert!(dial.poll_transmit().is_none());
        hub.probe(now, "hub", 2);
        let t = hub.poll_transmit().expect("probe");
        dial.handle_datagram(now, t.destination, nat, &t.payload);
        let reply = dial.poll_transmit().expect("reply");
        assert_eq!(reply.destination, nat);
    }

    /// Taken back while established here after the partner, carrying the tunnel, rekeyed
    /// a CHILD SA and then the IKE SA with the peer: each time the copy replaces the SA
    /// held here in place (the peer has only the copy's SAs), the tunnel and the CHILD SAs
    /// both hold stay up, and the SA goes on working with the peer. A repeated, older
    /// copy changes nothing.
    #[test]
    fn a_tunnel_taken_back_after_the_partner_rekeyed_continues_the_copy() {
        let now = Instant::now();
        let mut hub = mgr(HUB, now);
        let mut dial = mgr(DIAL, now);
        connect(&mut hub, &mut dial, now);
        let rec = records(&dial.drain_bodies()).pop().expect("IKE SA record");
        let children = |m: &IkeManager| -> Vec<u32> {
            m.sas
                .values()
                .next()
                .unwrap()
                .children
                .keys()
                .copied()
                .collect()
        };
        let old_child = children(&dial);
        // A takeover of `ike`, with the RFC 6311 mark the cluster recorded for it if any.
        let back = |ike: &IkeSaRecord, m1: Option<u64>| TakeoverInfo {
            ike: ike.clone(),
            start_seqs: m1
                .map(|seq_hw| SeqMark {
                    tunnel: ike.tunnel.clone(),
                    spi_out: ike_mid_mark_spi(ike.spi_i, ike.spi_r),
                    seq_hw,
                })
                .into_iter()
                .collect(),
            lifetimes: vec![],
            held_only: false,
        };

        // The partner takes the tunnel over (its RFC 6311 sync granted and answered) and
        // rekeys the CHILD SA.
        let mut partner = mgr(DIAL, now);
        partner.takeover(now, &back(&rec, None)).unwrap();
        let marks = mark_requests(&partner.drain_bodies());
        partner.mid_marks_granted(now, &marks);
        shuttle(&mut hub, &mut partner, now);
        partner.rekey_now(now, "vpn1_1", false).unwrap();
        shuttle(&mut hub, &mut partner, now);
        let copy = records(&partner.drain_bodies()).pop().expect("record");
        assert_eq!((copy.spi_i, copy.spi_r), (rec.spi_i, rec.spi_r));
        let new_child = children(&partner);
        assert_eq!(new_child.len(), 1);
        assert_ne!(new_child, old_child);

        // Taken back: the old CHILD SA goes, the copy's is installed, nothing else moves.
        let m1 = Some(marks[0].seq_hw);
        dial.takeover(now, &back(&copy, m1)).unwrap();
        let b = dial.drain_bodies();
        assert_eq!(dial.sas.len(), 1);
        assert_eq!(children(&dial), new_child);
        assert!(
            b.iter().any(
                |x| matches!(x, Body::ChildSaRemoved { spi_in, .. } if *spi_in == old_child[0])
            ),
            "{b:?}"
        );
        assert!(
            b.iter()
                .any(|x| matches!(x, Body::ChildSa(c) if c.outbound && c.spi_in == new_child[0])),
            "{b:?}"
        );
        assert!(
            !b.iter()
                .any(|x| matches!(x, Body::IkeSaRemoved { .. } | Body::TunnelRemoved { .. })),
            "{b:?}"
        );
        let ids = |m: &IkeManager| m.sas.values().next().unwrap().sa.message_ids();
        assert_eq!(ids(&dial), ids(&partner));
        assert!(dial.poll_transmit().is_none(), "no second RFC 6311 sync");
        // The repeated takeover of the older copy changes nothing.
        dial.takeover(now, &back(&rec, m1)).unwrap();
        assert!(dial.drain_bodies().is_empty());
        assert_eq!(children(&dial), new_child);
        drop(partner);

        // The peer notices nothing: a probe and a CHILD rekey from its side.
        assert!(probe_answered(&mut hub, &mut dial, now, 1));
        hub.rekey_now(now, "hub", false).unwrap();
        shuttle(&mut hub, &mut dial, now);
        let after_rekey = children(&dial);
        assert_eq!(after_rekey.len(), 1);
        assert_ne!(after_rekey, new_child);
        let copy = records(&dial.drain_bodies()).pop().expect("record");

        // Again with the IKE SA rekeyed by the partner (other SPIs): continued as well.
        let mut partner = mgr(DIAL, now);
        partner.takeover(now, &back(&copy, m1)).unwrap();
        partner.drain_bodies();
        partner.rekey_now(now, "vpn1_1", true).unwrap();
        shuttle(&mut hub, &mut partner, now);
        let copy2 = records(&partner.drain_bodies()).pop().expect("record");
        assert_ne!((copy2.spi_i, copy2.spi_r), (copy.spi_i, copy.spi_r));
        dial.takeover(now, &back(&copy2, None)).unwrap();
        let b = dial.drain_bodies();
        assert!(
            !b.iter().any(|x| matches!(
                x,
                Body::IkeSaRemoved { .. }
                    | Body::TunnelRemoved { .. }
                    | Body::ChildSaRemoved { .. }
            )),
            "an IKE rekey keeps the CHILD SAs: {b:?}"
        );
        assert_eq!(
            dial.sas.values().next().unwrap().sa.spis(),
            (copy2.spi_i, copy2.spi_r)
        );
        assert_eq!(children(&dial), after_rekey);
        drop(partner);
        hub.rekey_now(now, "hub", true).unwrap();
        shuttle(&mut hub, &mut dial, now);
        let h = hub.sas.values().next().unwrap().sa.spis();
        let d = dial.sas.values().next().unwrap().sa.spis();
        assert_eq!(h, d, "the IKE rekey from the peer completed with the copy");
        assert_ne!(d, (copy2.spi_i, copy2.spi_r));
    }

    #[test]
    fn a_synced_ike_sa_is_taken_over_and_rekeyed_from_both_sides() {
        let now = Instant::now();
        let mut hub = mgr(HUB, now);
        let mut dial = mgr(DIAL, now);
        connect(&mut hub, &mut dial, now);
        let recs = records(&dial.drain_bodies());
        let rec = recs.last().expect("IKE SA record").clone();
        assert_eq!(rec.tunnel, "vpn1_1");
        assert_eq!((rec.next_send, rec.next_recv), (0, 2));
        // A liveness check moves the message IDs: a new record follows.
        hub.probe(now, "hub", 1);
        shuttle(&mut hub, &mut dial, now);
        let rec = records(&dial.drain_bodies())
            .pop()
            .expect("record after probe");
        assert_eq!(rec.next_recv, 3);
        let snap = decode_state(&rec).unwrap();
        assert_eq!((snap.info.spi_i, snap.info.spi_r), (rec.spi_i, rec.spi_r));
        let spi_out = snap.children[0].0.outbound_spi;

        // The standby member takes over: same SPIs and message IDs, CHILD SA at the lease.
        let mut standby = mgr(DIAL, now);
        standby
            .takeover(
                now,
                &TakeoverInfo {
                    ike: rec.clone(),
                    start_seqs: vec![SeqMark {
                        tunnel: "vpn1_1".into(),
                        spi_out,
                        seq_hw: 1 << 20,
                    }],
                    // The old carrier used most of the hard time: the CHILD SA is
                    // installed with what is left, not counted from zero.
                    lifetimes: vec![LifetimeLeft {
                        spi_out,
                        left: SaLifetime {
                            soft_secs: 5,
                            hard_secs: 9,
                            soft_bytes: 0,
                            hard_bytes: 0,
                        },
                    }],
                    held_only: false,
                },
            )
            .unwrap();
        let b = standby.drain_bodies();
        assert!(
            matches!(&b[0], Body::Tunnel(t) if t.name == "vpn1_1"),
            "{b:?}"
        );
        let child = b
            .iter()
            .find_map(|x| match x {
                Body::ChildSa(c) if c.spi_out == spi_out && c.outbound => Some(c),
                _ => None,
            })
            .expect("CHILD SA installed");
        assert!(child.initial_seq == 1 << 20 && child.outbound, "{child:?}");
        assert_eq!(
            (child.lifetime.soft_secs, child.lifetime.hard_secs),
            (5, 9),
            "{:?}",
            child.lifetime
        );
        assert_eq!(records(&b).len(), 1);
        assert!(matches!(
            standby.poll_route(),
            Some(super::super::RouteOp::Add { .. })
        ));
        // AES-GCM and no request of ours yet: the RFC 6311 sync is reserved and its mark
        // asked of hasyncd (M1 = 0 + the margin); nothing leaves until it is granted.
        let marks = mark_requests(&b);
        assert_eq!(
            marks,
            vec![SeqMark {
                tunnel: "vpn1_1".into(),
                spi_out: ike_mid_mark_spi(rec.spi_i, rec.spi_r),
                seq_hw: u64::from(MID_SYNC_MARGIN),
            }]
        );
        assert!(standby.transmits.is_empty());
        standby.mid_marks_granted(now, &marks);
        assert_eq!(standby.transmits.len(), 1, "the sync goes out");
        shuttle(&mut hub, &mut standby, now);
        assert_eq!(
            standby.sas.values().next().unwrap().sa.message_ids().0,
            MID_SYNC_MARGIN
        );
        standby.drain_bodies();
        // A repeated Takeover event changes nothing.
        standby
            .takeover(
                now,
                &TakeoverInfo {
                    ike: rec.clone(),
                    start_seqs: vec![],
                    lifetimes: vec![],
                    held_only: false,
                },
            )
            .unwrap();
        assert!(standby.drain_bodies().is_empty());
        drop(dial);

        // The peer notices nothing: probes, a CHILD rekey and an IKE rekey from each side.
        assert!(probe_answered(&mut hub, &mut standby, now, 2));
        hub.rekey_now(now, "hub", false).unwrap();
        shuttle(&mut hub, &mut standby, now);
        standby.rekey_now(now, "vpn1_1", false).unwrap();
        shuttle(&mut hub, &mut standby, now);
        let b = standby.drain_bodies();
        let new_children: Vec<u32> = b
            .iter()
            .filter_map(|x| match x {
                Body::ChildSa(c) if c.outbound && c.initial_seq == 1 => Some(c.spi_in),
                _ => None,
            })
            .collect();
        assert_eq!(new_children.len(), 2, "{b:?}");
        standby.rekey_now(now, "vpn1_1", true).unwrap();
        shuttle(&mut hub, &mut standby, now);
        hub.rekey_now(now, "hub", true).unwrap();
        shuttle(&mut hub, &mut standby, now);
        let last = records(&standby.drain_bodies()).pop().expect("record");
        assert_ne!((last.spi_i, last.spi_r), (rec.spi_i, rec.spi_r));
        let h = hub.sas.values().next().unwrap().sa.spis();
        assert_eq!(h, (last.spi_i, last.spi_r));
    }

    #[test]
    fn a_takeover_after_a_recorded_sync_sends_no_second_one_whatever_its_copy_says() {
        let now = Instant::now();
        let mut hub = mgr(HUB, now);
        let mut dial = mgr(DIAL, now);
        connect(&mut hub, &mut dial, now);
        let stale = records(&dial.drain_bodies()).pop().expect("record");
        assert!(!decode_state(&stale).unwrap().mid_sync_spent);
        drop(dial);
        // Member 1 takes over from that copy and syncs once hasyncd granted the mark.
        let mut m1 = mgr(DIAL, now);
        m1.takeover(
            now,
            &TakeoverInfo {
                ike: stale.clone(),
                start_seqs: vec![],
                lifetimes: vec![],
                held_only: false,
            },
        )
        .unwrap();
        let marks = mark_requests(&m1.drain_bodies());
        assert_eq!(marks.len(), 1);
        m1.mid_marks_granted(now, &marks);
        shuttle(&mut hub, &mut m1, now);
        let synced = records(&m1.drain_bodies())
            .pop()
            .expect("record after the sync");
        assert_eq!(synced.next_send, MID_SYNC_MARGIN);
        assert!(decode_state(&synced).unwrap().mid_sync_spent);
        drop(m1);
        // Member 2 from a copy made after the sync: no mark asked, nothing sent.
        let mut m2 = mgr(DIAL, now);
        m2.takeover(
            now,
            &TakeoverInfo {
                ike: synced,
                start_seqs: vec![],
                lifetimes: vec![],
                held_only: false,
            },
        )
        .unwrap();
        assert!(mark_requests(&m2.drain_bodies()).is_empty());
        assert!(m2.transmits.is_empty(), "no second sync");
        drop(m2);
        // Member 3 from the copy made before the sync (its update lost on the HA link),
        // with the mark every member recorded: no sync either, and it continues at M1.
        let mut m3 = mgr(DIAL, now);
        m3.takeover(
            now,
            &TakeoverInfo {
                ike: stale,
                start_seqs: marks,
                lifetimes: vec![],
                held_only: false,
            },
        )
        .unwrap();
        let b = m3.drain_bodies();
        assert!(mark_requests(&b).is_empty(), "{b:?}");
        assert!(m3.transmits.is_empty(), "no second sync");
        assert_eq!(
            records(&b).pop().expect("record").next_send,
            MID_SYNC_MARGIN
        );
        // The peer notices nothing: its probe is answered, our CHILD rekey completes.
        assert!(probe_answered(&mut hub, &mut m3, now, 2));
        m3.rekey_now(now, "vpn1_1", false).unwrap();
        shuttle(&mut hub, &mut m3, now);
        assert!(m3
            .drain_bodies()
            .iter()
            .any(|x| matches!(x, Body::ChildSa(c) if c.outbound && c.initial_seq == 1)));
    }

    #[test]
    fn a_restarted_manager_continues_from_the_local_replica_and_republishes_the_same_records() {
        let now = Instant::now();
        let mut hub = mgr(HUB, now);
        let mut dial = mgr(DIAL, now);
        connect(&mut hub, &mut dial, now);
        hub.probe(now, "hub", 1);
        shuttle(&mut hub, &mut dial, now);
        // What the local hasyncd holds: the last record per key, as a store would.
        let bodies = dial.drain_bodies();
        let rec = records(&bodies).pop().expect("IKE SA record");
        let mut children: BTreeMap<u32, BusChild> = BTreeMap::new();
        let mut tunnel = None;
        for b in &bodies {
            match b {
                Body::ChildSa(c) => {
                    children.insert(c.spi_in, c.clone());
                }
                Body::Tunnel(t) => tunnel = Some(t.clone()),
                _ => {}
            }
        }
        let children: Vec<BusChild> = children.into_values().collect();
        assert_eq!(children.len(), 1);
        assert!(children[0].outbound);
        // kill -9: the manager is gone; a new one starts from the replica.
        drop(dial);
        let mut again = mgr(DIAL, now);
        assert_eq!(
            again.restore_local(now, std::slice::from_ref(&rec), &children, &[]),
            1
        );
        let b = again.drain_bodies();
        // The restored SA's sync mark, granted as hasyncd would.
        let marks = mark_requests(&b);
        assert_eq!(marks.len(), 1, "{b:?}");
        again.mid_marks_granted(now, &marks);
        // The same tunnel record and the same CHILD SA record, once, outbound on: espd
        // sees nothing change.
        let republished: Vec<&BusChild> = b
            .iter()
            .filter_map(|x| match x {
                Body::ChildSa(c) => Some(c),
                _ => None,
            })
            .collect();
        assert_eq!(republished, children.iter().collect::<Vec<_>>(), "{b:?}");
        assert!(
            b.iter()
                .any(|x| matches!(x, Body::Tunnel(t) if Some(t) == tunnel.as_ref())),
            "{b:?}"
        );
        let again_rec = records(&b).pop().expect("record republished");
        assert_eq!(
            (
                again_rec.spi_i,
                again_rec.spi_r,
                again_rec.next_send,
                again_rec.next_recv
            ),
            (rec.spi_i, rec.spi_r, rec.next_send, rec.next_recv)
        );
        // The peer notices nothing: a liveness check, rekeys from both sides.
        assert!(probe_answered(&mut hub, &mut again, now, 2));
        hub.rekey_now(now, "hub", false).unwrap();
        shuttle(&mut hub, &mut again, now);
        again.rekey_now(now, "vpn1_1", true).unwrap();
        shuttle(&mut hub, &mut again, now);
        let last = records(&again.drain_bodies()).pop().expect("record");
        assert_ne!((last.spi_i, last.spi_r), (rec.spi_i, rec.spi_r));
        assert_eq!(
            hub.sas.values().next().unwrap().sa.spis(),
            (last.spi_i, last.spi_r)
        );
        // Nothing to restore, or garbage: nothing happens.
        let mut empty = mgr(DIAL, now);
        assert_eq!(empty.restore_local(now, &[], &[], &[]), 0);
        let mut bad = rec.clone();
        bad.keys = vec![1, 2, 3];
        assert_eq!(empty.restore_local(now, &[bad], &children, &[]), 0);
        assert!(empty.sas.is_empty());
    }

    #[test]
    fn garbage_state_is_refused() {
        let rec = IkeSaRecord {
            tunnel: "vpn1_1".into(),
            phase1: "vpn1".into(),
            spi_i: 1,
            spi_r: 2,
            next_send: 0,
            next_recv: 0,
            remote: "192.0.2.1:500".into(),
            keys: vec![0xc1, 0x00, 0xff],
        };
        assert!(decode_state(&rec).is_err());
    }
}
