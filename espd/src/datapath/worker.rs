//! One datapath worker thread: an epoll set over the raw ESP sockets, the UDP/4500 sockets
//! (IPv4 and IPv6) and every TUN device, level-triggered, one batch per ready descriptor per wakeup.
//!
//! Per packet there is no allocation, no log line, no lock other than the worker's own
//! crypto context (uncontended) and, inbound, the SA's replay window around `check` and
//! `accept`; counters are relaxed atomics. The table is re-read once per wakeup.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use esp_proto::{classify_udp4500, decode_payload, inner, EspError, EspHeader, Udp4500};

use super::offload::{self, VNET_HDR_LEN};
use super::sockets::{RecvBatch, SendBatch, Sockets, BATCH, SLOT};
use super::table::{
    any_contains, Device, Peer, Table, DROP_ENCAP, DROP_IKE_RELAY, DROP_LINK_SCOPE, DROP_NO_SA,
    DROP_OFFLOAD, DROP_OUTER, DROP_SELECTOR, DROP_TUN_WRITE, DROP_TX_ERROR,
};
use super::Shared;

const TOKEN_RAW: u64 = u64::MAX - 1;
const TOKEN_UDP: u64 = u64::MAX - 2;
const TOKEN_RAW6: u64 = u64::MAX - 3;
const TOKEN_UDP6: u64 = u64::MAX - 4;
/// Wakeup period when idle, so table changes and shutdown are noticed.
const IDLE_MS: libc::c_int = 100;
const MAX_EVENTS: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only follows a panic on another worker; the value is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wall clock in ns, read once per wakeup for the activity timestamps.
fn wall_ns() -> u64 {
    haven_daemon::now_ns()
}

pub struct Worker {
    id: usize,
    shared: Arc<Shared>,
    ep: OwnedFd,
    gen: u64,
    tun_fds: Vec<RawFd>,
    rx: RecvBatch,
    /// Receive buffers for the UDP GRO socket (64 KiB per datagram).
    rx_udp: RecvBatch,
    tx_raw: SendBatch,
    tx_udp: SendBatch,
    tx_raw6: SendBatch,
    tx_udp6: SendBatch,
    /// Decrypted payloads (inbound) and packets read from TUN (outbound).
    plain: Box<[u8; SLOT]>,
    /// Packets read from TUN: virtio-net header plus up to 64 KiB (TSO).
    tunbuf: Box<[u8]>,
    /// Decrypted packets on their way to TUN, coalesced per receive batch.
    gro: offload::Coalescer,
    /// Packets for SPIs not installed yet.
    hold: Hold,
}

/// Largest read from a TUN device: header plus the largest IP packet.
const TUNBUF: usize = VNET_HDR_LEN + 65_536;

/// Packets held per worker while their SPI is not installed yet.
const HOLD_SLOTS: usize = 32;
/// How long a held packet waits for its SA.
const HOLD_NS: u64 = 500_000_000;

/// Where an inbound ESP packet came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Raw IP protocol 50 from this address.
    Raw(IpAddr),
    /// UDP-encapsulated (RFC 3948) from this address and port.
    Udp(SocketAddr),
}

impl Source {
    fn ip(self) -> IpAddr {
        match self {
            Source::Raw(a) => a,
            Source::Udp(a) => a.ip(),
        }
    }
}

/// ESP packets whose SPI is unknown but whose source is the peer of an installed SA, held
/// until the next table change (or [`HOLD_NS`]): ikemgr answers a peer's CREATE_CHILD_SA
/// before espd has installed the new SA, and the peer may send on it at once. Fixed buffers,
/// allocated when the worker starts; when full, the packet is dropped as `unknown_spi`.
struct Hold {
    bufs: Box<[u8]>,
    /// Per slot: (length, source, arrival ns); `None` = free.
    meta: [Option<(usize, Source, u64)>; HOLD_SLOTS],
}

impl Hold {
    fn new() -> Hold {
        Hold {
            bufs: vec![0u8; SLOT * HOLD_SLOTS].into_boxed_slice(),
            meta: [None; HOLD_SLOTS],
        }
    }

    fn is_empty(&self) -> bool {
        self.meta.iter().all(Option::is_none)
    }

    /// Keeps a copy of `esp`; false when full or too large.
    fn push(&mut self, esp: &[u8], src: Source, now: u64) -> bool {
        let Some(i) = self.meta.iter().position(Option::is_none) else {
            return false;
        };
        let Some(slot) = self.bufs.get_mut(i * SLOT..i * SLOT + esp.len()) else {
            return false;
        };
        if esp.len() > SLOT {
            return false;
        }
        slot.copy_from_slice(esp);
        if let Some(m) = self.meta.get_mut(i) {
            *m = Some((esp.len(), src, now));
        }
        true
    }
}

fn epoll_ctl(ep: RawFd, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
    // EPOLLEXCLUSIVE: one ready descriptor wakes one of the workers waiting on it, not all.
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
        u64: token,
    };
    // SAFETY: ev is a live epoll_event for the duration of the call.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Worker {
    pub fn new(id: usize, shared: Arc<Shared>) -> io::Result<Worker> {
        // SAFETY: epoll_create1 with a constant flag.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: ep was just returned by epoll_create1 and has no other owner.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let lane = shared
            .sockets
            .lanes
            .get(id)
            .ok_or_else(|| io::Error::other(format!("no sockets for worker {id}")))?;
        for (sock, token) in [
            (Some(&lane.raw), TOKEN_RAW),
            (Some(&lane.udp), TOKEN_UDP),
            (lane.raw6.as_ref(), TOKEN_RAW6),
            (lane.udp6.as_ref(), TOKEN_UDP6),
        ] {
            if let Some(fd) = sock {
                epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), token)?;
            }
        }
        Ok(Worker {
            id,
            shared,
            ep,
            gen: u64::MAX,
            tun_fds: Vec::new(),
            rx: RecvBatch::new(SLOT),
            rx_udp: RecvBatch::new(65_536),
            tx_raw: SendBatch::new(),
            tx_udp: SendBatch::new(),
            tx_raw6: SendBatch::new(),
            tx_udp6: SendBatch::new(),
            plain: Box::new([0; SLOT]),
            tunbuf: vec![0u8; TUNBUF].into_boxed_slice(),
            gro: offload::Coalescer::default(),
            hold: Hold::new(),
        })
    }

    /// Runs until the datapath stops.
    pub fn run(mut self) {
        // SAFETY: epoll_event is plain old data.
        let mut events: [libc::epoll_event; MAX_EVENTS] = unsafe { std::mem::zeroed() };
        while !self.shared.stop.load(Ordering::Relaxed) {
            let table = self.shared.current();
            if table.generation != self.gen {
                self.sync(&table);
                self.retry_held(&table, wall_ns());
            } else if !self.hold.is_empty() {
                self.expire_held(wall_ns());
            }
            // SAFETY: events has MAX_EVENTS entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.ep.as_raw_fd(),
                    events.as_mut_ptr(),
                    MAX_EVENTS as libc::c_int,
                    IDLE_MS,
                )
            };
            if n <= 0 {
                continue;
            }
            let table = self.shared.current();
            let now = wall_ns();
            for ev in events.iter().take(n as usize) {
                match ev.u64 {
                    TOKEN_RAW => self.rx_raw(&table, now, false),
                    TOKEN_UDP => self.rx_udp(&table, now, false),
                    TOKEN_RAW6 => self.rx_raw(&table, now, true),
                    TOKEN_UDP6 => self.rx_udp(&table, now, true),
                    fd => {
                        if let Some(dev) = table.device_by_fd(fd as RawFd) {
                            self.tx_tun(dev, now);
                        }
                    }
                }
            }
        }
    }

    /// Registers the current table's TUN devices of this worker (and forgets the removed
    /// ones). Each device is read by one worker only ([`lane_of_device`]): packets are
    /// encrypted in the order they were read, so an SA's sequence numbers leave in order.
    fn sync(&mut self, table: &Table) {
        let ep = self.ep.as_raw_fd();
        let lanes = self.shared.sockets.lanes.len();
        let now: Vec<RawFd> = table
            .devices
            .iter()
            .filter(|d| lane_of_device(d.tun.name(), lanes) == self.id)
            .map(|d| d.tun.fd())
            .collect();
        for fd in &self.tun_fds {
            if !now.contains(fd) {
                // Closed devices have left the set already (ENOENT/EBADF): fine.
                let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, *fd, 0);
            }
        }
        for fd in &now {
            match epoll_ctl(ep, libc::EPOLL_CTL_ADD, *fd, *fd as u64) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => tracing::error!("worker {}: cannot watch TUN fd {fd}: {e}", self.id),
            }
        }
        self.tun_fds = now;
        self.gen = table.generation;
    }

    /// Passes held packets whose SA is now installed; drops the stale ones.
    fn retry_held(&mut self, table: &Table, now: u64) {
        let Worker {
            id,
            shared,
            plain,
            gro,
            hold,
            ..
        } = self;
        for i in 0..HOLD_SLOTS {
            let Some(Some((len, src, at))) = hold.meta.get(i).copied() else {
                continue;
            };
            let Some(esp) = hold.bufs.get(i * SLOT..i * SLOT + len) else {
                continue;
            };
            let known = EspHeader::peek(esp).is_some_and(|h| table.by_spi.contains_key(&h.spi));
            if known {
                decap(*id, shared, &mut plain[..], gro, table, esp, src, now);
            } else if now.saturating_sub(at) < HOLD_NS {
                continue;
            } else {
                shared.count_drop(esp_proto::DropReason::UnknownSpi.index());
            }
            if let Some(m) = hold.meta.get_mut(i) {
                *m = None;
            }
        }
        shared.count_drops(DROP_TUN_WRITE, gro.flush());
    }

    fn expire_held(&mut self, now: u64) {
        for m in self.hold.meta.iter_mut() {
            if m.is_some_and(|(_, _, at)| now.saturating_sub(at) >= HOLD_NS) {
                *m = None;
                self.shared
                    .count_drop(esp_proto::DropReason::UnknownSpi.index());
            }
        }
    }

    // ---- inbound ------------------------------------------------------------------------

    /// Raw ESP over IPv4 (`v6 = false`): the socket hands us the IPv4 header (RFC 791
    /// §3.1), whose source address and IHL (32-bit words) locate the ESP packet. Over IPv6:
    /// the socket hands over the ESP packet only (the IPv6 header and any extension headers
    /// are gone); the source is the datagram's address.
    fn rx_raw(&mut self, table: &Table, now: u64, v6: bool) {
        let Worker {
            id,
            shared,
            rx,
            plain,
            gro,
            hold,
            ..
        } = self;
        let Some(lane) = shared.sockets.lanes.get(*id) else {
            return;
        };
        let fd = if v6 {
            match lane.raw6.as_ref() {
                Some(f) => f.as_raw_fd(),
                None => return,
            }
        } else {
            lane.raw.as_raw_fd()
        };
        let n = rx.recv(fd).unwrap_or(0);
        for i in 0..n {
            let Some((pkt, from, trunc, _)) = rx.get(i) else {
                continue;
            };
            if trunc {
                shared.count_drop(esp_proto::DropReason::Truncated.index());
                continue;
            }
            let (esp, src) = if v6 {
                (pkt, Source::Raw(from.ip()))
            } else {
                let first = pkt.first().copied().unwrap_or(0);
                let ihl = usize::from(first & 0x0f) * 4;
                let (4, true, Some(src), Some(esp)) =
                    (first >> 4, ihl >= 20, pkt.get(12..16), pkt.get(ihl..))
                else {
                    shared.count_drop(DROP_OUTER);
                    continue;
                };
                let src = Ipv4Addr::new(src[0], src[1], src[2], src[3]);
                (esp, Source::Raw(IpAddr::V4(src)))
            };
            if decap(*id, shared, &mut plain[..], gro, table, esp, src, now) {
                hold_or_drop(shared, hold, table, esp, src, now);
            }
        }
        shared.count_drops(DROP_TUN_WRITE, gro.flush());
    }

    fn rx_udp(&mut self, table: &Table, now: u64, v6: bool) {
        let Worker {
            id,
            shared,
            rx_udp: rx,
            plain,
            gro,
            hold,
            ..
        } = self;
        let Some(lane) = shared.sockets.lanes.get(*id) else {
            return;
        };
        let fd = if v6 {
            match lane.udp6.as_ref() {
                Some(f) => f.as_raw_fd(),
                None => return,
            }
        } else {
            lane.udp.as_raw_fd()
        };
        let n = rx.recv(fd).unwrap_or(0);
        for i in 0..n {
            let Some((data, from, trunc, seg)) = rx.get(i) else {
                continue;
            };
            if trunc {
                shared.count_drop(esp_proto::DropReason::Truncated.index());
                continue;
            }
            // With UDP GRO one buffer holds several datagrams of `seg` bytes.
            for payload in data.chunks(seg.unwrap_or(data.len()).max(1)) {
                match classify_udp4500(payload) {
                    Ok(Udp4500::Keepalive) => {
                        shared.keepalives.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Udp4500::Ike(ike)) => {
                        let msg = Sockets::ike_handoff(from, rx.local_addr(i), ike);
                        if !shared.ike_queue.push(msg) {
                            shared.count_drop(DROP_IKE_RELAY);
                        }
                    }
                    Ok(Udp4500::Esp(esp)) => {
                        let src = Source::Udp(from);
                        if decap(*id, shared, &mut plain[..], gro, table, esp, src, now) {
                            hold_or_drop(shared, hold, table, esp, src, now);
                        }
                    }
                    Err(e) => shared.count_drop(e.drop_reason().index()),
                }
            }
        }
        shared.count_drops(DROP_TUN_WRITE, gro.flush());
    }

    // ---- outbound -----------------------------------------------------------------------

    /// Reads up to a batch of packets from one TUN device (TSO packets are cut into
    /// segments first), encrypts each with the SA its destination routes to, and sends them
    /// with one `sendmmsg` per socket and full batch.
    fn tx_tun(&mut self, dev: &Device, now: u64) {
        let Worker {
            id,
            shared,
            plain,
            tx_raw,
            tx_udp,
            tx_raw6,
            tx_udp6,
            tunbuf,
            ..
        } = self;
        let mut batches = TxBatches {
            lane: *id,
            raw: tx_raw,
            udp: tx_udp,
            raw6: tx_raw6,
            udp6: tx_udp6,
        };
        for _ in 0..BATCH {
            let n = match dev.tun.read(&mut tunbuf[..]) {
                Ok(Some(n)) => n,
                Ok(None) | Err(_) => break,
            };
            let Some(buf) = tunbuf.get_mut(..n) else {
                break;
            };
            let r = offload::split(buf, &mut plain[..], |pkt| {
                encap_one(*id, shared, dev, &mut batches, pkt, now)
            });
            if r.is_err() {
                shared.count_drop(DROP_OFFLOAD);
            }
        }
        for kind in [TxKind::Raw, TxKind::Udp, TxKind::Raw6, TxKind::Udp6] {
            let (batch, fd) = batches.get(shared, kind);
            if !batch.is_empty() {
                let failed = flush(batch, fd, kind);
                shared.count_drops(DROP_TX_ERROR, failed);
            }
        }
    }
}

/// The worker (out of `lanes`) that reads the TUN device `name`: a hash of the name
/// (FNV-1a), stable for the device's life and across restarts.
pub fn lane_of_device(name: &str, lanes: usize) -> usize {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (h % lanes.max(1) as u64) as usize
}

/// The outgoing batches of one worker, one per socket of its lane.
struct TxBatches<'a> {
    lane: usize,
    raw: &'a mut SendBatch,
    udp: &'a mut SendBatch,
    raw6: &'a mut SendBatch,
    udp6: &'a mut SendBatch,
}

#[derive(Clone, Copy)]
enum TxKind {
    Raw,
    Udp,
    Raw6,
    Udp6,
}

impl TxBatches<'_> {
    /// The batch of `kind` and its socket (-1 when the host has no IPv6: sends fail and
    /// are counted).
    fn get(&mut self, shared: &Shared, kind: TxKind) -> (&mut SendBatch, RawFd) {
        let lane = shared.sockets.lanes.get(self.lane);
        let fd = |f: fn(&super::sockets::Lane) -> Option<&OwnedFd>| {
            lane.and_then(f).map_or(-1, |f| f.as_raw_fd())
        };
        match kind {
            TxKind::Raw => (&mut *self.raw, fd(|l| Some(&l.raw))),
            TxKind::Udp => (&mut *self.udp, fd(|l| Some(&l.udp))),
            TxKind::Raw6 => (&mut *self.raw6, fd(|l| l.raw6.as_ref())),
            TxKind::Udp6 => (&mut *self.udp6, fd(|l| l.udp6.as_ref())),
        }
    }
}

/// Sends a batch: UDP with GSO runs, raw one message per packet.
fn flush(batch: &mut SendBatch, fd: RawFd, kind: TxKind) -> usize {
    match kind {
        TxKind::Udp | TxKind::Udp6 => batch.flush_udp_gso(fd),
        TxKind::Raw | TxKind::Raw6 => batch.flush(fd),
    }
}

/// Encrypts one wire-sized inner packet with the SA its destination routes to and queues
/// it (flushing the batch first when it is full).
fn encap_one(
    id: usize,
    shared: &Shared,
    dev: &Device,
    batches: &mut TxBatches<'_>,
    pkt: &[u8],
    now: u64,
) {
    let Some((src, dst)) = inner::addresses(pkt) else {
        shared.count_drop(esp_proto::DropReason::NotIp.index());
        return;
    };
    let Some(sa) = dev.lookup(src, dst) else {
        if inner::link_scope(src, dst) {
            // Never forwarded, never a reason to negotiate: not a missing SA.
            shared.count_drop(DROP_LINK_SCOPE);
        } else {
            shared.count_drop(DROP_NO_SA);
            dev.tun.acquire.note(src, dst);
        }
        return;
    };
    let fail = |reason: usize| {
        sa.count_drop(reason);
        shared.count_drop(reason);
    };
    if !sa.volume_ok(&sa.tx) || now >= sa.hard_deadline_ns {
        fail(esp_proto::DropReason::Expired.index());
        return;
    }
    let peer = sa.peer.get();
    let (kind, to) = match peer {
        Peer::Raw(ip @ IpAddr::V4(_)) => (TxKind::Raw, SocketAddr::new(ip, 0)),
        Peer::Raw(ip @ IpAddr::V6(_)) => (TxKind::Raw6, SocketAddr::new(ip, 0)),
        Peer::Udp(a @ SocketAddr::V4(_)) => (TxKind::Udp, a),
        Peer::Udp(a @ SocketAddr::V6(_)) => (TxKind::Udp6, a),
    };
    let (batch, fd) = batches.get(shared, kind);
    if batch.is_full() {
        let failed = flush(batch, fd, kind);
        shared.count_drops(DROP_TX_ERROR, failed);
    }
    let seq = match sa.seq.take() {
        Ok(s) => s,
        Err(e) => {
            fail(e.drop_reason().index());
            return;
        }
    };
    let (Some(out), Some(crypto)) = (batch.slot(), sa.enc.get(id)) else {
        return;
    };
    match lock(crypto).seal(seq, pkt, out) {
        Ok(len) => batch.commit(len, sa.local_ip, to),
        Err(e) => {
            fail(e.drop_reason().index());
            return;
        }
    }
    sa.tx.add(pkt.len(), now);
    shared.tx.add(pkt.len(), now);
}

/// Holds a packet with an unknown SPI when it comes from the peer of an installed SA (its
/// SA may be on its way from ikemgr), else counts it as `unknown_spi`.
fn hold_or_drop(
    shared: &Shared,
    hold: &mut Hold,
    table: &Table,
    esp: &[u8],
    src: Source,
    now: u64,
) {
    if let Some(h) = EspHeader::peek(esp) {
        shared.unknown_spis.record(h.spi);
    }
    if !(table.peers.contains_key(&src.ip()) && hold.push(esp, src, now)) {
        shared.count_drop(esp_proto::DropReason::UnknownSpi.index());
    }
}

/// RFC 4303 §3.4 for one received ESP packet: SPI lookup, shape, replay check, ICV and
/// decryption, window update (only now that it authenticated), padding and inner header,
/// then the selector check (RFC 4301 §5.2) and the write to TUN. Returns true, counting
/// nothing, when the SPI is unknown (the caller holds or drops the packet).
#[allow(clippy::too_many_arguments)]
fn decap(
    id: usize,
    shared: &Shared,
    plain: &mut [u8],
    gro: &mut offload::Coalescer,
    table: &Table,
    esp: &[u8],
    src: Source,
    now: u64,
) -> bool {
    let Some(hdr) = EspHeader::peek(esp) else {
        shared.count_drop(esp_proto::DropReason::Truncated.index());
        return false;
    };
    let Some(sa) = table.by_spi.get(&hdr.spi) else {
        return true;
    };
    let fail = |reason: usize| {
        sa.count_drop(reason);
        shared.count_drop(reason);
    };
    // An SA negotiated with UDP encapsulation takes no raw ESP, and the other way round
    // (RFC 3948 §2.1: the encapsulation is a property of the SA).
    let peer = sa.peer.get();
    match (peer, src) {
        (Peer::Udp(_), Source::Udp(_)) | (Peer::Raw(_), Source::Raw(_)) => {}
        _ => {
            fail(DROP_ENCAP);
            return false;
        }
    }
    if sa.dead.load(Ordering::Relaxed) || !sa.volume_ok(&sa.rx) || now >= sa.hard_deadline_ns {
        fail(esp_proto::DropReason::Expired.index());
        return false;
    }
    let Some(crypto) = sa.dec.get(id) else {
        return false;
    };
    let mut crypto = lock(crypto);
    if let Err(e) = crypto.check_shape(esp) {
        fail(e.drop_reason().index());
        return false;
    }
    let seq = match lock(&sa.replay).check(hdr.seq) {
        Ok(s) => s,
        Err(e) => {
            fail(e.drop_reason().index());
            return false;
        }
    };
    let body = plain;
    let plen = match crypto.open(esp, seq, body) {
        Ok(n) => n,
        Err(e) => {
            fail(e.drop_reason().index());
            return false;
        }
    };
    drop(crypto);
    let newest = {
        let mut replay = lock(&sa.replay);
        let newest = seq > replay.top();
        if !replay.accept(seq) {
            drop(replay);
            fail(EspError::Replay.drop_reason().index());
            return false;
        }
        newest
    };
    // The packet authenticated: a UDP peer seen at a new address or port moved behind its
    // NAT (RFC 3948 §2.2; as RFC 7296 §2.23 for IKE, only the newest packet counts, so a
    // reordered old one cannot move it back). Every SA of the tunnel at the old address
    // follows, so replies leave through the new mapping.
    if let (true, Source::Udp(from), Peer::Udp(cur)) = (newest, src, peer) {
        if from != cur {
            for other in table.by_spi.values() {
                if other.tunnel == sa.tunnel && other.peer.get() == peer {
                    other.peer.move_udp(from);
                }
            }
            sa.peer_moves.fetch_add(1, Ordering::Relaxed);
        }
    }
    let (len, _next_header) = match decode_payload(body.get(..plen).unwrap_or(&[])) {
        Ok(x) => x,
        Err(e) => {
            fail(e.drop_reason().index());
            return false;
        }
    };
    if len == 0 {
        // A dummy packet (Next Header 59, RFC 4303 §2.6): authenticated, not forwarded.
        return false;
    }
    let pkt = body.get(..len).unwrap_or(&[]);
    let ok = match inner::addresses(pkt) {
        Some((src, dst)) => any_contains(&sa.remote_ts, src) && any_contains(&sa.local_ts, dst),
        None => false,
    };
    if !ok {
        fail(DROP_SELECTOR);
        return false;
    }
    // To TUN through the coalescer (written at the latest when the receive batch ends).
    shared.count_drops(DROP_TUN_WRITE, gro.push(&sa.tun, pkt));
    sa.rx.add(len, now);
    shared.rx.add(len, now);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_keeps_copies_up_to_its_slots() {
        let mut h = Hold::new();
        assert!(h.is_empty());
        let src = Source::Udp("192.0.2.1:4500".parse().unwrap());
        for i in 0..HOLD_SLOTS {
            assert!(h.push(&[i as u8; 100], src, i as u64), "slot {i}");
        }
        assert!(!h.push(&[0xee; 100], src, 99), "a full hold refuses");
        assert_eq!(h.meta[3], Some((100, src, 3)));
        assert_eq!(&h.bufs[3 * SLOT..3 * SLOT + 100], &[3u8; 100][..]);
        h.meta[5] = None;
        assert!(
            !h.push(&vec![0u8; SLOT + 1], src, 7),
            "too large for a slot"
        );
        assert!(h.push(&[7u8; 60], Source::Raw("2001:db8::9".parse().unwrap()), 7));
        assert_eq!(h.meta[5].map(|m| m.0), Some(60));
    }
}
