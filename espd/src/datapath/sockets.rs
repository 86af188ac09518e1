//! The network edge (DESIGN.md §4): raw IPv4 and IPv6 sockets for IP protocol 50, UDP
//! sockets on port 4500 (0.0.0.0 and `[::]`, the latter IPv6-only) for RFC 3948 traffic, the two unix datagram sockets that carry IKE messages
//! between UDP/4500 and ikemgr, and batched receive/send (`recvmmsg`/`sendmmsg`) with
//! buffers owned by each worker.
//!
//! IKE hand-off format (both unix sockets, one datagram per IKE message):
//!
//! ```text
//! 0       4     6       10    12
//! | src IPv4 | sport | dst IPv4 | dport | IKE message (no non-ESP marker) ...
//! ```
//! addresses and ports in network byte order. espd sends what arrives on UDP/4500 with the
//! non-ESP marker to `<run-dir>/ike4500.sock` (src = the peer, dst = the local address the
//! datagram was sent to, from IP_PKTINFO, or 0.0.0.0 if unknown; port 4500), and sends every
//! datagram received on its own `<run-dir>/espd-ike.sock` from its UDP/4500 socket to `dst`
//! with the marker prepended, from source address `src` (IP_PKTINFO) unless it is 0.0.0.0,
//! when the kernel picks it (`src`'s port is ignored).
//!
//! Every outbound ESP packet and IKE datagram carries its SA's local address as source in an
//! IP_PKTINFO control message (`ipi_spec_dst`; IPV6_PKTINFO `ipi6_addr` over IPv6), so a
//! gateway whose address sits on a loopback or a shared cluster address answers from that
//! address, not from the outgoing interface's.
//!
//! Over IPv6 the header is 42 octets:
//!
//! ```text
//! 0                 6          22      24         40      42
//! | ff ff ff ff 00 00 | src IPv6 | sport | dst IPv6 | dport | IKE message ...
//! ```
//! (a source of 255.255.255.255, never an IKE peer, marks this form); the local address
//! comes from IPV6_PKTINFO and goes out in it.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

/// IKE hand-off header length: src addr, src port, dst addr, dst port.
pub const IKE_HDR_LEN: usize = 12;
/// IPv6 hand-off header length: marker, src addr, src port, dst addr, dst port.
pub const IKE_HDR6_LEN: usize = 42;
/// First octets of an IPv6 hand-off header.
const IKE_HDR6_MARK: [u8; 6] = [0xff, 0xff, 0xff, 0xff, 0, 0];

/// Largest datagram a worker slot holds (jumbo frames fit; longer ones are truncated and
/// dropped as such).
pub const SLOT: usize = 9216;
/// Packets per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 32;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: fd was just returned by socket(2) and has no other owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut s: libc::sockaddr_in = unsafe { zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
}

fn sockaddr6(a: SocketAddrV6) -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid value.
    let mut s: libc::sockaddr_in6 = unsafe { zeroed() };
    s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    s.sin6_port = a.port().to_be();
    s.sin6_addr.s6_addr = a.ip().octets();
    s.sin6_scope_id = a.scope_id();
    s
}

/// Room for an IPv4 or IPv6 socket address (a `sockaddr_in` fits in a `sockaddr_in6`).
type AnyAddr = libc::sockaddr_in6;

/// `a` written into an [`AnyAddr`], with its length.
fn any_sockaddr(a: SocketAddr) -> (AnyAddr, libc::socklen_t) {
    match a {
        SocketAddr::V4(a) => {
            // SAFETY: plain old data; all-zero is valid.
            let mut buf: AnyAddr = unsafe { zeroed() };
            // SAFETY: a sockaddr_in (16 bytes, align 4) fits at the start of a sockaddr_in6
            // (28 bytes, align 4).
            unsafe {
                std::ptr::write(
                    (&mut buf as *mut AnyAddr).cast::<libc::sockaddr_in>(),
                    sockaddr(a),
                )
            };
            (buf, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => (sockaddr6(a), size_of::<AnyAddr>() as libc::socklen_t),
    }
}

/// The socket address the kernel wrote into `s` (by its family), if IPv4 or IPv6.
fn from_any(s: &AnyAddr) -> Option<SocketAddr> {
    match libc::c_int::from(s.sin6_family) {
        libc::AF_INET => {
            // SAFETY: the family says the kernel wrote a sockaddr_in, which fits (see
            // `any_sockaddr`).
            let v4 = unsafe { std::ptr::read((s as *const AnyAddr).cast::<libc::sockaddr_in>()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)),
                u16::from_be(v4.sin_port),
            )))
        }
        libc::AF_INET6 => Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(s.sin6_addr.s6_addr),
            u16::from_be(s.sin6_port),
            0,
            s.sin6_scope_id,
        ))),
        _ => None,
    }
}

fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// The packet sockets of one worker (DESIGN.md §4). Each worker has its own set, so that
/// every inbound packet of one SA reaches the same worker in the order it arrived: a worker
/// that took a batch off a shared socket and was then kept off the CPU while another
/// worker went on with later packets of the same SA would find its packets behind the
/// replay window. See [`spi_filter`] and [`spi_steering`].
#[derive(Debug)]
pub struct Lane {
    /// Raw IPv4, protocol 50: receives include the IPv4 header; sends do not.
    pub raw: OwnedFd,
    /// UDP bound to 0.0.0.0:4500 (one socket of a `SO_REUSEPORT` group).
    pub udp: OwnedFd,
    /// Raw IPv6, next header 50: receives and sends carry the ESP packet only. `None` on a
    /// host without IPv6.
    pub raw6: Option<OwnedFd>,
    /// UDP bound to `[::]:4500`, IPv6 only. `None` on a host without IPv6.
    pub udp6: Option<OwnedFd>,
}

/// The sockets of the datapath.
#[derive(Debug)]
pub struct Sockets {
    /// One lane per worker, at least one; lane 0 also carries IKE to and from UDP/4500.
    pub lanes: Vec<Lane>,
    /// To `<run-dir>/ike4500.sock` (the hand-off thread's).
    pub ike_out: IkeHandoffSocket,
    /// `<run-dir>/espd-ike.sock`: IKE messages from ikemgr to send out of 4500.
    pub ike_in: OwnedFd,
}

/// An unbound, blocking unix datagram socket that sends hand-off datagrams to ikemgr's
/// `ike4500.sock`.
#[derive(Debug)]
pub struct IkeHandoffSocket {
    fd: OwnedFd,
    addr: libc::sockaddr_un,
    len: libc::socklen_t,
}

impl IkeHandoffSocket {
    /// A socket that sends to `path`, each send waiting up to [`IKE_HANDOFF_WAIT`].
    pub fn open(path: &Path) -> io::Result<IkeHandoffSocket> {
        // SAFETY: socket(2) with constant arguments.
        let fd = owned(unsafe {
            libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
        })?;
        set_timeout(&fd, libc::SO_SNDTIMEO, IKE_HANDOFF_WAIT)?;
        let (addr, len) = unix_addr(path)?;
        Ok(IkeHandoffSocket { fd, addr, len })
    }

    /// Sends one hand-off datagram, waiting up to [`IKE_HANDOFF_WAIT`] for room in the
    /// receiver's queue (the kernel queues only `net.unix.max_dgram_qlen` datagrams, 10 by
    /// default, per unix socket).
    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: msg is valid for msg.len() bytes; the address is a live sockaddr_un.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&self.addr as *const libc::sockaddr_un).cast(),
                self.len,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// How long the hand-off thread waits for room in ikemgr's receive queue before it drops
/// an IKE message (`espd_drops_total{reason="ike_relay"}`).
pub const IKE_HANDOFF_WAIT: Duration = Duration::from_millis(500);

/// Sets `SO_SNDTIMEO` or `SO_RCVTIMEO` (`opt`) of `fd`.
fn set_timeout(fd: &OwnedFd, opt: libc::c_int, d: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt with a live timeval and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_un = unsafe { zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let b = path.as_os_str().as_bytes();
    if b.len() >= a.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path too long: {}", path.display()),
        ));
    }
    for (d, s) in a.sun_path.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    let len = (size_of::<libc::sa_family_t>() + b.len() + 1) as libc::socklen_t;
    Ok((a, len))
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// Classic BPF socket filter for the raw ESP socket of lane `lane` out of `lanes`: keeps
/// the packets whose SPI modulo `lanes` is `lane`. `ipv4_header`: the packet
/// starts with its IPv4 header (raw IPv4 sockets), else with the ESP header (raw IPv6).
/// A packet too short to hold an SPI goes to lane 0, which counts it as truncated.
pub fn spi_filter(ipv4_header: bool, lanes: usize, lane: usize) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_ADD, BPF_ALU, BPF_B, BPF_IND, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_LD,
        BPF_LDX, BPF_LEN, BPF_MISC, BPF_MOD, BPF_MSH, BPF_RET, BPF_TAX, BPF_TXA, BPF_W, BPF_X,
    };
    const ACCEPT: u32 = u32::MAX;
    let n = lanes.max(1) as u32;
    let id = lane as u32;
    // Where a packet too short for an SPI goes: the accept or the drop at the end.
    let short_to_accept = lane == 0;
    let mut p = Vec::new();
    if ipv4_header {
        // X = IHL * 4 + 4: the packet must be at least that long.
        p.push(stmt(BPF_LDX | BPF_B | BPF_MSH, 0));
        p.push(stmt(BPF_MISC | BPF_TXA, 0));
        p.push(stmt(BPF_ALU | BPF_ADD | BPF_K, 4));
        p.push(stmt(BPF_MISC | BPF_TAX, 0));
        p.push(stmt(BPF_LD | BPF_W | BPF_LEN, 0));
        // Next: 4 instructions, then drop (+4), then accept (+5).
        p.push(jump(
            BPF_JMP | BPF_JGE | BPF_X,
            0,
            0,
            if short_to_accept { 5 } else { 4 },
        ));
        p.push(stmt(BPF_LDX | BPF_B | BPF_MSH, 0));
        p.push(stmt(BPF_LD | BPF_W | BPF_IND, 0));
    } else {
        p.push(stmt(BPF_LD | BPF_W | BPF_LEN, 0));
        // Next: 3 instructions, then drop (+3), then accept (+4).
        p.push(jump(
            BPF_JMP | BPF_JGE | BPF_K,
            4,
            0,
            if short_to_accept { 4 } else { 3 },
        ));
        p.push(stmt(BPF_LD | BPF_W | BPF_ABS, 0));
    }
    p.push(stmt(BPF_ALU | BPF_MOD | BPF_K, n));
    p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, id, 1, 0));
    p.push(stmt(BPF_RET | BPF_K, 0));
    p.push(stmt(BPF_RET | BPF_K, ACCEPT));
    p
}

/// Classic BPF program that picks the socket of a UDP/4500 `SO_REUSEPORT` group of `lanes`
/// sockets (bound in lane order): the program sees the UDP payload, whose first word is
/// the SPI: SPI modulo `lanes` picks the socket. IKE (non-ESP marker 0), NAT keepalives and anything too short
/// land on lane 0.
pub fn spi_steering(lanes: usize) -> Vec<libc::sock_filter> {
    use libc::{BPF_A, BPF_ABS, BPF_ALU, BPF_K, BPF_LD, BPF_MOD, BPF_RET, BPF_W};
    vec![
        // A load past the end ends the program with 0: lane 0.
        stmt(BPF_LD | BPF_W | BPF_ABS, 0),
        stmt(BPF_ALU | BPF_MOD | BPF_K, lanes.max(1) as u32),
        stmt(BPF_RET | BPF_A, 0),
    ]
}

/// Attaches classic BPF `prog` to `fd` with socket option `opt`.
fn attach_bpf(fd: RawFd, opt: libc::c_int, prog: &mut [libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: setsockopt with a live sock_fprog whose filter points at prog.len()
    // instructions; the kernel copies them.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&fprog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

fn bind_ip(fd: RawFd, a: SocketAddr) -> io::Result<()> {
    let (sa, len) = any_sockaddr(a);
    // SAFETY: bind with a live socket address and its length.
    cvt(unsafe { libc::bind(fd, (&sa as *const AnyAddr).cast(), len) }).map(|_| ())
}

fn new_socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    let nb = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket(2) with plain integer arguments.
    owned(unsafe { libc::socket(domain, ty | nb, proto) })
}

/// A raw ESP socket of `domain` with large buffers (bursts from a fast peer: more than the
/// default ~200 KiB; best effort).
fn raw_esp(domain: libc::c_int) -> io::Result<OwnedFd> {
    let fd = new_socket(domain, libc::SOCK_RAW, libc::IPPROTO_ESP)?;
    let _ = set_int_opt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        8 << 20,
    );
    let _ = set_int_opt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        8 << 20,
    );
    Ok(fd)
}

/// One UDP socket of the `at`:4500 `SO_REUSEPORT` group, with large buffers, UDP GRO (runs
/// of ESP datagrams of one peer arrive as one buffer, split by the worker; best effort)
/// and the local address of each datagram (IKE replies leave from it).
fn udp4500(at: SocketAddr) -> io::Result<OwnedFd> {
    let v6 = at.is_ipv6();
    let fd = new_socket(
        if v6 { libc::AF_INET6 } else { libc::AF_INET },
        libc::SOCK_DGRAM,
        0,
    )?;
    let raw = fd.as_raw_fd();
    let _ = set_int_opt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20);
    let _ = set_int_opt(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 8 << 20);
    if v6 {
        // IPv4 stays on the 0.0.0.0 sockets.
        set_int_opt(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    set_int_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    bind_ip(raw, at)?;
    let _ = set_int_opt(raw, SOL_UDP, UDP_GRO, 1);
    if v6 {
        set_int_opt(raw, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
    } else {
        set_int_opt(raw, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
    }
    Ok(fd)
}

/// Fails when `at` is taken: a plain bind, so that the `SO_REUSEPORT` group below cannot
/// join the sockets of another process (a second espd) on the same port.
fn probe_free(at: SocketAddr) -> io::Result<()> {
    let fd = new_socket(
        if at.is_ipv6() {
            libc::AF_INET6
        } else {
            libc::AF_INET
        },
        libc::SOCK_DGRAM,
        0,
    )?;
    if at.is_ipv6() {
        set_int_opt(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    bind_ip(fd.as_raw_fd(), at)
}

/// The UDP/4500 sockets of `at` (0.0.0.0 or `[::]`), one per lane, with the SPI steering
/// attached when there is more than one.
fn udp_group(at: SocketAddr, lanes: usize) -> io::Result<Vec<OwnedFd>> {
    probe_free(at)?;
    let socks = (0..lanes.max(1))
        .map(|_| udp4500(at))
        .collect::<io::Result<Vec<_>>>()?;
    if let (true, Some(first)) = (lanes > 1, socks.first()) {
        attach_bpf(
            first.as_raw_fd(),
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &mut spi_steering(lanes),
        )
        .map_err(|e| io::Error::new(e.kind(), format!("SPI steering on UDP {at}: {e}")))?;
    }
    Ok(socks)
}

/// The raw ESP sockets of one family, one per lane, each keeping its lane's SPIs.
fn raw_group(domain: libc::c_int, lanes: usize) -> io::Result<Vec<OwnedFd>> {
    let v4 = domain == libc::AF_INET;
    (0..lanes.max(1))
        .map(|lane| {
            let fd = raw_esp(domain)?;
            if lanes > 1 {
                attach_bpf(
                    fd.as_raw_fd(),
                    libc::SO_ATTACH_FILTER,
                    &mut spi_filter(v4, lanes, lane),
                )?;
            }
            Ok(fd)
        })
        .collect()
}

/// The IPv6 sockets of every lane (raw ESP, and UDP on `[::]:4500`, IPv6 only).
fn open_v6(lanes: usize) -> io::Result<(Vec<OwnedFd>, Vec<OwnedFd>)> {
    let raw = raw_group(libc::AF_INET6, lanes)
        .map_err(|e| io::Error::new(e.kind(), format!("raw IPv6 ESP socket: {e}")))?;
    let at = SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::UNSPECIFIED,
        esp_proto::udp::NAT_T_PORT,
        0,
        0,
    ));
    let udp =
        udp_group(at, lanes).map_err(|e| io::Error::new(e.kind(), format!("UDP {at}: {e}")))?;
    Ok((raw, udp))
}

impl Sockets {
    /// Opens and binds everything, one lane per worker. Fails if UDP/4500 is taken or raw
    /// sockets are not allowed.
    pub fn open(run_dir: &Path, lanes: usize) -> io::Result<Sockets> {
        let lanes = lanes.max(1);
        let raw = raw_group(libc::AF_INET, lanes)
            .map_err(|e| io::Error::new(e.kind(), format!("raw ESP socket: {e}")))?;
        let at = SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::UNSPECIFIED,
            esp_proto::udp::NAT_T_PORT,
        ));
        let udp =
            udp_group(at, lanes).map_err(|e| io::Error::new(e.kind(), format!("UDP {at}: {e}")))?;
        let (raw6, udp6) = open_v6(lanes).unwrap_or_else(|e| {
            tracing::warn!("no IPv6 ESP (raw and UDP [::]:4500): {e}");
            (Vec::new(), Vec::new())
        });
        let (mut raw6, mut udp6) = (raw6.into_iter(), udp6.into_iter());
        let lanes = raw
            .into_iter()
            .zip(udp)
            .map(|(raw, udp)| Lane {
                raw,
                udp,
                raw6: raw6.next(),
                udp6: udp6.next(),
            })
            .collect();

        let ike_out = IkeHandoffSocket::open(&run_dir.join("ike4500.sock"))?;
        // SAFETY: socket(2) with constant arguments.
        let ike_in = owned(unsafe {
            libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
        })?;
        let in_path = run_dir.join("espd-ike.sock");
        let _ = std::fs::remove_file(&in_path);
        let (a, l) = unix_addr(&in_path)?;
        // SAFETY: bind with a live sockaddr_un and its length.
        cvt(unsafe {
            libc::bind(
                ike_in.as_raw_fd(),
                (&a as *const libc::sockaddr_un).cast(),
                l,
            )
        })
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", in_path.display())))?;
        // A receive timeout lets the relay thread notice shutdown.
        set_timeout(&ike_in, libc::SO_RCVTIMEO, Duration::from_millis(200))?;
        Ok(Sockets {
            lanes,
            ike_out,
            ike_in,
        })
    }

    /// The hand-off datagram for an IKE message that arrived on UDP/4500: the header (the
    /// peer, and `local`, the address the datagram was sent to: unspecified if unknown, or of
    /// the other family) and the message.
    pub fn ike_handoff(from: SocketAddr, local: Option<IpAddr>, ike: &[u8]) -> Vec<u8> {
        let port = esp_proto::udp::NAT_T_PORT.to_be_bytes();
        let mut msg = Vec::with_capacity(IKE_HDR6_LEN + ike.len());
        match from {
            SocketAddr::V4(from) => {
                let local = match local {
                    Some(IpAddr::V4(a)) => a,
                    _ => Ipv4Addr::UNSPECIFIED,
                };
                msg.extend_from_slice(&from.ip().octets());
                msg.extend_from_slice(&from.port().to_be_bytes());
                msg.extend_from_slice(&local.octets());
            }
            SocketAddr::V6(from) => {
                let local = match local {
                    Some(IpAddr::V6(a)) => a,
                    _ => Ipv6Addr::UNSPECIFIED,
                };
                msg.extend_from_slice(&IKE_HDR6_MARK);
                msg.extend_from_slice(&from.ip().octets());
                msg.extend_from_slice(&from.port().to_be_bytes());
                msg.extend_from_slice(&local.octets());
            }
        }
        msg.extend_from_slice(&port);
        msg.extend_from_slice(ike);
        msg
    }

    /// Blocks up to 200 ms for one message from ikemgr on `espd-ike.sock` and sends it out of
    /// UDP/4500 with the non-ESP marker. Returns Ok(false) on timeout, Err on a malformed
    /// hand-off message or a send error.
    pub fn relay_from_ikemgr(&self, buf: &mut [u8], out: &mut [u8]) -> io::Result<bool> {
        // SAFETY: buf is valid for buf.len() writable bytes.
        let n = unsafe {
            libc::recv(
                self.ike_in.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(false),
                _ => Err(e),
            };
        }
        let msg = buf.get(..n as usize).unwrap_or(&[]);
        let short = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "hand-off message shorter than its header",
            )
        };
        let (src, dst, ike, fd) = if msg.starts_with(&IKE_HDR6_MARK) {
            let (Some(hdr), Some(ike)) = (msg.get(..IKE_HDR6_LEN), msg.get(IKE_HDR6_LEN..)) else {
                return Err(short());
            };
            let v6 = |at: usize| -> Ipv6Addr {
                let mut b = [0u8; 16];
                b.copy_from_slice(hdr.get(at..at + 16).unwrap_or(&[0; 16]));
                Ipv6Addr::from(b)
            };
            let fd = self
                .lanes
                .first()
                .and_then(|l| l.udp6.as_ref())
                .map(|f| f.as_raw_fd())
                .ok_or_else(|| io::Error::other("no IPv6 UDP 4500 socket"))?;
            let dst = SocketAddrV6::new(v6(24), u16::from_be_bytes([hdr[40], hdr[41]]), 0, 0);
            (IpAddr::V6(v6(6)), SocketAddr::V6(dst), ike, fd)
        } else {
            let (Some(hdr), Some(ike)) = (msg.get(..IKE_HDR_LEN), msg.get(IKE_HDR_LEN..)) else {
                return Err(short());
            };
            let dst = SocketAddrV4::new(
                Ipv4Addr::new(hdr[6], hdr[7], hdr[8], hdr[9]),
                u16::from_be_bytes([hdr[10], hdr[11]]),
            );
            let src = Ipv4Addr::new(hdr[0], hdr[1], hdr[2], hdr[3]);
            (
                IpAddr::V4(src),
                SocketAddr::V4(dst),
                ike,
                self.lanes
                    .first()
                    .map(|l| l.udp.as_raw_fd())
                    .ok_or_else(|| io::Error::other("no UDP 4500 socket"))?,
            )
        };
        let len = esp_proto::udp::write_ike_payload(ike, out)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let (mut sa, sa_len) = any_sockaddr(dst);
        let mut iov = libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: len.min(out.len()),
        };
        let mut cbuf: Cmsgs = [0; CMSG_WORDS];
        // SAFETY: plain old data; all-zero is valid.
        let mut h: libc::msghdr = unsafe { zeroed() };
        h.msg_name = (&mut sa as *mut AnyAddr).cast();
        h.msg_namelen = sa_len;
        h.msg_iov = &mut iov;
        h.msg_iovlen = 1;
        set_cmsgs(&mut h, &mut cbuf, src, None);
        // SAFETY: h points at live iov (within out), sa and cbuf for the call.
        let r = unsafe { libc::sendmsg(fd, &h, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }
}

/// Receive buffers of one worker, for `recvmmsg`.
pub struct RecvBatch {
    bufs: Box<[u8]>,
    slot: usize,
    addrs: [AnyAddr; BATCH],
    iov: [libc::iovec; BATCH],
    hdrs: [libc::mmsghdr; BATCH],
    /// Control messages (UDP GRO segment size), one per datagram (u64 for alignment).
    cmsgs: [Cmsgs; BATCH],
}

/// Control-message room of one datagram: IPV6_PKTINFO (40 bytes) and UDP_SEGMENT (24)
/// at most, in u64 words for alignment.
const CMSG_WORDS: usize = 10;
type Cmsgs = [u64; CMSG_WORDS];

/// `UDP_GRO` (linux/udp.h): receive runs of same-size datagrams as one buffer, with the
/// segment size in a control message.
pub const UDP_GRO: libc::c_int = 104;

impl RecvBatch {
    /// Buffers of `slot` bytes per datagram: [`SLOT`], or 64 KiB for a UDP GRO socket.
    pub fn new(slot: usize) -> RecvBatch {
        RecvBatch {
            bufs: vec![0u8; slot * BATCH].into_boxed_slice(),
            slot,
            // SAFETY: plain old data; all-zero is valid (pointers are set before each call).
            addrs: unsafe { zeroed() },
            iov: unsafe { zeroed() },
            hdrs: unsafe { zeroed() },
            cmsgs: [[0; CMSG_WORDS]; BATCH],
        }
    }

    /// Receives up to [`BATCH`] datagrams without blocking; returns how many (0: none).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let slot = self.slot;
        for (i, chunk) in self.bufs.chunks_exact_mut(slot).enumerate().take(BATCH) {
            // Indexing: all arrays have BATCH entries.
            self.iov[i] = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: slot,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut AnyAddr).cast();
            h.msg_namelen = size_of::<AnyAddr>() as libc::socklen_t;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
            h.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            h.msg_controllen = size_of::<Cmsgs>() as _;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at live buffers of this struct for the duration of the
        // call; BATCH headers are valid.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        Ok(n as usize)
    }

    /// Datagram `i` of the last `recv`: (bytes, source, truncated, GRO segment size). With
    /// a segment size the bytes are several datagrams of that size (the last may be shorter).
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr, bool, Option<usize>)> {
        let h = self.hdrs.get(i)?;
        let len = (h.msg_len as usize).min(self.slot);
        let data = self.bufs.get(i * self.slot..i * self.slot + len)?;
        let trunc = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let mut gso = None;
        if h.msg_hdr.msg_controllen > 0 {
            // SAFETY: the kernel filled msg_control (our cmsgs[i]) up to msg_controllen;
            // CMSG_FIRSTHDR/NXTHDR stay within it and return null at its end.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                        let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u16>());
                        gso = Some(usize::from(v)).filter(|v| *v > 0);
                    }
                    c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
                }
            }
        }
        Some((data, from_any(self.addrs.get(i)?)?, trunc, gso))
    }

    /// The local address datagram `i` of the last `recv` was sent to (its IP_PKTINFO
    /// `ipi_spec_dst`, or IPV6_PKTINFO `ipi6_addr`), when the socket reports it.
    pub fn local_addr(&self, i: usize) -> Option<IpAddr> {
        let h = self.hdrs.get(i)?;
        if h.msg_hdr.msg_controllen == 0 {
            return None;
        }
        let mut found = None;
        // SAFETY: as in `get`: CMSG_FIRSTHDR/NXTHDR stay within the kernel-filled buffer.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
            while !c.is_null() {
                if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_PKTINFO {
                    let p = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>());
                    found = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        p.ipi_spec_dst.s_addr,
                    ))));
                }
                if (*c).cmsg_level == libc::IPPROTO_IPV6 && (*c).cmsg_type == libc::IPV6_PKTINFO {
                    let p =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>());
                    found = Some(IpAddr::V6(Ipv6Addr::from(p.ipi6_addr.s6_addr)));
                }
                c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
            }
        }
        found.filter(|a| !a.is_unspecified())
    }
}

/// Fills `buf` with the control messages of one send: IP_PKTINFO with `src` as
/// `ipi_spec_dst` (IPV6_PKTINFO with `src` as `ipi6_addr` for IPv6) unless it is
/// unspecified, and UDP_SEGMENT `seg`; points `h` at them (or at nothing when there are
/// none).
fn set_cmsgs(h: &mut libc::msghdr, buf: &mut Cmsgs, src: IpAddr, seg: Option<u16>) {
    *buf = [0; CMSG_WORDS];
    h.msg_control = buf.as_mut_ptr().cast();
    let pk = haven_daemon::pktinfo::space(src);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let sg = unsafe { libc::CMSG_SPACE(2) as usize };
    let want_pk = !src.is_unspecified();
    let total = (if want_pk { pk } else { 0 }) + (if seg.is_some() { sg } else { 0 });
    if total == 0 {
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        return;
    }
    // 40 + 24 = 64 bytes at most, within buf's 80.
    h.msg_controllen = total as _;
    // SAFETY: msg_control points at 80 zeroed bytes and msg_controllen (<= 64) says how many
    // are in use; CMSG_FIRSTHDR/NXTHDR/DATA stay within them.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        if want_pk && !c.is_null() {
            haven_daemon::pktinfo::write(c, src);
            c = libc::CMSG_NXTHDR(h, c);
        }
        if let (Some(seg), false) = (seg, c.is_null()) {
            (*c).cmsg_level = SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
        }
    }
}

/// Outgoing ESP packets of one worker, sent with one `sendmmsg` per socket.
pub struct SendBatch {
    bufs: Box<[[u8; SLOT]]>,
    lens: [usize; BATCH],
    addrs: [AnyAddr; BATCH],
    addr_lens: [libc::socklen_t; BATCH],
    /// Destination of each packet (as in `addrs`, for comparisons).
    dsts: [SocketAddr; BATCH],
    /// Source address of each packet (unspecified: the kernel picks).
    srcs: [IpAddr; BATCH],
    iov: [libc::iovec; BATCH],
    hdrs: [libc::mmsghdr; BATCH],
    n: usize,
    /// Control messages (IP_PKTINFO, UDP GSO), one set per message (u64 for alignment).
    cmsgs: [Cmsgs; BATCH],
    /// UDP GSO (UDP_SEGMENT) still believed to work on this socket.
    gso: bool,
}

/// `SOL_UDP` / `UDP_SEGMENT` (linux/udp.h): send one buffer as several datagrams of this size.
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
/// The kernel takes at most this many segments per UDP GSO send (UDP_MAX_SEGMENTS).
const UDP_MAX_SEGMENTS: usize = 64;

impl SendBatch {
    pub fn new() -> SendBatch {
        SendBatch {
            bufs: vec![[0u8; SLOT]; BATCH].into_boxed_slice(),
            lens: [0; BATCH],
            // SAFETY: plain old data; all-zero is valid (pointers are set before each call).
            addrs: unsafe { zeroed() },
            iov: unsafe { zeroed() },
            hdrs: unsafe { zeroed() },
            addr_lens: [0; BATCH],
            dsts: [SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); BATCH],
            srcs: [IpAddr::V4(Ipv4Addr::UNSPECIFIED); BATCH],
            n: 0,
            cmsgs: [[0; CMSG_WORDS]; BATCH],
            gso: true,
        }
    }

    /// Sends everything queued on the UDP socket `fd`, joining runs of datagrams to one
    /// destination whose sizes are equal (the last may be shorter) into one UDP GSO send
    /// (`UDP_SEGMENT`): the kernel then carries the run as one buffer as far as it can.
    /// Falls back to [`SendBatch::flush`] for good when the kernel refuses GSO. Returns how
    /// many datagrams the kernel refused.
    pub fn flush_udp_gso(&mut self, fd: RawFd) -> usize {
        if !self.gso || self.n < 2 {
            return self.flush(fd);
        }
        let total = self.n;
        for i in 0..total {
            // Indexing: total <= BATCH.
            self.iov[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            };
        }
        let mut m = 0;
        let mut runs = [0usize; BATCH];
        let mut i = 0;
        while i < total {
            let seg = self.lens[i];
            let mut j = i + 1;
            let mut bytes = seg;
            while j < total
                && j - i < UDP_MAX_SEGMENTS
                && self.dsts[j] == self.dsts[i]
                && self.srcs[j] == self.srcs[i]
                && self.lens[j - 1] == seg
                && self.lens[j] <= seg
                && bytes + self.lens[j] <= 65_000
            {
                bytes += self.lens[j];
                j += 1;
            }
            let h = &mut self.hdrs[m].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut AnyAddr).cast();
            h.msg_namelen = self.addr_lens[i];
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = j - i;
            h.msg_flags = 0;
            let gso = (j - i > 1).then_some(seg as u16);
            set_cmsgs(h, &mut self.cmsgs[m], self.srcs[i], gso);
            runs[m] = j - i;
            m += 1;
            i = j;
        }
        let mut sent = 0;
        let mut failed = 0;
        while sent < m {
            // SAFETY: headers sent..m point at live iovecs, addresses and control buffers of
            // this struct.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs.as_mut_ptr().add(sent),
                    (m - sent) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if r < 0 && e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if sent == 0
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::EIO | libc::EOPNOTSUPP)
                    )
                {
                    // Either no UDP GSO here, or a source address that is not (or no
                    // longer) local (EINVAL too). Send one by one; if that works for all,
                    // it was GSO: keep sending one datagram per message from now on.
                    let failed = self.flush(fd);
                    if failed == 0 {
                        tracing::warn!("UDP GSO refused ({e}); sending datagrams one by one");
                        self.gso = false;
                    }
                    return failed;
                }
                failed += runs[sent];
                sent += 1;
                continue;
            }
            sent += r as usize;
        }
        self.n = 0;
        failed
    }

    pub fn is_full(&self) -> bool {
        self.n >= BATCH
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The next free slot's buffer (None when full).
    pub fn slot(&mut self) -> Option<&mut [u8]> {
        self.bufs.get_mut(self.n).map(|b| &mut b[..])
    }

    /// Commits the slot filled through [`SendBatch::slot`] with `len` bytes for `dst`, to be
    /// sent from local address `src` (unspecified: the kernel picks).
    pub fn commit(&mut self, len: usize, src: IpAddr, dst: SocketAddr) {
        if self.n < BATCH {
            let (a, l) = any_sockaddr(dst);
            self.lens[self.n] = len.min(SLOT);
            self.srcs[self.n] = src;
            self.addrs[self.n] = a;
            self.addr_lens[self.n] = l;
            self.dsts[self.n] = dst;
            self.n += 1;
        }
    }

    /// Sends everything queued on `fd`; returns how many the kernel refused.
    pub fn flush(&mut self, fd: RawFd) -> usize {
        let total = self.n;
        for i in 0..total {
            // Indexing: total <= BATCH.
            self.iov[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut AnyAddr).cast();
            h.msg_namelen = self.addr_lens[i];
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
            h.msg_flags = 0;
            set_cmsgs(h, &mut self.cmsgs[i], self.srcs[i], None);
        }
        let mut sent = 0;
        let mut failed = 0;
        while sent < total {
            // SAFETY: headers sent..total point at live buffers of this struct.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs.as_mut_ptr().add(sent),
                    (total - sent) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if r < 0 && e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first packet of the rest failed (queue full, no route, too big): drop
                // it and carry on with the others.
                failed += 1;
                sent += 1;
                continue;
            }
            sent += r as usize;
        }
        self.n = 0;
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program over `pkt` with the instructions the filters here use
    /// (as the kernel does: a load past the end ends the program with 0).
    fn run(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
        use libc::*;
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let word = |at: u32| -> Option<u32> {
            let at = at as usize;
            pkt.get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        while let Some(i) = prog.get(pc) {
            let code = u32::from(i.code);
            pc += 1;
            match code {
                c if c == BPF_LD | BPF_W | BPF_ABS => match word(i.k) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c == BPF_LD | BPF_W | BPF_IND => match word(x.wrapping_add(i.k)) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c == BPF_LD | BPF_W | BPF_LEN => a = pkt.len() as u32,
                c if c == BPF_LDX | BPF_B | BPF_MSH => match pkt.get(i.k as usize) {
                    Some(b) => x = u32::from(b & 0x0f) * 4,
                    None => return 0,
                },
                c if c == BPF_MISC | BPF_TXA => a = x,
                c if c == BPF_MISC | BPF_TAX => x = a,
                c if c == BPF_ALU | BPF_ADD | BPF_K => a = a.wrapping_add(i.k),
                c if c == BPF_ALU | BPF_MOD | BPF_K => a %= i.k,
                c if c & 0x07 == BPF_JMP => {
                    let v = if code & BPF_X != 0 { x } else { i.k };
                    let hit = match code & 0xf0 {
                        c if c == BPF_JEQ => a == v,
                        c if c == BPF_JGE => a >= v,
                        other => panic!("jump {other:#x}"),
                    };
                    pc += usize::from(if hit { i.jt } else { i.jf });
                }
                c if c == BPF_RET | BPF_K => return i.k,
                c if c == BPF_RET | BPF_A => return a,
                other => panic!("instruction {other:#x}"),
            }
        }
        panic!("ran off the end");
    }

    fn ipv4_esp(ihl_words: u8, spi: u32) -> Vec<u8> {
        let mut p = vec![0u8; usize::from(ihl_words) * 4];
        p[0] = 0x40 | ihl_words;
        p.extend_from_slice(&spi.to_be_bytes());
        p.extend_from_slice(&[0u8; 24]);
        p
    }

    #[test]
    fn each_spi_reaches_exactly_one_lane() {
        for lanes in 2..=5usize {
            for spi in [
                0x100u32,
                0x1001,
                0x2001,
                0xdead_beef,
                0xffff_ffff,
                7,
                0xc0ff_ee00,
            ] {
                let want = (spi as usize) % lanes;
                for ihl in [5u8, 6, 15] {
                    let pkt = ipv4_esp(ihl, spi);
                    let keep: Vec<usize> = (0..lanes)
                        .filter(|l| run(&spi_filter(true, lanes, *l), &pkt) != 0)
                        .collect();
                    assert_eq!(
                        keep,
                        vec![want],
                        "IPv4, ihl {ihl}, {lanes} lanes, SPI {spi:#x}"
                    );
                }
                let mut esp = spi.to_be_bytes().to_vec();
                esp.extend_from_slice(&[0u8; 24]);
                let keep: Vec<usize> = (0..lanes)
                    .filter(|l| run(&spi_filter(false, lanes, *l), &esp) != 0)
                    .collect();
                assert_eq!(keep, vec![want], "IPv6, {lanes} lanes, SPI {spi:#x}");
                assert_eq!(run(&spi_steering(lanes), &esp) as usize, want, "UDP");
            }
        }
    }

    #[test]
    fn packets_too_short_for_an_spi_go_to_lane_zero() {
        let lanes = 3;
        // IPv4 header and 3 bytes of ESP; an IHL past the end; nothing after the header.
        let mut short = ipv4_esp(5, 0x1234_5678);
        short.truncate(23);
        let mut long_ihl = ipv4_esp(5, 0x1234_5678);
        long_ihl[0] = 0x4f;
        long_ihl.truncate(40);
        for pkt in [&short[..], &long_ihl[..], &ipv4_esp(5, 1)[..20]] {
            let keep: Vec<usize> = (0..lanes)
                .filter(|l| run(&spi_filter(true, lanes, *l), pkt) != 0)
                .collect();
            assert_eq!(keep, vec![0], "{pkt:02x?}");
        }
        for pkt in [&[][..], &[1u8, 2, 3][..]] {
            let keep: Vec<usize> = (0..lanes)
                .filter(|l| run(&spi_filter(false, lanes, *l), pkt) != 0)
                .collect();
            assert_eq!(keep, vec![0], "{pkt:02x?}");
            // A NAT keepalive (one 0xff byte) or an empty datagram.
            assert_eq!(run(&spi_steering(lanes), pkt), 0);
        }
        // IKE behind the non-ESP marker.
        assert_eq!(run(&spi_steering(lanes), &[0, 0, 0, 0, 0x21, 0x20]), 0);
    }

    #[test]
    fn a_second_group_on_a_taken_port_fails() {
        // A free loopback port: bind to port 0, read it back, let it go.
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = probe.local_addr().unwrap();
        drop(probe);
        let first = udp_group(at, 2).expect("first group");
        assert_eq!(first.len(), 2);
        let err = udp_group(at, 2).expect_err("a second group joined the first");
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE), "{err}");
        drop(first);
        assert_eq!(udp_group(at, 3).expect("free again").len(), 3);
    }

    #[test]
    fn the_kernel_takes_the_programs() {
        // Raw sockets need CAP_NET_RAW; without it there is nothing to check here.
        let Ok(fd) = raw_esp(libc::AF_INET) else {
            return;
        };
        attach_bpf(
            fd.as_raw_fd(),
            libc::SO_ATTACH_FILTER,
            &mut spi_filter(true, 3, 2),
        )
        .expect("IPv4 filter");
        let udp = new_socket(libc::AF_INET, libc::SOCK_DGRAM, 0).unwrap();
        set_int_opt(udp.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1).unwrap();
        attach_bpf(
            udp.as_raw_fd(),
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &mut spi_steering(3),
        )
        .expect("reuseport program");
        if let Ok(fd6) = raw_esp(libc::AF_INET6) {
            attach_bpf(
                fd6.as_raw_fd(),
                libc::SO_ATTACH_FILTER,
                &mut spi_filter(false, 3, 0),
            )
            .expect("IPv6 filter");
        }
    }
}
