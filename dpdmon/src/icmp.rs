//! The tunnel monitors' sockets: one thread, one raw ICMP socket per monitored tunnel,
//! bound to the tunnel's TUN device (`SO_BINDTODEVICE`) and to the monitor's source
//! address. The kernel hands an echo request sent on it to the TUN device whatever the
//! routing table says (so probes keep crossing the tunnel while ikemgr has withdrawn its
//! routes), espd encrypts it like any packet of the tunnel, and the decrypted reply that
//! espd writes back into the TUN device is delivered to this socket (a raw socket bound to
//! a device sees only what arrives on it).
//!
//! Echo request and reply: RFC 792 (type 8 / type 0, code 0, identifier, sequence number),
//! checksum RFC 1071.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::time::Duration;

use crate::monitor::Io;

/// ICMP echo reply type (RFC 792).
const ECHO_REPLY: u8 = 0;
/// ICMP echo request type (RFC 792).
const ECHO_REQUEST: u8 = 8;
/// IP protocol number of ICMP (RFC 792 / IANA).
const PROTO_ICMP: u8 = 1;
/// Probe payload: a fixed marker so a capture shows what the packets are.
const PAYLOAD: &[u8; 16] = b"haven-tunnel-mon";
/// How long the thread waits for a reply before it looks at its commands again.
const POLL: Duration = Duration::from_millis(50);

/// What the thread reports.
#[derive(Debug)]
pub enum Event {
    /// An echo reply for `tunnel` arrived at `at_ms` (wall clock).
    Reply {
        tunnel: String,
        ident: u16,
        seq: u16,
        at_ms: u64,
    },
    /// Opening or sending failed.
    Error { tunnel: String, error: String },
}

/// The thread's handles.
pub struct IcmpIo {
    tx: Sender<Io>,
    rx: Receiver<Event>,
}

impl IcmpIo {
    /// Starts the thread.
    pub fn start(now_ms: fn() -> u64) -> std::io::Result<IcmpIo> {
        let (tx, cmd_rx) = mpsc::channel();
        let (ev_tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("tunnel-monitor".into())
            .spawn(move || run(cmd_rx, ev_tx, now_ms))?;
        Ok(IcmpIo { tx, rx })
    }

    /// Passes one socket action to the thread.
    pub fn send(&self, io: Io) {
        let _ = self.tx.send(io);
    }

    /// Events received so far.
    pub fn drain(&self) -> Vec<Event> {
        self.rx.try_iter().collect()
    }
}

struct Sock {
    fd: Option<OwnedFd>,
    device: String,
    source: Ipv4Addr,
    ident: u16,
    destination: Option<Ipv4Addr>,
}

fn run(cmds: Receiver<Io>, events: Sender<Event>, now_ms: fn() -> u64) {
    let mut socks: BTreeMap<String, Sock> = BTreeMap::new();
    loop {
        loop {
            match cmds.try_recv() {
                Ok(Io::Open {
                    tunnel,
                    device,
                    source,
                    ident,
                }) => {
                    let mut s = Sock {
                        fd: None,
                        device,
                        source,
                        ident,
                        destination: None,
                    };
                    // The TUN device may not exist yet: retried on every send.
                    s.fd = open(&s.device, s.source).ok();
                    socks.insert(tunnel, s);
                }
                Ok(Io::Close { tunnel }) => {
                    socks.remove(&tunnel);
                }
                Ok(Io::Send {
                    tunnel,
                    destination,
                    ident,
                    seq,
                }) => {
                    let Some(s) = socks.get_mut(&tunnel) else {
                        continue;
                    };
                    s.destination = Some(destination);
                    if s.fd.is_none() {
                        match open(&s.device, s.source) {
                            Ok(fd) => s.fd = Some(fd),
                            Err(e) => {
                                let _ = events.send(Event::Error {
                                    tunnel,
                                    error: format!(
                                        "cannot open an ICMP socket on {} from {}: {e}",
                                        s.device, s.source
                                    ),
                                });
                                continue;
                            }
                        }
                    }
                    if let Some(fd) = &s.fd {
                        if let Err(e) = send_echo(fd, destination, ident, seq) {
                            let _ = events.send(Event::Error {
                                tunnel,
                                error: format!("echo request to {destination} failed: {e}"),
                            });
                        }
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        wait_and_read(&socks, &events, now_ms);
    }
}

/// A raw ICMP socket bound to `device` and `source` (non-blocking).
fn open(device: &str, source: Ipv4Addr) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before it is owned.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let name = device.as_bytes();
    // SAFETY: the option value is the device name's bytes with their length.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            libc::socklen_t::try_from(name.len()).unwrap_or(0),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let sa = sockaddr(source);
    // SAFETY: `sa` is a valid sockaddr_in for the duration of the call.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// The echo request: type, code, checksum, identifier, sequence number, payload.
pub fn echo_request(ident: u16, seq: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + PAYLOAD.len());
    p.extend_from_slice(&[ECHO_REQUEST, 0, 0, 0]);
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(PAYLOAD);
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// RFC 1071 Internet checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo reply from `from` in a raw IPv4 packet: (source, identifier, sequence number).
/// Anything else (truncated, other protocol or type, bad checksum) is `None`.
pub fn parse_reply(packet: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 || *packet.get(9)? != PROTO_ICMP {
        return None;
    }
    let src = Ipv4Addr::new(
        *packet.get(12)?,
        *packet.get(13)?,
        *packet.get(14)?,
        *packet.get(15)?,
    );
    let icmp = packet.get(ihl..)?;
    if icmp.len() < 8 || icmp.first() != Some(&ECHO_REPLY) || icmp.get(1) != Some(&0) {
        return None;
    }
    if checksum(icmp) != 0 {
        return None;
    }
    let ident = u16::from_be_bytes([*icmp.get(4)?, *icmp.get(5)?]);
    let seq = u16::from_be_bytes([*icmp.get(6)?, *icmp.get(7)?]);
    Some((src, ident, seq))
}

fn send_echo(fd: &OwnedFd, to: Ipv4Addr, ident: u16, seq: u16) -> std::io::Result<()> {
    let p = echo_request(ident, seq);
    let sa = sockaddr(to);
    // SAFETY: buffer and address are valid for the call.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            p.as_ptr().cast(),
            p.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to [`POLL`] for any socket to be readable and reports the echo replies.
fn wait_and_read(socks: &BTreeMap<String, Sock>, events: &Sender<Event>, now_ms: fn() -> u64) {
    let open: Vec<(&String, &Sock, i32)> = socks
        .iter()
        .filter_map(|(t, s)| s.fd.as_ref().map(|fd| (t, s, fd.as_raw_fd())))
        .collect();
    if open.is_empty() {
        std::thread::sleep(POLL);
        return;
    }
    let mut fds: Vec<libc::pollfd> = open
        .iter()
        .map(|(_, _, fd)| libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries.
    let n = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            POLL.as_millis() as i32,
        )
    };
    if n <= 0 {
        return;
    }
    let mut buf = [0u8; 2048];
    for (pfd, (tunnel, s, fd)) in fds.iter().zip(&open) {
        if pfd.revents & libc::POLLIN == 0 {
            continue;
        }
        loop {
            // SAFETY: `buf` is valid for `buf.len()` bytes.
            let r = unsafe { libc::recv(*fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(len) = usize::try_from(r) else {
                break;
            };
            let Some((src, ident, seq)) = buf.get(..len).and_then(parse_reply) else {
                continue;
            };
            if ident == s.ident && s.destination == Some(src) {
                let _ = events.send(Event::Reply {
                    tunnel: (*tunnel).clone(),
                    ident,
                    seq,
                    at_ms: now_ms(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksum_and_reply_parsing() {
        let req = echo_request(0x1234, 7);
        assert_eq!(checksum(&req), 0, "a packet with its checksum sums to zero");
        assert_eq!(&req[..2], &[8, 0]);
        // The reply the peer sends: type 0, same identifier, sequence and payload.
        let mut icmp = req.clone();
        icmp[0] = ECHO_REPLY;
        icmp[2] = 0;
        icmp[3] = 0;
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, PROTO_ICMP, 0, 0, 10, 2, 0, 1, 10, 1, 0, 1,
        ];
        ip.extend_from_slice(&icmp);
        assert_eq!(
            parse_reply(&ip),
            Some(("10.2.0.1".parse().unwrap(), 0x1234, 7))
        );
        // Truncated, corrupted, another type, another protocol: not a reply.
        for cut in 0..ip.len() - PAYLOAD.len() {
            assert_eq!(parse_reply(&ip[..cut]), None, "cut at {cut}");
        }
        let mut bad = ip.clone();
        bad[30] ^= 1;
        assert_eq!(parse_reply(&bad), None);
        let mut req_ip = ip.clone();
        req_ip[20] = ECHO_REQUEST;
        assert_eq!(parse_reply(&req_ip), None);
        let mut udp = ip.clone();
        udp[9] = 17;
        assert_eq!(parse_reply(&udp), None);
    }
}
