//! The HA link's IO layer: one UDP socket per link and a reader thread per socket.
//!
//! The reader thread moves datagrams from the socket into a bounded queue; the daemon's
//! tick drains the queue and hands each datagram to ha-core's `HaLink::open`. Sending
//! happens from the tick itself (non-blocking `send_to` on the same socket).
//!
//! # Queue policy (the reader looks at the clear header only)
//! 1. **Reflected.** A datagram of this link's group whose header names this member as
//!    sender (FGCP broadcasts come back to the sender's own socket: one per datagram it
//!    sends) is counted and never queued ([`LinkSocket::take_reflected`]; the daemon adds
//!    it to `hasyncd_link_drops_total{reason="reflected"}`, which ha-core would have
//!    counted the same way). They used to take half the queue during a snapshot burst.
//! 2. **Bytes, not datagrams.** The queue holds at most [`QUEUE_BYTES`] (64 MiB, each
//!    datagram charged its length plus [`ITEM_OVERHEAD`]), so a snapshot burst of
//!    thousands of datagrams fits while memory stays bounded. Beyond it the reader drops
//!    (counted as `queue_full`).
//! 3. **Heartbeats always get in.** A datagram whose header says heartbeat and that is no
//!    longer than a heartbeat can be ([`HEARTBEAT_MAX_LEN`]) may go over the bound by up to
//!    [`HEARTBEAT_RESERVE_BYTES`], so a queue full of sync datagrams still admits the
//!    heartbeats behind them, and a member is not declared lost because its partner was
//!    busy receiving (the soak's failover loop: lost heartbeats, false "member lost",
//!    failover, new snapshots, more bursts).
//!
//! The queue stays in arrival order: heartbeats are not moved ahead. They share the
//! sender's link counter with its sync datagrams, and ha-core's replay window
//! ([`ha_core::link::WINDOW`], 1 024 messages) would drop as replays every older sync
//! datagram more than a window behind a heartbeat opened first. Order costs nothing for
//! loss detection: the tick drains the whole queue and opens every datagram before it
//! checks for lost members, so a queued heartbeat counts at the tick that drains it.
//! Liveness comes only from what `HaLink::open` authenticated: the clear header only
//! decides admission, so a forged heartbeat header can take reserve space (bounded) but
//! can never keep a dead member alive.
//!
//! # Addressing (a Haven choice; FortiOS does not document its heartbeat transport)
//! - FGCP heartbeats and sync: UDP port [`FGCP_PORT`] (703) on the `hbdev` interface. The
//!   socket is bound to `0.0.0.0:703` and to the device (`SO_BINDTODEVICE`), and sends to
//!   the limited broadcast `255.255.255.255:703`, which Linux routes out of the bound
//!   device. The interface must be up and carry an IPv4 address (any: a link-local
//!   `169.254.0.N/24`, as FortiOS's `primary_ip=169.254.0.1`, is the suggested plan);
//!   without one, heartbeats were not exchanged in the netns tests.
//! - FGSP: UDP port 708 (`cluster-peer` `port`, the seeds' `peerip:port = …:708`), bound
//!   to `0.0.0.0:708`, unicast to every `peerip`.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use ha_core::wire::{Header, MemberId, MsgType};

/// UDP port of the FGCP heartbeat and sync link on the `hbdev` interface.
pub const FGCP_PORT: u16 = 703;

/// Bytes waiting for the tick (datagram lengths plus [`ITEM_OVERHEAD`] each); beyond this
/// the reader drops everything but heartbeats (counted as `queue_full`).
pub const QUEUE_BYTES: usize = 64 << 20;
/// How far heartbeats may take the queue over [`QUEUE_BYTES`]: room for thousands of them
/// (a heartbeat datagram is about 150 bytes), and a bound on what forged heartbeat headers
/// can occupy.
pub const HEARTBEAT_RESERVE_BYTES: usize = 1 << 20;
/// Longest datagram admitted as a heartbeat. A real one (ha-core `Heartbeat`: ids, a
/// serial, a few integers) is far below; a longer "heartbeat" is queued as any datagram.
pub const HEARTBEAT_MAX_LEN: usize = 1024;
/// Charged per queued datagram on top of its length: the `Vec` and the address beside it,
/// and the allocator's rounding, so that many tiny datagrams are bounded too.
pub const ITEM_OVERHEAD: usize = 64;
/// Largest datagram read; ha-core caps messages at 64 KiB and counts the rest `oversized`,
/// so one byte more than the cap is enough to see that a datagram was too long.
const RECV_BUF: usize = ha_core::wire::MAX_MESSAGE_LEN + 1;
/// Kernel receive buffer of a link socket. A snapshot transfer keeps up to 16 chunks of
/// 32 KB in flight (each a train of IP fragments, about twice its size in kernel memory);
/// the default buffer (212 992 bytes) held fewer than four of them, so a window's tail and
/// the heartbeats behind it were dropped whenever the reader thread was descheduled.
const RECV_QUEUE_BYTES: usize = 4 << 20;
/// `SO_MEMINFO` (Linux 4.12; include/uapi/asm-generic/socket.h, not in the libc crate):
/// the socket's memory counters, `SK_MEMINFO_DROPS` among them.
const SO_MEMINFO: libc::c_int = 55;
/// Entries of the `SO_MEMINFO` array (include/uapi/linux/sock_diag.h `SK_MEMINFO_VARS`).
const SK_MEMINFO_VARS: usize = 9;
/// How often the reader checks whether it should stop.
const POLL: Duration = Duration::from_millis(100);

/// Who this link socket serves: a datagram of `group` sent by `me` is this member's own,
/// come back (reflected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkIdentity {
    /// FGCP `group-id` or FGSP `standalone-group-id` (the header's group).
    pub group: u16,
    /// This member's id on the link.
    pub me: MemberId,
}

/// What the reader does with a datagram, decided from its clear header alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// This member's own datagram: counted, not queued.
    Reflected,
    /// A heartbeat by its header (not authenticated): may use the reserve.
    Heartbeat,
    /// Everything else, including what does not parse: ha-core decides and counts.
    Other,
}

fn classify(datagram: &[u8], id: LinkIdentity) -> Class {
    let Ok((h, _)) = Header::parse(datagram) else {
        return Class::Other;
    };
    // The same order as ha-core's `HaLink::open`: another group's datagram is counted
    // `wrong_group` there, whatever its sender.
    if h.group == id.group && h.sender == id.me {
        Class::Reflected
    } else if h.msg_type == MsgType::HEARTBEAT && datagram.len() <= HEARTBEAT_MAX_LEN {
        Class::Heartbeat
    } else {
        Class::Other
    }
}

type Datagram = (Vec<u8>, SocketAddr);

/// The reader's queue and its drop counters (behind one mutex: the reader holds it for a
/// push, the tick for a swap).
#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Datagram>,
    /// Charged bytes of `items`.
    bytes: usize,
    queue_full: u64,
    reflected: u64,
}

impl Queue {
    /// The reader's decision for one datagram.
    fn offer(&mut self, id: LinkIdentity, data: Vec<u8>, from: SocketAddr) {
        let limit = match classify(&data, id) {
            Class::Reflected => {
                self.reflected = self.reflected.saturating_add(1);
                return;
            }
            Class::Heartbeat => QUEUE_BYTES + HEARTBEAT_RESERVE_BYTES,
            Class::Other => QUEUE_BYTES,
        };
        let cost = data.len().saturating_add(ITEM_OVERHEAD);
        if self.bytes.saturating_add(cost) > limit {
            self.queue_full = self.queue_full.saturating_add(1);
            return;
        }
        self.bytes += cost;
        self.items.push_back((data, from));
    }

    /// Everything queued, in arrival order; the queue is empty afterwards.
    fn take(&mut self) -> VecDeque<Datagram> {
        self.bytes = 0;
        std::mem::take(&mut self.items)
    }
}

fn lock(q: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // A poisoned lock means a panic while holding it, between plain field updates: the
    // queue is still consistent enough to use (at worst `bytes` is off until the next take).
    q.lock().unwrap_or_else(|e| e.into_inner())
}

/// One bound UDP socket and its reader thread.
pub struct LinkSocket {
    sock: UdpSocket,
    queue: Arc<Mutex<Queue>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    /// The kernel's drop count of the socket at the last [`LinkSocket::take_kernel_drops`].
    kernel_drops_seen: AtomicU32,
}

impl LinkSocket {
    /// Binds `0.0.0.0:port`, optionally to `device` (`SO_BINDTODEVICE`), with broadcast
    /// allowed, and starts the reader thread, which drops `id`'s own datagrams (see the
    /// module documentation for the queue policy).
    pub fn bind(port: u16, device: Option<&str>, id: LinkIdentity) -> io::Result<LinkSocket> {
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        if let Some(dev) = device {
            bind_to_device(&sock, dev)?;
        }
        sock.set_broadcast(true)?;
        sock.set_read_timeout(Some(POLL))?;
        if let Err(e) = set_recv_buffer(&sock, RECV_QUEUE_BYTES) {
            tracing::warn!("HA link socket receive buffer: {e} (kernel default kept)");
        }
        let reader_sock = sock.try_clone()?;
        let queue = Arc::new(Mutex::new(Queue::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("ha-link-{port}"))
                .spawn(move || read_loop(reader_sock, id, queue, stop))?
        };
        let kernel_drops_seen = AtomicU32::new(kernel_drops(&sock).unwrap_or(0));
        Ok(LinkSocket {
            sock,
            queue,
            stop,
            reader: Some(reader),
            kernel_drops_seen,
        })
    }

    /// Datagrams received since the last call, in arrival order.
    pub fn drain(&self) -> VecDeque<(Vec<u8>, SocketAddr)> {
        lock(&self.queue).take()
    }

    /// Datagrams the reader dropped because the queue was full, since the last call.
    pub fn take_queue_full(&self) -> u64 {
        std::mem::take(&mut lock(&self.queue).queue_full)
    }

    /// This member's own datagrams that came back (dropped, never queued), since the last
    /// call: the `reflected` drops.
    pub fn take_reflected(&self) -> u64 {
        std::mem::take(&mut lock(&self.queue).reflected)
    }

    /// Datagrams the kernel dropped for this socket since the last call (`SO_MEMINFO`'s
    /// `SK_MEMINFO_DROPS`: mostly the receive buffer overflowing while the reader thread
    /// was not scheduled, also UDP checksum failures). 0 when the kernel does not say.
    pub fn take_kernel_drops(&self) -> u64 {
        match kernel_drops(&self.sock) {
            // The kernel's counter is a wrapping 32-bit value.
            Ok(now) => {
                u64::from(now.wrapping_sub(self.kernel_drops_seen.swap(now, Ordering::Relaxed)))
            }
            Err(_) => 0,
        }
    }

    /// The bound address (the port, when bound to port 0).
    #[cfg(test)]
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Sends one datagram; errors are returned for the caller to count.
    pub fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        self.sock.send_to(datagram, to).map(|_| ())
    }

    /// A second handle on the socket, for sending from another thread (the heartbeat
    /// pump); receiving stays with the reader thread.
    pub fn sender(&self) -> io::Result<UdpSocket> {
        self.sock.try_clone()
    }
}

impl Drop for LinkSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.reader.take() {
            // The reader wakes at least every POLL; joining frees the port for a rebind.
            let _ = h.join();
        }
    }
}

fn read_loop(sock: UdpSocket, id: LinkIdentity, queue: Arc<Mutex<Queue>>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; RECV_BUF];
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let data = buf.get(..n).unwrap_or(&buf[..]).to_vec();
                lock(&queue).offer(id, data, from);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("HA link socket read failed: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

/// The socket's receive buffer (socket(7)): `SO_RCVBUFFORCE` (needs CAP_NET_ADMIN, which
/// hasyncd has for the shared addresses), else `SO_RCVBUF` (capped by `net.core.rmem_max`).
fn set_recv_buffer(sock: &UdpSocket, bytes: usize) -> io::Result<()> {
    let val = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let set = |opt: libc::c_int| {
        // SAFETY: valid fd owned by `sock`; the option value is one readable c_int that
        // lives for the duration of the call.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if set(libc::SO_RCVBUFFORCE) == 0 || set(libc::SO_RCVBUF) == 0 {
        return Ok(());
    }
    Err(io::Error::last_os_error())
}

/// The socket's kernel drop counter (`SO_MEMINFO`, `SK_MEMINFO_DROPS`).
fn kernel_drops(sock: &UdpSocket) -> io::Result<u32> {
    let mut vars = [0u32; SK_MEMINFO_VARS];
    let mut len = std::mem::size_of_val(&vars) as libc::socklen_t;
    // SAFETY: valid fd owned by `sock`; the kernel writes at most `len` bytes into `vars`,
    // which is exactly `len` bytes long and lives for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            vars.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let i = usize::try_from(libc::SK_MEMINFO_DROPS).unwrap_or(usize::MAX);
    let filled = usize::try_from(len).unwrap_or(0) / std::mem::size_of::<u32>();
    match vars.get(i) {
        Some(v) if i < filled => Ok(*v),
        _ => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "SO_MEMINFO without a drop counter",
        )),
    }
}

/// `SO_BINDTODEVICE` (socket(7)): receive only from, and send only through, `dev`.
fn bind_to_device(sock: &UdpSocket, dev: &str) -> io::Result<()> {
    let name = dev.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {dev:?} is not a valid Linux interface name"),
        ));
    }
    // SAFETY: the fd is a valid open socket owned by `sock`; the option value points to
    // `name.len()` readable bytes that live for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The hardware address of `dev` (`SIOCGIFHWADDR`, netdevice(7)) in the caller's network
/// namespace; hasyncd derives the FGCP serial and member id from it.
pub fn hw_addr(dev: &str) -> io::Result<[u8; 6]> {
    let name = dev.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {dev:?} is not a valid Linux interface name"),
        ));
    }
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.iter()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: valid fd, `req` is a properly initialised ifreq with a NUL-terminated name
    // (its length was checked against IFNAMSIZ above); the kernel writes into `req` only.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after a successful SIOCGIFHWADDR the union holds `ifru_hwaddr`.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_core::msg::{HaRole, Heartbeat, Message};
    use ha_core::{ClusterKind, DropReason, ElectionEvent, Fgcp, FgcpConfig, HaLink, LinkKey};

    const GROUP: u16 = 7;
    const ME: MemberId = MemberId(2);
    const PEER: MemberId = MemberId(1);
    const ID: LinkIdentity = LinkIdentity {
        group: GROUP,
        me: ME,
    };

    fn key(group: u16) -> LinkKey {
        // Few PBKDF2 iterations: the tests exercise the queue, not the key's cost.
        LinkKey::derive(ClusterKind::Fgcp, group, Some(b"cluster-pw"), 10).unwrap()
    }

    fn link(member: MemberId, group: u16) -> HaLink {
        HaLink::new(key(group), member, 1_000).unwrap()
    }

    fn from() -> SocketAddr {
        SocketAddr::from(([169, 254, 0, 1], FGCP_PORT))
    }

    fn heartbeat(member: MemberId) -> Message {
        Message::Heartbeat(Heartbeat {
            member,
            serial: "HVN0A0B0C0D0E0F".into(),
            priority: 128,
            override_: false,
            uptime_ms: 123_456_789,
            monitor_up: 4,
            monitor_total: 4,
            role: HaRole::Primary,
            primary: Some(member),
            fgsp_epoch: 0,
            fgsp_peers: Vec::new(),
        })
    }

    /// An authentic sync datagram of about `len` bytes (a CHILD SA type with an opaque
    /// body: the queue only reads the header; `open` then counts it `bad_payload`, which
    /// is after the replay check and so still shows whether it was a replay).
    fn sync(l: &mut HaLink, len: usize) -> Vec<u8> {
        l.seal_raw(MsgType::CHILD_SA, &vec![0xc0; len]).unwrap()
    }

    #[test]
    fn reflected_datagrams_are_counted_not_queued() {
        let mut mine = link(ME, GROUP);
        let mut peer = link(PEER, GROUP);
        let mut other_group = link(ME, GROUP + 1);
        let mut q = Queue::default();
        q.offer(ID, mine.seal(&heartbeat(ME)).unwrap(), from());
        q.offer(ID, sync(&mut mine, 1_000), from());
        q.offer(ID, peer.seal(&heartbeat(PEER)).unwrap(), from());
        // Same sender id in another group: ha-core counts it `wrong_group`, so it is queued.
        let foreign = sync(&mut other_group, 10);
        q.offer(ID, foreign.clone(), from());
        // Not a link datagram at all: queued for ha-core to count.
        q.offer(ID, vec![0xff; 3], from());
        assert_eq!(q.reflected, 2);
        assert_eq!(q.queue_full, 0);
        let got = q.take();
        assert_eq!(got.len(), 3);
        let mut rx = link(ME, GROUP);
        assert!(rx.open(&got[0].0).is_ok());
        assert_eq!(got[1].0, foreign);
        assert_eq!(rx.open(&got[1].0).err(), Some(DropReason::WrongGroup));
        assert_eq!(rx.open(&got[2].0).err(), Some(DropReason::Truncated));
        assert_eq!((q.bytes, q.items.len()), (0, 0));
    }

    #[test]
    fn a_full_sync_queue_still_admits_heartbeats_in_order() {
        let mut peer = link(PEER, GROUP);
        let mut q = Queue::default();
        // 16 KB sync datagrams until the byte bound refuses one: more than a replay window
        // of them, so a heartbeat opened ahead of them would make the oldest replays.
        let mut sent = 0usize;
        while q.queue_full == 0 {
            q.offer(ID, sync(&mut peer, 16 * 1024), from());
            sent += 1;
        }
        assert!(sent as u64 > ha_core::link::WINDOW, "{sent}");
        assert!(
            sent * 16 * 1024 > QUEUE_BYTES * 9 / 10,
            "the bound is bytes"
        );
        // Top it up with the smallest sync datagrams until even those are refused.
        while q.queue_full == 1 {
            q.offer(ID, sync(&mut peer, 0), from());
        }
        let queued = q.items.len();
        assert!(q.bytes <= QUEUE_BYTES);
        let hb = peer.seal(&heartbeat(PEER)).unwrap();
        assert!(hb.len() <= HEARTBEAT_MAX_LEN, "{}", hb.len());
        q.offer(ID, hb.clone(), from());
        // A small sync datagram still does not get in; another heartbeat does.
        q.offer(ID, sync(&mut peer, 0), from());
        let hb2 = peer.seal(&heartbeat(PEER)).unwrap();
        q.offer(ID, hb2.clone(), from());
        assert_eq!(q.queue_full, 3);
        let got = q.take();
        assert_eq!(got.len(), queued + 2);
        assert_eq!(got[queued].0, hb);
        assert_eq!(got[queued + 1].0, hb2);
        // Opened in arrival order, nothing is a replay and both heartbeats authenticate.
        let mut rx = link(ME, GROUP);
        let mut heartbeats = 0;
        for (d, _) in &got {
            match rx.open(d) {
                Ok(r) => {
                    assert!(matches!(r.message, Message::Heartbeat(_)));
                    heartbeats += 1;
                }
                Err(e) => assert_eq!(e, DropReason::BadPayload),
            }
        }
        assert_eq!(heartbeats, 2);
        assert_eq!(rx.stats().drops(DropReason::Replayed), 0);
    }

    #[test]
    fn heartbeat_reserve_is_bounded_and_needs_a_heartbeat_sized_datagram() {
        let mut peer = link(PEER, GROUP);
        let mut q = Queue::default();
        let big = sync(&mut peer, 60 * 1024);
        while q.queue_full == 0 {
            q.offer(ID, big.clone(), from());
        }
        // A long datagram that claims to be a heartbeat is not one for admission.
        let mut long_hb = big.clone();
        long_hb[1] = MsgType::HEARTBEAT.0;
        q.offer(ID, long_hb, from());
        assert_eq!(q.queue_full, 2);
        // Heartbeat-typed datagrams (forged or not) fill the reserve, then are refused too.
        let hb = peer.seal(&heartbeat(PEER)).unwrap();
        let mut admitted = 0usize;
        while q.queue_full == 2 {
            q.offer(ID, hb.clone(), from());
            admitted += 1;
        }
        assert!(admitted > 1_000, "{admitted}");
        assert!(q.bytes <= QUEUE_BYTES + HEARTBEAT_RESERVE_BYTES);
    }

    #[test]
    fn forged_heartbeat_headers_do_not_keep_a_member_alive() {
        // The path of the daemon's tick: queue -> HaLink::open -> election, which hears
        // only what authenticated.
        let mut peer = link(PEER, GROUP);
        let mut rx = link(ME, GROUP);
        let mut cfg = FgcpConfig::new(ME, "HVN000000000002", 100);
        cfg.hb_interval_ms = 100;
        cfg.hb_lost_threshold = 3;
        let mut fgcp = Fgcp::new(cfg, 0).unwrap();
        let mut q = Queue::default();
        let tick = |q: &mut Queue, fgcp: &mut Fgcp, rx: &mut HaLink, now: u64| {
            for (d, _) in q.take() {
                if let Ok(r) = rx.open(&d) {
                    if let Message::Heartbeat(hb) = &r.message {
                        fgcp.handle_heartbeat(r.sender, hb, now);
                    }
                }
            }
            fgcp.handle_timeout(now);
            std::iter::from_fn(|| fgcp.poll_event()).collect::<Vec<_>>()
        };
        let real = peer.seal(&heartbeat(PEER)).unwrap();
        q.offer(ID, real.clone(), from());
        let ev = tick(&mut q, &mut fgcp, &mut rx, 50);
        assert!(ev.contains(&ElectionEvent::PeerJoined(PEER)), "{ev:?}");
        // From now on only forged heartbeats of PEER: a valid clear header (its group,
        // its id, type heartbeat, a newer counter) over garbage, and a replay of the real one.
        let mut lost = false;
        for n in 1..=20u64 {
            let mut forged = real.clone();
            forged[16..24].copy_from_slice(&(1_000 + n).to_be_bytes());
            q.offer(ID, forged, from());
            q.offer(ID, real.clone(), from());
            let ev = tick(&mut q, &mut fgcp, &mut rx, 50 + n * 100);
            assert!(!ev.contains(&ElectionEvent::PeerJoined(PEER)), "{ev:?}");
            if ev.contains(&ElectionEvent::PeerLost(PEER)) {
                lost = true;
                break;
            }
        }
        assert!(lost, "forged heartbeats kept the member alive");
        assert_eq!(q.queue_full, 0, "the forged ones were queued, not dropped");
        assert!(rx.stats().drops(DropReason::AuthFailed) > 0);
        assert!(rx.stats().drops(DropReason::Replayed) > 0);
    }

    #[test]
    fn kernel_drops_are_read_from_the_socket() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        // The smallest receive buffer the kernel allows (it rounds up): a few datagrams.
        let one: libc::c_int = 1;
        // SAFETY: valid fd; the option value is one readable c_int.
        let rc = unsafe {
            libc::setsockopt(
                rx.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let before = kernel_drops(&rx).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..64 {
            tx.send_to(&[0u8; 1_000], rx.local_addr().unwrap()).unwrap();
        }
        // Loopback delivers within send_to: nothing read, most of them dropped.
        let after = kernel_drops(&rx).unwrap();
        assert!(after.wrapping_sub(before) >= 32, "{before} -> {after}");
    }

    #[test]
    fn the_reader_thread_counts_reflected_and_queues_the_rest() {
        let s = LinkSocket::bind(0, None, ID).unwrap();
        let to = SocketAddr::from(([127, 0, 0, 1], s.local_addr().unwrap().port()));
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut mine = link(ME, GROUP);
        let mut peer = link(PEER, GROUP);
        for _ in 0..5 {
            tx.send_to(&sync(&mut mine, 100), to).unwrap();
        }
        let hb = peer.seal(&heartbeat(PEER)).unwrap();
        let sy = sync(&mut peer, 2_000);
        tx.send_to(&hb, to).unwrap();
        tx.send_to(&sy, to).unwrap();
        let mut got = Vec::new();
        let mut reflected = 0;
        // Waits for the reader (loopback, nothing lost); bounded so a broken reader fails.
        for _ in 0..1_000 {
            got.extend(s.drain());
            reflected += s.take_reflected();
            if got.len() >= 2 && reflected >= 5 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(reflected, 5);
        assert_eq!(
            got.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
            vec![hb, sy]
        );
        assert_eq!(s.take_queue_full(), 0);
        assert_eq!(s.take_kernel_drops(), 0);
    }
}
