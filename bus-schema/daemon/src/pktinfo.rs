//! The source-address control message of a UDP or raw send (`sendmsg`/`sendmmsg`), shared
//! by espd's datapath and ikemgr's IKE sockets: IP_PKTINFO with `ipi_spec_dst` (ip(7)) for
//! IPv4, IPV6_PKTINFO with `ipi6_addr` (RFC 3542 §6.1) for IPv6.

use std::mem::size_of;
use std::net::IpAddr;

/// Bytes one PKTINFO control message takes in a `msg_control` buffer for a source of
/// `src`'s family (`CMSG_SPACE`, padding included).
pub fn space(src: IpAddr) -> usize {
    let len = match src {
        IpAddr::V4(_) => size_of::<libc::in_pktinfo>(),
        IpAddr::V6(_) => size_of::<libc::in6_pktinfo>(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE(len as u32) as usize }
}

/// Writes the PKTINFO control message naming `src` as the source address at `c`.
///
/// # Safety
/// `c` must point at a control-message header inside a writable `msg_control` buffer
/// (from `CMSG_FIRSTHDR`/`CMSG_NXTHDR` of a `msghdr` whose `msg_controllen` covers it)
/// with at least [`space`]`(src)` bytes from `c` to the buffer's end.
pub unsafe fn write(c: *mut libc::cmsghdr, src: IpAddr) {
    // SAFETY: the caller guarantees `c` heads `space(src)` writable bytes; CMSG_DATA stays
    // within them and the unaligned writes make no alignment assumption.
    unsafe {
        match src {
            IpAddr::V4(src) => {
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
                let p = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(src).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>(), p);
            }
            IpAddr::V6(src) => {
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as _;
                let p = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: src.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>(), p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message reads back as the kernel would parse it: level, type, length and the
    /// address in network order.
    #[test]
    fn writes_ip_and_ipv6_pktinfo() {
        for src in ["192.0.2.7", "2001:db8::7"] {
            let src: IpAddr = src.parse().unwrap();
            let mut buf = [0u64; 8];
            // SAFETY: plain old data; all-zero is valid.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_control = buf.as_mut_ptr().cast();
            h.msg_controllen = space(src) as _;
            assert!(space(src) <= 64);
            // SAFETY: buf holds 64 bytes, at least space(src).
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&h);
                assert!(!c.is_null());
                write(c, src);
                let data = libc::CMSG_DATA(c);
                match src {
                    IpAddr::V4(a) => {
                        assert_eq!(
                            ((*c).cmsg_level, (*c).cmsg_type),
                            (libc::IPPROTO_IP, libc::IP_PKTINFO)
                        );
                        let p = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                        assert_eq!(p.ipi_spec_dst.s_addr, u32::from(a).to_be());
                    }
                    IpAddr::V6(a) => {
                        assert_eq!(
                            ((*c).cmsg_level, (*c).cmsg_type),
                            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)
                        );
                        let p = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                        assert_eq!(p.ipi6_addr.s6_addr, a.octets());
                    }
                }
            }
        }
    }
}
