//! The HA link's IO layer: one UDP socket per link and a reader thread per socket.
//!
//! The reader thread only moves datagrams from the socket into a bounded queue; the
//! daemon's tick drains the queue and hands each datagram to ha-core's `HaLink::open`.
//! Sending happens from the tick itself (non-blocking `send_to` on the same socket).
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

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// UDP port of the FGCP heartbeat and sync link on the `hbdev` interface.
pub const FGCP_PORT: u16 = 703;

/// Datagrams waiting for the tick; beyond this the reader drops (counted as `queue_full`).
const QUEUE: usize = 4096;
/// Largest datagram read; ha-core caps messages at 64 KiB and counts the rest `oversized`,
/// so one byte more than the cap is enough to see that a datagram was too long.
const RECV_BUF: usize = ha_core::wire::MAX_MESSAGE_LEN + 1;
/// Kernel receive buffer of a link socket. A snapshot transfer keeps up to 16 chunks of
/// 32 KB in flight (each a train of IP fragments, about twice its size in kernel memory);
/// the default buffer (212 992 bytes) held fewer than four of them, so a window's tail and
/// the heartbeats behind it were dropped whenever the reader thread was descheduled.
const RECV_QUEUE_BYTES: usize = 4 << 20;
/// How often the reader checks whether it should stop.
const POLL: Duration = Duration::from_millis(100);

/// One bound UDP socket and its reader thread.
pub struct LinkSocket {
    sock: UdpSocket,
    rx: Receiver<(Vec<u8>, SocketAddr)>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    queue_full: Arc<std::sync::atomic::AtomicU64>,
}

impl LinkSocket {
    /// Binds `0.0.0.0:port`, optionally to `device` (`SO_BINDTODEVICE`), with broadcast
    /// allowed, and starts the reader thread.
    pub fn bind(port: u16, device: Option<&str>) -> io::Result<LinkSocket> {
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
        let (tx, rx) = sync_channel(QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let queue_full = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reader = {
            let stop = stop.clone();
            let queue_full = queue_full.clone();
            std::thread::Builder::new()
                .name(format!("ha-link-{port}"))
                .spawn(move || read_loop(reader_sock, tx, stop, queue_full))?
        };
        Ok(LinkSocket {
            sock,
            rx,
            stop,
            reader: Some(reader),
            queue_full,
        })
    }

    /// Datagrams received since the last call.
    pub fn drain(&self) -> Vec<(Vec<u8>, SocketAddr)> {
        self.rx.try_iter().collect()
    }

    /// Datagrams the reader dropped because the queue was full, since the last call.
    pub fn take_queue_full(&self) -> u64 {
        self.queue_full.swap(0, Ordering::Relaxed)
    }

    /// Sends one datagram; errors are returned for the caller to count.
    pub fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        self.sock.send_to(datagram, to).map(|_| ())
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

fn read_loop(
    sock: UdpSocket,
    tx: SyncSender<(Vec<u8>, SocketAddr)>,
    stop: Arc<AtomicBool>,
    queue_full: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut buf = vec![0u8; RECV_BUF];
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let data = buf.get(..n).unwrap_or(&buf[..]).to_vec();
                match tx.try_send((data, from)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        queue_full.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySendError::Disconnected(_)) => return,
                }
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
