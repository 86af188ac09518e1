//! TUN devices (`/dev/net/tun`, IFF_TUN | IFF_NO_PI): one per phase1-interface, named after
//! it. Devices are made persistent so that a `kill -9` of espd does not take the device and
//! the routes ikemgr (or the operator) put on it away: a restarted espd re-attaches to the
//! same device by name. A device is deleted once no SA and no tunnel of ikemgr uses it. Packets in both
//! directions carry a virtio-net header (IFF_VNET_HDR) so the kernel can hand over TSO
//! packets (see `offload`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `TUNSETIFF` = _IOW('T', 202, int) (linux/if_tun.h).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETPERSIST` = _IOW('T', 203, int) (linux/if_tun.h).
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
/// linux/if_tun.h flags.
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `TUNSETOFFLOAD` = _IOW('T', 208, unsigned int) and its flags (linux/if_tun.h).
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
const TUN_F_TSO_ECN: libc::c_ulong = 0x08;

/// `struct ifreq`: the name and a 24-byte union (flags, mtu...).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<IfReq> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= libc::IFNAMSIZ || b.contains(&0) || b.contains(&b'/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface name {name:?}"),
            ));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        // Length checked above.
        r.name[..b.len()].copy_from_slice(b);
        Ok(r)
    }
    fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }
    fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }
    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An open TUN device (non-blocking).
#[derive(Debug)]
pub struct TunDev {
    name: String,
    fd: OwnedFd,
    mtu: u32,
    /// Outbound packets that found no SA on this device (for `esp.acquire`).
    pub acquire: super::table::AcquireSlot,
}

impl TunDev {
    /// Creates (or re-attaches to) the persistent TUN device `name`, brings it up with `mtu`.
    pub fn open(name: &str, mtu: u32) -> io::Result<TunDev> {
        let mut req = IfReq::new(name)?;
        // SAFETY: a plain open(2) of a constant NUL-terminated path.
        let fd = cvt(unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: fd was just returned by open(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Every packet read or written starts with a virtio-net header (see `offload`).
        req.set_short(IFF_TUN | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) })?;
        // SAFETY: TUNSETPERSIST takes an int by value.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) })?;
        // Large TCP packets (TSO) and partial checksums: one read brings up to 64 KiB, cut
        // into segments by the worker. Without it the kernel hands us MTU-sized packets.
        // SAFETY: TUNSETOFFLOAD takes an unsigned int by value.
        let off = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                TUNSETOFFLOAD as _,
                TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
            )
        };
        if off < 0 {
            tracing::warn!("{name}: no TUN offloads: {}", io::Error::last_os_error());
        }
        let dev = TunDev {
            name: name.to_string(),
            acquire: Default::default(),
            fd,
            mtu,
        };
        dev.configure(mtu)?;
        Ok(dev)
    }

    fn configure(&self, mtu: u32) -> io::Result<()> {
        // SAFETY: socket(2) with constant arguments.
        let s =
            cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: s was just returned by socket(2).
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        let mut req = IfReq::new(&self.name)?;
        req.set_int(mtu.min(65_535) as libc::c_int);
        // SAFETY: SIOCSIFMTU reads a struct ifreq.
        cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFMTU as _, &mut req as *mut IfReq) })?;
        let mut req = IfReq::new(&self.name)?;
        // SAFETY: SIOCGIFFLAGS writes a struct ifreq.
        cvt(unsafe {
            libc::ioctl(
                s.as_raw_fd(),
                libc::SIOCGIFFLAGS as _,
                &mut req as *mut IfReq,
            )
        })?;
        let flags =
            req.short() | (libc::IFF_UP as libc::c_short) | (libc::IFF_RUNNING as libc::c_short);
        req.set_short(flags);
        // SAFETY: SIOCSIFFLAGS reads a struct ifreq.
        cvt(unsafe {
            libc::ioctl(
                s.as_raw_fd(),
                libc::SIOCSIFFLAGS as _,
                &mut req as *mut IfReq,
            )
        })?;
        Ok(())
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// MTU set at creation.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// The file descriptor (for epoll registration and lookups).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one packet; `Ok(None)` when none is waiting.
    #[inline]
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buf is valid for buf.len() writable bytes.
        let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one packet.
    #[inline]
    pub fn write(&self, pkt: &[u8]) -> io::Result<()> {
        // SAFETY: pkt is valid for pkt.len() readable bytes.
        let n = unsafe { libc::write(self.fd(), pkt.as_ptr().cast(), pkt.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Turns persistence off so the device disappears when this handle is dropped.
    pub fn unpersist(&self) {
        // SAFETY: TUNSETPERSIST takes an int by value.
        let r = unsafe { libc::ioctl(self.fd(), TUNSETPERSIST as _, 0 as libc::c_ulong) };
        if r < 0 {
            tracing::warn!(
                "{}: cannot clear persistence: {}",
                self.name,
                io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(IfReq::new("vpn1").is_ok());
        assert!(IfReq::new("").is_err());
        assert!(IfReq::new("a-name-far-too-long").is_err());
        assert!(IfReq::new("a/b").is_err());
    }
}
