//! The SA table the workers read: SAs by inbound SPI, and per TUN device the outbound
//! routes (remote selector prefixes, longest first). Read-mostly: the control side makes a
//! new [`Table`] on every change and swaps the `Arc`; workers take the current `Arc` once per
//! wakeup, never per packet. A new version is made from the previous one and the changes
//! ([`Table::next`]): the SPI map and the peer set are [`Sharded`] and share the shards no
//! change touched, and only the devices of the phase1s whose SAs changed get their routes
//! built again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use esp_proto::{AtomicSeq, EspCrypto, ReplayWindow, SeqLease, Transform};

use super::routes::{RouteEntry, RouteSet};
use super::shards::Sharded;
use super::tun::TunDev;

/// An IPv4 or IPv6 prefix (`10.0.1.0/24`, `::/0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `x::y/n`, or a bare address (host prefix). Host bits must be zero
    /// is not required: they are masked off.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.trim().parse::<u8>().ok().filter(|l| *l <= max)?,
            None => max,
        };
        Some(Cidr {
            addr: mask(addr, len),
            len,
        })
    }

    /// The prefix's first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Prefix length.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` lies in the prefix (never across address families).
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.len) == self.addr
            }
            _ => false,
        }
    }

    /// The first and last address, for `diagnose` output (`10.0.1.0-10.0.1.255`).
    pub fn range(&self) -> (IpAddr, IpAddr) {
        match self.addr {
            IpAddr::V4(a) => {
                let host = if self.len == 0 {
                    u32::MAX
                } else {
                    u32::MAX.checked_shr(u32::from(self.len)).unwrap_or(0)
                };
                (self.addr, IpAddr::from((u32::from(a) | host).to_be_bytes()))
            }
            IpAddr::V6(a) => {
                let host = if self.len == 0 {
                    u128::MAX
                } else {
                    u128::MAX.checked_shr(u32::from(self.len)).unwrap_or(0)
                };
                (
                    self.addr,
                    IpAddr::from((u128::from(a) | host).to_be_bytes()),
                )
            }
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// `ip` with all but its first `len` bits cleared.
pub(super) fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            IpAddr::from((u32::from(a) & m).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            IpAddr::from((u128::from(a) & m).to_be_bytes())
        }
    }
}

/// Whether `ip` lies in any of `set`.
#[inline]
pub fn any_contains(set: &[Cidr], ip: IpAddr) -> bool {
    set.iter().any(|c| c.contains(ip))
}

/// Why a packet was dropped: esp-proto's reasons first (same order, same labels), then the
/// datapath's own.
pub const DROP_LABELS: [&str; NUM_DROPS] = {
    let mut l = [""; NUM_DROPS];
    let mut i = 0;
    while i < esp_proto::DropReason::ALL.len() {
        l[i] = esp_proto::DropReason::ALL[i].as_str();
        i += 1;
    }
    l[DROP_SELECTOR] = "selector";
    l[DROP_NO_SA] = "no_sa";
    l[DROP_OUTER] = "outer_header";
    l[DROP_IKE_RELAY] = "ike_relay";
    l[DROP_TX_ERROR] = "tx_error";
    l[DROP_TUN_WRITE] = "tun_write";
    l[DROP_OFFLOAD] = "offload";
    l[DROP_ENCAP] = "encap_mismatch";
    l[DROP_LINK_SCOPE] = "link_scope";
    l
};
/// The inner packet's addresses do not match the SA's selectors.
pub const DROP_SELECTOR: usize = esp_proto::DropReason::ALL.len();
/// Outbound: no SA's remote selector covers the destination (or the source is outside
/// every local selector).
pub const DROP_NO_SA: usize = DROP_SELECTOR + 1;
/// Inbound raw ESP with a malformed outer IPv4 header.
pub const DROP_OUTER: usize = DROP_SELECTOR + 2;
/// An IKE message lost on the relay between UDP/4500 and ikemgr: one from the peer that the
/// hand-off queue refused (full) or that ikemgr did not take (not running, or no room in its
/// socket for [`super::sockets::IKE_HANDOFF_WAIT`]), or one from ikemgr that could not be
/// sent out of UDP/4500.
pub const DROP_IKE_RELAY: usize = DROP_SELECTOR + 3;
/// The kernel refused to send an ESP packet.
pub const DROP_TX_ERROR: usize = DROP_SELECTOR + 4;
/// Writing a decrypted packet to the TUN device failed.
pub const DROP_TUN_WRITE: usize = DROP_SELECTOR + 5;
/// A packet from TUN whose offload header could not be honoured.
pub const DROP_OFFLOAD: usize = DROP_SELECTOR + 6;
/// Raw ESP for an SA negotiated with UDP encapsulation, or ESP in UDP for a raw one.
pub const DROP_ENCAP: usize = DROP_SELECTOR + 7;
/// Outbound: an IPv6 packet that stays on its link (`esp_proto::inner::link_scope`: the
/// kernel's neighbour and router discovery or MLD on the TUN device) and no SA covers it.
pub const DROP_LINK_SCOPE: usize = DROP_SELECTOR + 8;
/// Number of drop reasons.
pub const NUM_DROPS: usize = DROP_SELECTOR + 9;

/// Outbound packets of one TUN device that found no SA, for traffic-triggered negotiation
/// (`esp.acquire`): a count and the addresses of one such packet per family, written by the
/// workers (two relaxed atomic operations per dropped packet, no allocation; the first IPv6
/// packet of a tick also takes an uncontended lock) and taken by the control side every
/// tick, which paces what it publishes.
#[derive(Default, Debug)]
pub struct AcquireSlot {
    /// Packets dropped for want of an SA since the last [`AcquireSlot::take`].
    dropped: AtomicU64,
    /// Inner IPv4 source (high 32 bits) and destination (low 32 bits) of the first such
    /// packet since the last take; 0 when none is noted (0.0.0.0 -> 0.0.0.0 is no packet
    /// a route sends here).
    addrs: AtomicU64,
    /// True once an IPv6 packet's pair is noted in `addrs6` (the others only count).
    noted6: AtomicBool,
    /// Inner IPv6 source and destination of the first such packet since the last take.
    addrs6: Mutex<Option<(Ipv6Addr, Ipv6Addr)>>,
}

impl AcquireSlot {
    /// Notes one packet without an SA.
    #[inline]
    pub fn note(&self, src: IpAddr, dst: IpAddr) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let packed = (u64::from(u32::from(s)) << 32) | u64::from(u32::from(d));
                if self.addrs.load(Ordering::Relaxed) == 0 {
                    // One packet's pair wins; the others of this tick only count.
                    let _ = self.addrs.compare_exchange(
                        0,
                        packed,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
            }
            (IpAddr::V6(s), IpAddr::V6(d)) if !self.noted6.load(Ordering::Relaxed) => {
                // Another worker holding the lock is noting one: this one only counts.
                if let Ok(mut slot) = self.addrs6.try_lock() {
                    if slot.is_none() {
                        *slot = Some((s, d));
                        self.noted6.store(true, Ordering::Relaxed);
                    }
                }
            }
            _ => {}
        }
    }

    /// The noted packets' (source, destination), IPv4 then IPv6, and the packets dropped
    /// since the previous take; resets all.
    pub fn take(&self) -> ([Option<(IpAddr, IpAddr)>; 2], u64) {
        let packed = self.addrs.swap(0, Ordering::Relaxed);
        let v6 = self
            .addrs6
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|(s, d)| (IpAddr::V6(s), IpAddr::V6(d)));
        self.noted6.store(false, Ordering::Relaxed);
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        // Truncating casts pick the two halves of the packed pair.
        let v4 = (packed != 0).then(|| {
            (
                IpAddr::V4(Ipv4Addr::from((packed >> 32) as u32)),
                IpAddr::V4(Ipv4Addr::from(packed as u32)),
            )
        });
        ([v4, v6], dropped)
    }
}

/// Counters updated by the workers (relaxed atomics), read by the control side.
#[derive(Default, Debug)]
pub struct DirCounters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Wall-clock ns of the worker wakeup that last moved a packet (0: never).
    pub last_ns: AtomicU64,
}

impl DirCounters {
    /// Counters that start at `c` (an SA taken back after a restart).
    pub fn starting_at(c: esp_proto::Counters) -> DirCounters {
        DirCounters {
            packets: AtomicU64::new(c.packets),
            bytes: AtomicU64::new(c.bytes),
            last_ns: AtomicU64::new(0),
        }
    }

    #[inline]
    pub fn add(&self, bytes: usize, now_ns: u64) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_ns.store(now_ns, Ordering::Relaxed);
    }

    pub fn get(&self) -> esp_proto::Counters {
        esp_proto::Counters {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// Where an SA's ESP packets go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Raw IP protocol 50 (IPv4 or IPv6 next header 50) to this address.
    Raw(IpAddr),
    /// UDP-encapsulated (RFC 3948) to this address and port, from our port 4500.
    Udp(SocketAddr),
}

impl Peer {
    /// The peer's address.
    pub fn ip(self) -> IpAddr {
        match self {
            Peer::Raw(a) => a,
            Peer::Udp(a) => a.ip(),
        }
    }
}

/// An SA's peer, changeable by the workers: a UDP-encapsulated SA follows its peer's NAT
/// mapping (RFC 3948; RFC 7296 §2.23 for IKE). A sequence lock over three words (the
/// address as 128 bits, then kind, family and port): readers never block and retry while a
/// move is being written; moves (rare) are serialised by a mutex.
#[derive(Debug)]
pub struct PeerCell {
    /// Even: stable; odd: a move is being written.
    version: AtomicU64,
    hi: AtomicU64,
    lo: AtomicU64,
    /// Bit 48: UDP; bit 49: IPv6; bits 0..16: port.
    meta: AtomicU64,
    writer: Mutex<()>,
}

const PEER_UDP: u64 = 1 << 48;
const PEER_V6: u64 = 1 << 49;

impl PeerCell {
    pub fn new(p: Peer) -> PeerCell {
        let (hi, lo, meta) = Self::pack(p);
        PeerCell {
            version: AtomicU64::new(0),
            hi: AtomicU64::new(hi),
            lo: AtomicU64::new(lo),
            meta: AtomicU64::new(meta),
            writer: Mutex::new(()),
        }
    }

    fn pack(p: Peer) -> (u64, u64, u64) {
        let (ip, udp, port) = match p {
            Peer::Raw(a) => (a, 0, 0),
            Peer::Udp(a) => (a.ip(), PEER_UDP, u64::from(a.port())),
        };
        let (bits, v6) = match ip {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 0),
            IpAddr::V6(a) => (u128::from(a), PEER_V6),
        };
        // Truncations: the two halves of the 128-bit address.
        ((bits >> 64) as u64, bits as u64, udp | v6 | port)
    }

    fn unpack(hi: u64, lo: u64, meta: u64) -> Peer {
        let bits = (u128::from(hi) << 64) | u128::from(lo);
        let ip = if meta & PEER_V6 != 0 {
            IpAddr::V6(Ipv6Addr::from(bits))
        } else {
            // Truncation: an IPv4 address was packed from a u32.
            IpAddr::V4(Ipv4Addr::from(bits as u32))
        };
        if meta & PEER_UDP != 0 {
            // Truncation: the port was packed from a u16.
            Peer::Udp(SocketAddr::new(ip, meta as u16))
        } else {
            Peer::Raw(ip)
        }
    }

    #[inline]
    pub fn get(&self) -> Peer {
        loop {
            let v1 = self.version.load(Ordering::Acquire);
            if v1 & 1 == 0 {
                let hi = self.hi.load(Ordering::Relaxed);
                let lo = self.lo.load(Ordering::Relaxed);
                let meta = self.meta.load(Ordering::Relaxed);
                std::sync::atomic::fence(Ordering::Acquire);
                if self.version.load(Ordering::Relaxed) == v1 {
                    return Self::unpack(hi, lo, meta);
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Moves a UDP-encapsulated SA to `to`; false (and no change) for a raw SA.
    pub fn move_udp(&self, to: SocketAddr) -> bool {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(self.get(), Peer::Raw(_)) {
            return false;
        }
        let (hi, lo, meta) = Self::pack(Peer::Udp(to));
        let v = self.version.load(Ordering::Relaxed);
        self.version.store(v.wrapping_add(1), Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        self.hi.store(hi, Ordering::Relaxed);
        self.lo.store(lo, Ordering::Relaxed);
        self.meta.store(meta, Ordering::Relaxed);
        self.version.store(v.wrapping_add(2), Ordering::Release);
        true
    }
}

/// One installed CHILD SA pair. Crypto contexts are per worker thread (index = worker id);
/// each sits behind its own mutex, which only that worker ever takes, so it is uncontended.
pub struct Sa {
    /// Store key `<tunnel>/<spi_in>`.
    pub key: String,
    pub tunnel: String,
    pub phase1: String,
    pub phase2: String,
    pub spi_in: u32,
    pub spi_out: u32,
    pub transform: Transform,
    pub esn: bool,
    pub local: String,
    /// Where ESP goes; UDP SAs follow an authenticated peer to a new address or port.
    pub peer: PeerCell,
    /// Times the peer moved (NAT mapping changes followed).
    pub peer_moves: AtomicU64,
    pub local_ts: Vec<Cidr>,
    pub remote_ts: Vec<Cidr>,
    /// The phase1's TUN device (decrypted packets are written here).
    pub tun: Arc<TunDev>,
    pub installed: Instant,
    pub replay_size: u32,
    pub dec: Box<[Mutex<EspCrypto>]>,
    pub enc: Box<[Mutex<EspCrypto>]>,
    pub replay: Mutex<ReplayWindow>,
    pub seq: AtomicSeq,
    /// Lease bookkeeping: only the housekeeping thread and install touch it.
    pub lease: Mutex<SeqLease>,
    /// May send (make-before-break: false while only the inbound half is live).
    pub outbound: AtomicBool,
    /// Hard lifetime reached or flushed: process nothing more.
    pub dead: AtomicBool,
    pub hard_bytes: u64,
    pub hard_packets: u64,
    /// Wall-clock ns of the hard time limit (`u64::MAX`: none); the workers compare it with
    /// the time of their wakeup, so no packet passes after it.
    pub hard_deadline_ns: u64,
    pub rx: DirCounters,
    pub tx: DirCounters,
    pub drops: [AtomicU64; NUM_DROPS],
    /// In an HA cluster: the outbound mark the cluster acknowledged (numbers at or above
    /// it are not sent); `u64::MAX` outside a cluster. See `crate::ha`.
    pub ha_hw: AtomicU64,
    /// `local` parsed: the source address of every outbound packet (unspecified: the
    /// kernel picks).
    pub local_ip: IpAddr,
}

impl Sa {
    #[inline]
    pub fn count_drop(&self, reason: usize) {
        if let Some(c) = self.drops.get(reason) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the hard volume limits still allow one more packet in that direction.
    #[inline]
    pub fn volume_ok(&self, c: &DirCounters) -> bool {
        c.bytes.load(Ordering::Relaxed) < self.hard_bytes
            && c.packets.load(Ordering::Relaxed) < self.hard_packets
    }

    pub fn drop_count(&self, reason: usize) -> u64 {
        self.drops
            .get(reason)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

/// One outbound route: traffic to `dst` (a remote selector) goes through `sa`.
#[derive(Clone)]
pub struct Route {
    pub dst: Cidr,
    pub sa: Arc<Sa>,
}

/// A TUN device with its outbound routes.
pub struct Device {
    /// The phase1 it belongs to (its name).
    pub phase1: String,
    pub tun: Arc<TunDev>,
    /// Longest prefix first, newest SA first within a length.
    pub routes: RouteSet<Route>,
}

impl RouteEntry for Route {
    #[inline]
    fn dst(&self) -> Cidr {
        self.dst
    }

    #[inline]
    fn usable(&self, src: IpAddr) -> bool {
        self.sa.outbound.load(Ordering::Relaxed)
            && !self.sa.dead.load(Ordering::Relaxed)
            && self.sa.volume_ok(&self.sa.tx)
            && any_contains(&self.sa.local_ts, src)
    }

    #[inline]
    fn received(&self) -> bool {
        self.sa.rx.packets.load(Ordering::Relaxed) > 0
    }

    #[inline]
    fn same_tunnel(&self, other: &Self) -> bool {
        self.sa.tunnel == other.sa.tunnel
    }

    fn after(&self, other: &Self) -> bool {
        // The whole build's order: SAs by key, sorted (stably) newest first.
        (other.sa.installed, &self.sa.key) > (self.sa.installed, &other.sa.key)
    }

    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.sa, &other.sa) && self.dst == other.dst
    }
}

impl Device {
    /// Longest-prefix match of `dst` over the remote selectors of outbound-enabled SAs whose
    /// local selectors hold `src` ([`RouteSet::lookup`]: a scan over a few routes, an index
    /// over many, as on the device of a dial-up phase1 with many clients).
    ///
    /// Among SAs for the same prefix the newest wins, except that a new SA that has not yet
    /// received anything yields to an older one of the same tunnel that has (make-before-break
    /// across a rekey: the peer may not have installed the new inbound SA yet; it proves it
    /// has by sending on it, or by deleting the old one).
    #[inline]
    pub fn lookup(&self, src: IpAddr, dst: IpAddr) -> Option<&Arc<Sa>> {
        self.routes.lookup(src, dst).map(|r| &r.sa)
    }
}

/// One immutable version of the table.
#[derive(Default)]
pub struct Table {
    pub generation: u64,
    pub by_spi: Sharded<u32, Arc<Sa>>,
    pub devices: Vec<Arc<Device>>,
    /// Addresses of the peers of installed SAs, with how many SAs each (an unknown SPI from
    /// one of them may belong to an SA on its way).
    pub peers: Sharded<IpAddr, usize>,
}

/// What changed since the version a publication starts from.
#[derive(Default)]
pub struct Changes {
    /// SAs that left the table (removed, or replaced under their key), each with the peer
    /// address it was counted under.
    pub removed: Vec<(Arc<Sa>, IpAddr)>,
    /// SAs that entered it, with the peer address they are counted under.
    pub installed: Vec<(Arc<Sa>, IpAddr)>,
    /// Peers that moved (ikemgr followed a NAT mapping): counted under the new address.
    pub moved: Vec<(IpAddr, IpAddr)>,
    /// Phase1s whose SAs changed: their devices' routes are built again.
    pub phase1s: HashSet<String>,
}

/// `phase1`'s device with the routes of `sas` (the SAs of that phase1).
fn device_of<'a>(
    phase1: &str,
    tun: &Arc<TunDev>,
    sas: impl Iterator<Item = &'a Arc<Sa>>,
) -> Device {
    let mut routes: Vec<Route> = sas.flat_map(routes_of).collect();
    // Longest prefix first; among equals, the newest SA first (a rekeyed SA takes over as
    // soon as it is outbound-enabled).
    routes.sort_by(|a, b| {
        b.dst
            .len()
            .cmp(&a.dst.len())
            .then(b.sa.installed.cmp(&a.sa.installed))
    });
    Device {
        phase1: phase1.to_string(),
        tun: tun.clone(),
        routes: RouteSet::new(routes),
    }
}

/// `sa`'s outbound routes: one per remote selector.
fn routes_of(sa: &Arc<Sa>) -> impl Iterator<Item = Route> + '_ {
    sa.remote_ts.iter().map(move |dst| Route {
        dst: *dst,
        sa: sa.clone(),
    })
}

fn count_peer(peers: &mut Sharded<IpAddr, usize>, ip: IpAddr) {
    match peers.get_mut(&ip) {
        Some(n) => *n += 1,
        None => {
            peers.insert(ip, 1);
        }
    }
}

fn uncount_peer(peers: &mut Sharded<IpAddr, usize>, ip: IpAddr) {
    if let Some(n) = peers.get_mut(&ip) {
        if *n > 1 {
            *n -= 1;
            return;
        }
    }
    peers.remove(&ip);
}

/// Whether `mine` holds exactly `theirs`' keys, each with an equal value.
#[cfg(debug_assertions)]
fn same_entries<K, V>(
    what: &str,
    mine: &Sharded<K, V>,
    theirs: &Sharded<K, V>,
    eq: impl Fn(&V, &V) -> bool,
) -> Result<(), String>
where
    K: super::shards::ShardKey + Clone + std::fmt::Debug,
    V: Clone,
{
    if mine.len() != theirs.len() {
        return Err(format!("{} {what}s, {} expected", mine.len(), theirs.len()));
    }
    for (k, v) in theirs.iter() {
        if !mine.get(k).is_some_and(|x| eq(x, v)) {
            return Err(format!("{what} {k:?}: not the same"));
        }
    }
    Ok(())
}

impl Table {
    /// Builds the table whole from the installed SAs, each with the peer address it is
    /// counted under, and the open devices: the reference [`Table::next`] is checked
    /// against in debug builds and tests.
    #[cfg(any(test, debug_assertions))]
    pub fn build(
        generation: u64,
        sas: impl Iterator<Item = (Arc<Sa>, IpAddr)>,
        devices: &HashMap<String, Arc<TunDev>>,
    ) -> Table {
        let mut by_spi = Sharded::default();
        let mut peers = Sharded::default();
        let mut of_phase1: HashMap<String, Vec<Arc<Sa>>> = HashMap::new();
        for (sa, ip) in sas {
            by_spi.insert(sa.spi_in, sa.clone());
            count_peer(&mut peers, ip);
            of_phase1.entry(sa.phase1.clone()).or_default().push(sa);
        }
        let devices = devices
            .iter()
            .map(|(name, tun)| {
                let sas = of_phase1.remove(name.as_str()).unwrap_or_default();
                Arc::new(device_of(name, tun, sas.iter()))
            })
            .collect();
        Table {
            generation,
            by_spi,
            devices,
            peers,
        }
    }

    /// The next version: this one with `changes` applied. `by_phase1` holds the installed
    /// SAs per phase1 (after the changes) and `devices` the open devices: a device whose
    /// phase1 is in `changes.phase1s`, or that is new, gets its routes built again; the
    /// others are shared with this version, as are the SPI and peer shards no change touched.
    pub fn next(
        &self,
        generation: u64,
        changes: &Changes,
        by_phase1: &HashMap<String, BTreeMap<String, Arc<Sa>>>,
        devices: &HashMap<String, Arc<TunDev>>,
    ) -> Table {
        // An SA installed and removed again within one publication (a held batch) never
        // enters this version.
        let ptr = |sa: &Arc<Sa>| Arc::as_ptr(sa) as usize;
        let came: HashSet<usize> = changes.installed.iter().map(|(sa, _)| ptr(sa)).collect();
        let both: HashSet<usize> = changes
            .removed
            .iter()
            .map(|(sa, _)| ptr(sa))
            .filter(|p| came.contains(p))
            .collect();
        let removed = || {
            changes
                .removed
                .iter()
                .filter(|(sa, _)| !both.contains(&ptr(sa)))
        };
        let installed = || {
            changes
                .installed
                .iter()
                .filter(|(sa, _)| !both.contains(&ptr(sa)))
        };
        let mut by_spi = self.by_spi.clone();
        let mut peers = self.peers.clone();
        for (sa, ip) in removed() {
            // Only that SA: an SA installed again under its key already replaced it.
            if by_spi.get(&sa.spi_in).is_some_and(|x| Arc::ptr_eq(x, sa)) {
                by_spi.remove(&sa.spi_in);
            }
            uncount_peer(&mut peers, *ip);
        }
        for (sa, ip) in installed() {
            by_spi.insert(sa.spi_in, sa.clone());
            count_peer(&mut peers, *ip);
        }
        for (from, to) in &changes.moved {
            uncount_peer(&mut peers, *from);
            count_peer(&mut peers, *to);
        }
        let old: HashMap<&str, &Arc<Device>> = self
            .devices
            .iter()
            .map(|d| (d.phase1.as_str(), d))
            .collect();
        let devices = devices
            .iter()
            .map(|(name, tun)| {
                let prev = old.get(name.as_str()).filter(|d| Arc::ptr_eq(&d.tun, tun));
                if let Some(d) = prev.filter(|_| !changes.phase1s.contains(name)) {
                    return Arc::clone(d);
                }
                // A large device: its next routes from its previous ones.
                let of_device = |(sa, _): &&(Arc<Sa>, IpAddr)| sa.phase1 == *name;
                let changed = prev.and_then(|d| {
                    let gone: Vec<Route> = removed()
                        .filter(of_device)
                        .flat_map(|(sa, _)| routes_of(sa))
                        .collect();
                    let new: Vec<Route> = installed()
                        .filter(of_device)
                        .flat_map(|(sa, _)| routes_of(sa))
                        .collect();
                    d.routes.changed(&gone, &new)
                });
                Arc::new(match changed {
                    Some(routes) => Device {
                        phase1: name.clone(),
                        tun: tun.clone(),
                        routes,
                    },
                    None => device_of(
                        name,
                        tun,
                        by_phase1.get(name).into_iter().flat_map(|m| m.values()),
                    ),
                })
            })
            .collect();
        Table {
            generation,
            by_spi,
            devices,
            peers,
        }
    }

    /// Whether `other` holds the same SAs under the same SPIs, the same peers with the same
    /// counts, and the same devices with the same routes in the same order (each SA the
    /// same `Arc`); otherwise what differs first.
    #[cfg(debug_assertions)]
    pub fn same_as(&self, other: &Table) -> Result<(), String> {
        same_entries("SPI", &self.by_spi, &other.by_spi, Arc::ptr_eq)?;
        same_entries("peer", &self.peers, &other.peers, |a, b| a == b)?;
        type Runs = Vec<(Cidr, Vec<usize>)>;
        let devs = |t: &Table| -> BTreeMap<String, Runs> {
            t.devices
                .iter()
                .map(|d| {
                    let runs = d
                        .routes
                        .runs()
                        .into_iter()
                        .map(|(dst, run)| {
                            (
                                dst,
                                run.iter().map(|r| Arc::as_ptr(&r.sa) as usize).collect(),
                            )
                        })
                        .collect();
                    (d.phase1.clone(), runs)
                })
                .collect()
        };
        let (mine, theirs) = (devs(self), devs(other));
        if mine != theirs {
            return Err(format!("devices differ: {mine:?} vs {theirs:?}"));
        }
        Ok(())
    }

    /// The device whose TUN file descriptor is `fd`.
    #[inline]
    pub fn device_by_fd(&self, fd: i32) -> Option<&Device> {
        self.devices.iter().find(|d| d.tun.fd() == fd).map(|d| &**d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parse_contains_range() {
        let c = Cidr::parse("10.99.2.7/24").unwrap();
        assert_eq!(c.to_string(), "10.99.2.0/24");
        assert!(c.contains(ip("10.99.2.255")));
        assert!(!c.contains(ip("10.99.3.0")));
        assert!(!c.contains(ip("::1")));
        assert_eq!(c.range(), (ip("10.99.2.0"), ip("10.99.2.255")));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("1.2.3.4")));
        assert_eq!(all.range().1, ip("255.255.255.255"));
        let host = Cidr::parse("192.0.2.1").unwrap();
        assert_eq!(host.len(), 32);
        assert!(host.contains(ip("192.0.2.1")) && !host.contains(ip("192.0.2.2")));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:1::1")) && !v6.contains(ip("2001:db9::")));
        assert_eq!(
            Cidr::parse("::/0").unwrap().range().1,
            ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
        );
        for bad in ["10.0.0.0/33", "x/8", "", "10.0.0.0/", "::/129"] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn acquire_slot_keeps_one_pair_and_counts_every_packet() {
        let slot = AcquireSlot::default();
        assert_eq!(slot.take(), ([None, None], 0));
        slot.note(ip("10.0.2.1"), ip("10.0.1.7"));
        slot.note(ip("10.0.2.1"), ip("10.0.1.8"));
        slot.note(ip("fd00:1::1"), ip("fd00:2::7"));
        slot.note(ip("fd00:1::1"), ip("fd00:2::8"));
        assert_eq!(
            slot.take(),
            (
                [
                    Some((ip("10.0.2.1"), ip("10.0.1.7"))),
                    Some((ip("fd00:1::1"), ip("fd00:2::7")))
                ],
                4
            )
        );
        assert_eq!(slot.take(), ([None, None], 0));
        slot.note(ip("fd00:1::1"), ip("fd00:2::8"));
        assert_eq!(
            slot.take(),
            ([None, Some((ip("fd00:1::1"), ip("fd00:2::8")))], 1)
        );
        slot.note(ip("10.0.2.1"), ip("10.0.1.8"));
        assert_eq!(slot.take().0[0].map(|p| p.1), Some(ip("10.0.1.8")));
    }

    #[test]
    fn peer_cell_holds_both_families_and_moves_udp_only() {
        let v4: SocketAddr = "192.0.2.1:4500".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::2]:61000".parse().unwrap();
        let c = PeerCell::new(Peer::Udp(v4));
        assert_eq!(c.get(), Peer::Udp(v4));
        assert!(c.move_udp(v6));
        assert_eq!(c.get(), Peer::Udp(v6));
        assert_eq!(c.get().ip(), ip("2001:db8::2"));
        let raw = PeerCell::new(Peer::Raw(ip("2001:db8::ffff:1")));
        assert_eq!(raw.get(), Peer::Raw(ip("2001:db8::ffff:1")));
        assert!(!raw.move_udp(v4));
        assert_eq!(raw.get(), Peer::Raw(ip("2001:db8::ffff:1")));
        let raw4 = PeerCell::new(Peer::Raw(ip("198.51.100.7")));
        assert_eq!(raw4.get(), Peer::Raw(ip("198.51.100.7")));
    }

    #[test]
    fn drop_labels_are_distinct() {
        let mut l = DROP_LABELS.to_vec();
        assert!(l.iter().all(|s| !s.is_empty()));
        l.sort();
        l.dedup();
        assert_eq!(l.len(), NUM_DROPS);
        assert_eq!(DROP_LABELS[esp_proto::DropReason::Auth.index()], "icv");
    }
}
