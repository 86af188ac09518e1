//! The IO layer of the IKE manager (DESIGN.md §4): threads that own UDP 500 and the unix
//! datagram sockets shared with espd, feed datagrams and timeouts to the sans-IO
//! [`IkeManager`] and carry its transmits and route changes out.
//!
//! Sockets: `0.0.0.0:500` and `[::]:500` (IPv6 only; IKE without NAT-T over IPv6 for
//! `ip-version 6` phase1s, the kernel picking the source address); `<run-dir>/ike4500.sock`, bound here, where
//! espd hands over IKE messages that arrived on UDP/4500; `<run-dir>/espd-ike.sock`, espd's,
//! where IKE messages to send out of 4500 go. Both unix sockets carry one IKE message per
//! datagram behind a 12-octet header: source IPv4, source port, destination IPv4,
//! destination port, all in network byte order (espd's `datapath::sockets`); over IPv6 a
//! 42-octet header: `ff ff ff ff 00 00` (a source of 255.255.255.255, never an IKE peer,
//! marks this form), source IPv6, source port, destination IPv6, destination port. Towards ikemgr
//! the destination is the local address the peer sent to (0.0.0.0 if espd does not know it);
//! towards espd the source is the address to send from.
//!
//! Replies leave from the address the request was sent to: UDP 500 reads it with
//! IP_PKTINFO and sends every message with IP_PKTINFO naming the IKE SA's local address,
//! so a gateway on a loopback or shared cluster address is answered from that address.
//!
//! Routes are changed with `ip route replace|del DEST dev DEV` through
//! `std::process::Command` (a stop-gap until a netlink client exists); a route whose TUN
//! device espd has not created yet is retried for a while.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::ike::{IkeManager, RouteOp};

/// Hand-off header: src IPv4 (4), src port (2), dst IPv4 (4), dst port (2).
const HANDOFF_HDR_LEN: usize = 12;
/// IPv6 hand-off header: marker (6), src IPv6 (16), src port (2), dst IPv6 (16), dst port (2).
const HANDOFF6_HDR_LEN: usize = 42;
/// First octets of an IPv6 hand-off header.
const HANDOFF6_MARK: [u8; 6] = [0xff, 0xff, 0xff, 0xff, 0, 0];
/// Largest IKE datagram accepted.
const MAX_DATAGRAM: usize = 65535;
/// How long a route whose device is missing is retried.
const ROUTE_RETRY_FOR: Duration = Duration::from_secs(30);
/// How often a route whose device is missing is retried.
const ROUTE_RETRY_EVERY: Duration = Duration::from_millis(20);

/// How long a send to espd's `espd-ike.sock` waits for room in its queue.
const HANDOFF_SEND_WAIT: Duration = Duration::from_millis(500);

/// Inputs of the IO loop.
pub enum Input {
    /// An IKE datagram (no non-ESP marker).
    Datagram {
        /// Local port it arrived on (500 or 4500).
        port: u16,
        /// The peer.
        from: SocketAddr,
        /// The local address it was sent to, when known.
        to: Option<IpAddr>,
        /// IKE message.
        data: Vec<u8>,
    },
    /// The logic changed the manager: flush its transmits and re-arm timers.
    Wake,
}

/// Locks the manager; a poisoned lock (a panic elsewhere) still holds consistent data for
/// our purposes, so it is used as is.
pub fn lock(m: &Mutex<IkeManager>) -> MutexGuard<'_, IkeManager> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn ipv6_at(d: &[u8], at: usize) -> Option<Ipv6Addr> {
    let b: [u8; 16] = d.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(b))
}

fn port_at(d: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*d.get(at)?, *d.get(at + 1)?]))
}

/// Parses a hand-off datagram (either form) into (source, IKE message).
pub fn parse_handoff(d: &[u8]) -> Option<(SocketAddr, &[u8])> {
    if d.starts_with(&HANDOFF6_MARK) {
        let src = SocketAddr::new(ipv6_at(d, 6)?.into(), port_at(d, 22)?);
        return Some((src, d.get(HANDOFF6_HDR_LEN..)?));
    }
    let h = d.get(..HANDOFF_HDR_LEN)?;
    let ip = Ipv4Addr::new(*h.first()?, *h.get(1)?, *h.get(2)?, *h.get(3)?);
    let port = u16::from_be_bytes([*h.get(4)?, *h.get(5)?]);
    Some((
        SocketAddr::V4(SocketAddrV4::new(ip, port)),
        d.get(HANDOFF_HDR_LEN..)?,
    ))
}

/// The destination address of a hand-off datagram (None: unknown, unspecified, or too
/// short).
pub fn handoff_dst(d: &[u8]) -> Option<IpAddr> {
    if d.starts_with(&HANDOFF6_MARK) {
        let ip = ipv6_at(d, 24)?;
        return (!ip.is_unspecified()).then_some(ip.into());
    }
    let h = d.get(6..10)?;
    let ip = Ipv4Addr::new(*h.first()?, *h.get(1)?, *h.get(2)?, *h.get(3)?);
    (!ip.is_unspecified()).then_some(ip.into())
}

/// `recvmsg` on an IPv4 UDP socket with IP_PKTINFO enabled: (length, peer, the local address
/// the datagram was sent to).
fn recv_with_dst(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<Ipv4Addr>)> {
    // SAFETY: plain old data; all-zero is valid.
    let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut cbuf = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: plain old data; all-zero is valid.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_name = (&mut from as *mut libc::sockaddr_in).cast();
    h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    h.msg_control = cbuf.as_mut_ptr().cast();
    h.msg_controllen = std::mem::size_of::<[u64; 8]>() as _;
    // SAFETY: h points at live from, iov (within buf) and cbuf for the call.
    let n = unsafe { libc::recvmsg(fd, &mut h, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut to = None;
    // SAFETY: the kernel filled cbuf up to msg_controllen; CMSG_FIRSTHDR/NXTHDR stay within
    // it and return null at its end.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_PKTINFO {
                let p = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>());
                to = Some(Ipv4Addr::from(u32::from_be(p.ipi_spec_dst.s_addr)));
            }
            c = libc::CMSG_NXTHDR(&h, c);
        }
    }
    let peer = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr)),
        u16::from_be(from.sin_port),
    );
    Ok((
        n as usize,
        SocketAddr::V4(peer),
        to.filter(|a| !a.is_unspecified()),
    ))
}

/// `sendmsg` from local address `src` (IP_PKTINFO `ipi_spec_dst`) to `dst`.
fn send_from(fd: RawFd, data: &[u8], src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<()> {
    let mut to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: dst.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*dst.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: plain old data; all-zero is valid.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_name = (&mut to as *mut libc::sockaddr_in).cast();
    h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    if !src.is_unspecified() {
        h.msg_control = cbuf.as_mut_ptr().cast();
        h.msg_controllen = haven_daemon::pktinfo::space(src.into()) as _;
        // SAFETY: cbuf has 64 bytes, more than the 32 an IPv4 PKTINFO takes; CMSG_FIRSTHDR
        // is non-null for a non-empty buffer and points at its start.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&h);
            if !c.is_null() {
                haven_daemon::pktinfo::write(c, src.into());
            }
        }
    }
    // SAFETY: h points at live to, iov (the iovec is only read by sendmsg) and cbuf.
    let r = unsafe { libc::sendmsg(fd, &h, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Builds an IPv6 hand-off datagram (`src` unspecified: espd's kernel picks).
pub fn build_handoff6(src: Ipv6Addr, dst: SocketAddrV6, ike: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HANDOFF6_HDR_LEN + ike.len());
    v.extend_from_slice(&HANDOFF6_MARK);
    v.extend_from_slice(&src.octets());
    v.extend_from_slice(&ike_proto::sa::NAT_T_PORT.to_be_bytes());
    v.extend_from_slice(&dst.ip().octets());
    v.extend_from_slice(&dst.port().to_be_bytes());
    v.extend_from_slice(ike);
    v
}

/// Builds a hand-off datagram.
pub fn build_handoff(src: SocketAddrV4, dst: SocketAddrV4, ike: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HANDOFF_HDR_LEN + ike.len());
    v.extend_from_slice(&src.ip().octets());
    v.extend_from_slice(&src.port().to_be_bytes());
    v.extend_from_slice(&dst.ip().octets());
    v.extend_from_slice(&dst.port().to_be_bytes());
    v.extend_from_slice(ike);
    v
}

/// The source address the kernel would use towards `remote` (a routing lookup through an
/// unconnected UDP socket; nothing is sent).
fn local_ip_for(remote: IpAddr) -> Option<IpAddr> {
    let s = UdpSocket::bind(if remote.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    })
    .ok()?;
    s.connect(SocketAddr::new(remote, 500)).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

struct Pending {
    op: RouteOp,
    until: Instant,
}

struct Loop {
    mgr: Arc<Mutex<IkeManager>>,
    udp500: UdpSocket,
    /// `[::]:500`, `None` on a host without IPv6.
    udp500_6: Option<UdpSocket>,
    out4500: UnixDatagram,
    espd_path: PathBuf,
    local_ips: HashMap<IpAddr, IpAddr>,
    routes: Vec<Pending>,
    /// Peers the last send to failed (warned once until a send works again).
    failing: std::collections::HashSet<IpAddr>,
}

/// `ikemgr_send_errors_total`'s reason for a failed send.
fn send_error_reason(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable => "unreachable",
        // EPERM: a netfilter rule refused the datagram.
        io::ErrorKind::PermissionDenied => "refused",
        _ => "other",
    }
}

impl Loop {
    fn local(&mut self, remote: IpAddr) -> IpAddr {
        if let Some(ip) = self.local_ips.get(&remote) {
            return *ip;
        }
        let Some(ip) = local_ip_for(remote) else {
            // No route towards it now: not remembered, the next lookup may find one.
            return IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        };
        self.local_ips.insert(remote, ip);
        ip
    }

    fn run(mut self, rx: Receiver<Input>) {
        loop {
            let wait = {
                let m = lock(&self.mgr);
                let now = Instant::now();
                let mut w = Duration::from_millis(500);
                if !self.routes.is_empty() {
                    // A route waiting for espd's TUN device (a tunnel taken over by HA
                    // brings its SAs and its route at once) is retried soon.
                    w = w.min(ROUTE_RETRY_EVERY);
                }
                if let Some(t) = m.poll_timeout() {
                    w = w.min(t.saturating_duration_since(now));
                }
                w
            };
            let first = match rx.recv_timeout(wait) {
                Ok(i) => Some(i),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut inputs: Vec<Input> = first.into_iter().collect();
            while let Ok(i) = rx.try_recv() {
                inputs.push(i);
            }
            let mut resolved = Vec::new();
            for i in &inputs {
                if let Input::Datagram { from, to, .. } = i {
                    // The address the peer sent to; else what the route towards it picks.
                    let ip = match to {
                        Some(a) => *a,
                        None => self.local(from.ip()),
                    };
                    resolved.push(ip);
                }
            }
            let (transmits, routes) = {
                let mut m = lock(&self.mgr);
                let now = Instant::now();
                let mut ips = resolved.into_iter();
                for i in inputs {
                    if let Input::Datagram {
                        port, from, data, ..
                    } = i
                    {
                        let ip = ips.next().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                        m.handle_datagram(now, SocketAddr::new(ip, port), from, &data);
                    }
                }
                m.handle_timeout(now);
                let pending = m.initiate_pending(now);
                drop(m);
                let starts: Vec<(String, IpAddr, IpAddr)> = pending
                    .into_iter()
                    .map(|(g, remote, local)| {
                        let local = local.unwrap_or_else(|| self.local(remote));
                        (g, local, remote)
                    })
                    .collect();
                let mut m = lock(&self.mgr);
                for (g, local, remote) in starts {
                    m.initiate(now, &g, local, remote);
                }
                let mut t = Vec::new();
                while let Some(x) = m.poll_transmit() {
                    t.push(x);
                }
                let mut r = Vec::new();
                while let Some(x) = m.poll_route() {
                    r.push(x);
                }
                (t, r)
            };
            for t in transmits {
                self.send(&t);
            }
            let now = Instant::now();
            for op in routes {
                self.routes.retain(|p| !same_route(&p.op, &op));
                self.routes.push(Pending {
                    op,
                    until: now + ROUTE_RETRY_FOR,
                });
            }
            self.apply_routes(now);
        }
    }

    fn send(&mut self, t: &ike_proto::Transmit) {
        let r = if t.source.port() == ike_proto::sa::NAT_T_PORT {
            match (t.source, t.destination) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => self
                    .out4500
                    .send_to(&build_handoff(s, d, &t.payload), &self.espd_path)
                    .map(|_| ()),
                (s, SocketAddr::V6(d)) => {
                    let src = match s.ip() {
                        IpAddr::V6(a) => a,
                        IpAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
                    };
                    self.out4500
                        .send_to(&build_handoff6(src, d, &t.payload), &self.espd_path)
                        .map(|_| ())
                }
                _ => Err(io::Error::other("IPv4 destination from an IPv6 source")),
            }
        } else {
            match (t.source, t.destination) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                    send_from(self.udp500.as_raw_fd(), &t.payload, *s.ip(), d)
                }
                (_, SocketAddr::V6(_)) => match &self.udp500_6 {
                    Some(u) => u.send_to(&t.payload, t.destination).map(|_| ()),
                    None => Err(io::Error::other("no IPv6 UDP 500 socket")),
                },
                _ => self.udp500.send_to(&t.payload, t.destination).map(|_| ()),
            }
        };
        let peer = t.destination.ip();
        match r {
            Err(e) => {
                let reason = send_error_reason(&e);
                // Once per peer until a send to it works again: a gateway without a route
                // back to its peers answers nothing, and says so.
                if self.failing.insert(peer) {
                    tracing::warn!(
                        "ike 0: cannot send to {} from {}: {e} (counted in ikemgr_send_errors_total)",
                        t.destination,
                        t.source
                    );
                } else {
                    tracing::debug!(
                        "ike 0: send {}->{} len={} failed: {e}",
                        t.source,
                        t.destination,
                        t.payload.len()
                    );
                }
                lock(&self.mgr).send_failed(Instant::now(), t, reason);
            }
            Ok(()) => {
                if self.failing.remove(&peer) {
                    tracing::info!("ike 0: sending to {peer} works again");
                }
                tracing::trace!(
                    "ike 0: sent IKE msg: {}->{}, len={}",
                    t.source,
                    t.destination,
                    t.payload.len()
                );
            }
        }
    }

    fn apply_routes(&mut self, now: Instant) {
        self.routes.retain(|p| {
            let (verb, dest, dev) = match &p.op {
                RouteOp::Add { dest, dev } => ("replace", dest, dev),
                RouteOp::Del { dest, dev } => ("del", dest, dev),
            };
            let ok = std::process::Command::new("ip")
                .args(["route", verb, dest, "dev", dev])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                tracing::debug!("ike 0: route {verb} {dest} dev {dev}");
            }
            // A delete of a route that is already gone is done too.
            !ok && verb == "replace" && now < p.until
        });
    }
}

fn same_route(a: &RouteOp, b: &RouteOp) -> bool {
    let key = |r: &RouteOp| match r {
        RouteOp::Add { dest, dev } | RouteOp::Del { dest, dev } => (dest.clone(), dev.clone()),
    };
    key(a) == key(b)
}

/// `[::]:500` with IPV6_V6ONLY (IPv4 stays on the `0.0.0.0:500` socket).
fn bind_udp500_v6() -> io::Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and has no other owner.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain old data; all-zero is valid ([::], port set below).
    let mut a: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    a.sin6_port = 500u16.to_be();
    // SAFETY: bind with a live sockaddr_in6 and its size.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&a as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Opens the sockets and starts the threads. Returns the sender that wakes the loop.
pub fn start(run_dir: &Path, mgr: Arc<Mutex<IkeManager>>) -> io::Result<Sender<Input>> {
    let udp500 = UdpSocket::bind("0.0.0.0:500")
        .map_err(|e| io::Error::new(e.kind(), format!("UDP 0.0.0.0:500: {e}")))?;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            udp500.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let in_path = run_dir.join("ike4500.sock");
    let _ = std::fs::remove_file(&in_path);
    let in4500 = UnixDatagram::bind(&in_path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", in_path.display())))?;
    let out4500 = UnixDatagram::unbound()?;
    // espd's relay thread empties its socket at once; a stopped espd (a debugger attached)
    // must not stop the IKE loop with it: the message is then counted as a send error.
    out4500.set_write_timeout(Some(HANDOFF_SEND_WAIT))?;
    let (tx, rx) = mpsc::channel();

    let r500 = udp500.try_clone()?;
    let tx500 = tx.clone();
    std::thread::Builder::new()
        .name("ikemgr-udp500".into())
        .spawn(move || {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                match recv_with_dst(r500.as_raw_fd(), &mut buf) {
                    Ok((n, from, to)) => {
                        let data = buf.get(..n).unwrap_or(&[]).to_vec();
                        if tx500
                            .send(Input::Datagram {
                                port: 500,
                                from,
                                to: to.map(IpAddr::V4),
                                data,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!("ike 0: UDP 500 receive: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })?;
    let udp500_6 = match bind_udp500_v6() {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::warn!("ike 0: no IKE over IPv6: UDP [::]:500: {e}");
            None
        }
    };
    if let Some(r6) = udp500_6.as_ref().map(|u| u.try_clone()).transpose()? {
        let tx6 = tx.clone();
        std::thread::Builder::new()
            .name("ikemgr-udp500-v6".into())
            .spawn(move || {
                let mut buf = vec![0u8; MAX_DATAGRAM];
                loop {
                    match r6.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            let data = buf.get(..n).unwrap_or(&[]).to_vec();
                            let input = Input::Datagram {
                                port: 500,
                                from,
                                to: None,
                                data,
                            };
                            if tx6.send(input).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::debug!("ike 0: UDP [::]:500 receive: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })?;
    }
    let tx4500 = tx.clone();
    std::thread::Builder::new()
        .name("ikemgr-ike4500".into())
        .spawn(move || {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                match in4500.recv(&mut buf) {
                    Ok(n) => {
                        let d = buf.get(..n).unwrap_or(&[]);
                        let Some((from, ike)) = parse_handoff(d) else {
                            continue;
                        };
                        let input = Input::Datagram {
                            port: ike_proto::sa::NAT_T_PORT,
                            from,
                            to: handoff_dst(d),
                            data: ike.to_vec(),
                        };
                        if tx4500.send(input).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!("ike 0: {} receive: {e}", "ike4500.sock");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })?;
    let lp = Loop {
        mgr,
        udp500,
        udp500_6,
        out4500,
        espd_path: run_dir.join("espd-ike.sock"),
        local_ips: HashMap::new(),
        routes: Vec::new(),
        failing: Default::default(),
    };
    std::thread::Builder::new()
        .name("ikemgr-ike".into())
        .spawn(move || lp.run(rx))?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoff_round_trips_and_short_input_is_refused() {
        let s: SocketAddrV4 = "192.0.2.1:4500".parse().unwrap();
        let d: SocketAddrV4 = "198.51.100.7:61000".parse().unwrap();
        let b = build_handoff(s, d, b"ike");
        assert_eq!(b.len(), 15);
        assert_eq!(&b[6..10], &[198, 51, 100, 7]);
        let (src, ike) = parse_handoff(&b).unwrap();
        assert_eq!((src, ike), (SocketAddr::V4(s), &b"ike"[..]));
        assert!(parse_handoff(&b[..11]).is_none());
        assert_eq!(handoff_dst(&b), Some(IpAddr::V4(*d.ip())));
        assert_eq!(
            handoff_dst(&build_handoff(d, "0.0.0.0:4500".parse().unwrap(), b"")),
            None
        );
    }

    #[test]
    fn ipv6_handoff_round_trips_and_short_input_is_refused() {
        let local: Ipv6Addr = "fd00:31::2".parse().unwrap();
        let peer: SocketAddrV6 = "[fd00:31::1]:4500".parse().unwrap();
        let b = build_handoff6(local, peer, b"ike");
        assert_eq!(b.len(), HANDOFF6_HDR_LEN + 3);
        // espd's form towards ikemgr has the peer first: parse it as espd writes it.
        let mut from_espd = HANDOFF6_MARK.to_vec();
        from_espd.extend_from_slice(&peer.ip().octets());
        from_espd.extend_from_slice(&peer.port().to_be_bytes());
        from_espd.extend_from_slice(&local.octets());
        from_espd.extend_from_slice(&4500u16.to_be_bytes());
        from_espd.extend_from_slice(b"ike");
        let (src, ike) = parse_handoff(&from_espd).unwrap();
        assert_eq!((src, ike), (SocketAddr::V6(peer), &b"ike"[..]));
        assert_eq!(handoff_dst(&from_espd), Some(IpAddr::V6(local)));
        assert!(parse_handoff(&from_espd[..41]).is_none());
        assert_eq!(handoff_dst(&from_espd[..30]), None);
        assert_eq!(
            handoff_dst(&build_handoff6(local, "[::]:4500".parse().unwrap(), b"")),
            None
        );
    }
}
