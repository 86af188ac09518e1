//! Validation of the decrypted inner packet before it is handed to the caller (and so to
//! TUN): version, header length and total length must agree with what was decrypted.

use crate::error::{EspError, Result};
use crate::wire::{NEXT_HEADER_IPV4, NEXT_HEADER_IPV6};
use std::net::IpAddr;

/// Minimal IPv4 header (RFC 791 §3.1).
const IPV4_MIN_HEADER: usize = 20;
/// Fixed IPv6 header (RFC 8200 §3).
const IPV6_HEADER: usize = 40;

/// Check that `pkt` is one well-formed IP header of the family `next_header` names, whose
/// length fields describe exactly `pkt.len()` bytes (no TFC padding is accepted, so a
/// header that claims fewer bytes than were decrypted is also rejected).
pub fn validate_inner(next_header: u8, pkt: &[u8]) -> Result<()> {
    match next_header {
        NEXT_HEADER_IPV4 => validate_ipv4(pkt),
        NEXT_HEADER_IPV6 => validate_ipv6(pkt),
        other => Err(EspError::NextHeader(other)),
    }
}

fn validate_ipv4(pkt: &[u8]) -> Result<()> {
    let hdr = pkt.get(..IPV4_MIN_HEADER).ok_or(EspError::InnerHeader)?;
    if hdr[0] >> 4 != 4 {
        return Err(EspError::InnerHeader);
    }
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    if ihl < IPV4_MIN_HEADER || ihl > pkt.len() || total != pkt.len() {
        return Err(EspError::InnerHeader);
    }
    // Header checksum (RFC 791 §3.1): the one's complement sum over the header is 0xffff.
    let header = pkt.get(..ihl).ok_or(EspError::InnerHeader)?;
    let mut sum: u32 = header
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if sum != 0xffff {
        return Err(EspError::InnerHeader);
    }
    Ok(())
}

fn validate_ipv6(pkt: &[u8]) -> Result<()> {
    let hdr = pkt.get(..IPV6_HEADER).ok_or(EspError::InnerHeader)?;
    if hdr[0] >> 4 != 6 {
        return Err(EspError::InnerHeader);
    }
    // Payload length 0 would mean a jumbogram (RFC 2675), which no tunnel MTU carries.
    let payload = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
    if payload == 0 || payload + IPV6_HEADER != pkt.len() {
        return Err(EspError::InnerHeader);
    }
    Ok(())
}

/// Source and destination addresses of an IPv4 or IPv6 packet (for the caller's selector
/// checks and route lookups); `None` if the header is too short or the version unknown.
pub fn addresses(pkt: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match pkt.first()? >> 4 {
        4 => {
            let src: [u8; 4] = pkt.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
            Some((IpAddr::from(src), IpAddr::from(dst)))
        }
        6 => {
            let src: [u8; 16] = pkt.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
            Some((IpAddr::from(src), IpAddr::from(dst)))
        }
        _ => None,
    }
}

/// Whether a packet with these addresses stays on its link and is never forwarded: an IPv6
/// link-local source or destination (fe80::/10, RFC 4291 §2.5.6), the unspecified source,
/// or an interface- or link-local multicast destination (ff01::/16, ff02::/16; §2.7). The
/// kernel sends such packets (neighbour and router discovery, MLD) on every IPv6-enabled
/// device, the tunnel's TUN device included.
pub fn link_scope(src: IpAddr, dst: IpAddr) -> bool {
    match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let link_local = |a: &std::net::Ipv6Addr| a.segments()[0] & 0xffc0 == 0xfe80;
            let local_multicast = d.is_multicast() && matches!(d.segments()[0] & 0x000f, 1 | 2);
            link_local(&s) || link_local(&d) || s.is_unspecified() || local_multicast
        }
        _ => false,
    }
}

/// Next Header value for an outbound inner packet, from its IP version nibble.
pub(crate) fn next_header_for(inner: &[u8]) -> Result<u8> {
    match inner.first().map(|b| b >> 4) {
        Some(4) => Ok(NEXT_HEADER_IPV4),
        Some(6) => Ok(NEXT_HEADER_IPV6),
        _ => Err(EspError::NotIp),
    }
}

/// Write a correct IPv4 header checksum into `hdr` (helper for tests and benches).
#[doc(hidden)]
pub fn ipv4_fix_checksum(hdr: &mut [u8]) {
    let Some(&first) = hdr.first() else { return };
    let ihl = (usize::from(first & 0x0f) * 4).min(hdr.len());
    if ihl < IPV4_MIN_HEADER {
        return;
    }
    hdr[10] = 0;
    hdr[11] = 0;
    let mut sum: u32 = hdr[..ihl]
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Build an IPv4 packet of `len` bytes (ICMP payload pattern) for tests and benches.
#[doc(hidden)]
pub fn sample_ipv4(len: usize, id: u16) -> Vec<u8> {
    let len = len.clamp(IPV4_MIN_HEADER, usize::from(u16::MAX));
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&[192, 0, 2, 1]);
    p[16..20].copy_from_slice(&[198, 51, 100, 1]);
    for (i, b) in p[IPV4_MIN_HEADER..].iter_mut().enumerate() {
        *b = i as u8;
    }
    ipv4_fix_checksum(&mut p);
    p
}

/// Build an IPv6 packet of `len` bytes (>= 41) for tests and benches.
#[doc(hidden)]
pub fn sample_ipv6(len: usize) -> Vec<u8> {
    let len = len.clamp(IPV6_HEADER + 1, usize::from(u16::MAX));
    let mut p = vec![0u8; len];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((len - IPV6_HEADER) as u16).to_be_bytes());
    p[6] = 59;
    p[7] = 64;
    p[8] = 0x20;
    p[9] = 0x01;
    p[24] = 0x20;
    p[25] = 0x01;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_scope_packets_are_recognised() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        // Router solicitation, MLDv2 report, neighbour solicitation, DAD.
        assert!(link_scope(a("fe80::1"), a("ff02::2")));
        assert!(link_scope(a("fe80::1"), a("ff02::16")));
        assert!(link_scope(a("fe80::1"), a("fe80::2")));
        assert!(link_scope(a("::"), a("ff02::1:ff00:1")));
        assert!(link_scope(a("fd00::1"), a("ff01::1")));
        assert!(
            link_scope(a("fd00::1"), a("febf::1")),
            "fe80::/10 ends at febf"
        );
        // Tunnelled traffic: global or unique-local addresses, wider multicast scopes, IPv4.
        assert!(!link_scope(a("fd00:99:1::2"), a("fd00:99:2::2")));
        assert!(!link_scope(a("2001:db8::1"), a("ff05::1:3")));
        assert!(!link_scope(a("2001:db8::1"), a("fec0::1")));
        assert!(!link_scope(a("10.0.0.1"), a("224.0.0.1")));
    }

    #[test]
    fn ipv4_good_and_lies() {
        let p = sample_ipv4(84, 1);
        assert_eq!(validate_inner(4, &p), Ok(()));
        // Wrong family for the next header.
        assert_eq!(validate_inner(41, &p), Err(EspError::InnerHeader));
        // Total length 0.
        let mut q = p.clone();
        q[2..4].copy_from_slice(&0u16.to_be_bytes());
        ipv4_fix_checksum(&mut q);
        assert_eq!(validate_inner(4, &q), Err(EspError::InnerHeader));
        // Total length larger than the packet.
        let mut q = p.clone();
        q[2..4].copy_from_slice(&1400u16.to_be_bytes());
        ipv4_fix_checksum(&mut q);
        assert_eq!(validate_inner(4, &q), Err(EspError::InnerHeader));
        // Total length smaller than the packet.
        let mut q = p.clone();
        q[2..4].copy_from_slice(&80u16.to_be_bytes());
        ipv4_fix_checksum(&mut q);
        assert_eq!(validate_inner(4, &q), Err(EspError::InnerHeader));
        // IHL below 5 and beyond the packet.
        let mut q = p.clone();
        q[0] = 0x44;
        assert_eq!(validate_inner(4, &q), Err(EspError::InnerHeader));
        let mut q = sample_ipv4(20, 1);
        q[0] = 0x46;
        assert_eq!(validate_inner(4, &q), Err(EspError::InnerHeader));
        // Bad checksum.
        let mut q = p.clone();
        q[8] ^= 1;
        assert_eq!(validate_inner(4, &q), Err(EspError::InnerHeader));
        // Truncated.
        assert_eq!(validate_inner(4, &p[..19]), Err(EspError::InnerHeader));
        assert_eq!(validate_inner(4, &[]), Err(EspError::InnerHeader));
    }

    #[test]
    fn ipv6_good_and_lies() {
        let p = sample_ipv6(100);
        assert_eq!(validate_inner(41, &p), Ok(()));
        assert_eq!(validate_inner(4, &p), Err(EspError::InnerHeader));
        let mut q = p.clone();
        q[4..6].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(validate_inner(41, &q), Err(EspError::InnerHeader));
        let mut q = p.clone();
        q[4..6].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(validate_inner(41, &q), Err(EspError::InnerHeader));
        assert_eq!(validate_inner(41, &p[..39]), Err(EspError::InnerHeader));
    }

    #[test]
    fn addresses_of_both_families() {
        let (s, d) = addresses(&sample_ipv4(40, 1)).unwrap();
        assert_eq!(
            (s.to_string(), d.to_string()),
            ("192.0.2.1".into(), "198.51.100.1".into())
        );
        let (s, d) = addresses(&sample_ipv6(60)).unwrap();
        assert_eq!(
            (s.to_string(), d.to_string()),
            ("2001::".into(), "2001::".into())
        );
        assert_eq!(addresses(&sample_ipv4(40, 1)[..19]), None);
        assert_eq!(addresses(&[0x10; 40]), None);
        assert_eq!(addresses(&[]), None);
    }

    #[test]
    fn next_header_from_version() {
        assert_eq!(next_header_for(&sample_ipv4(40, 0)), Ok(4));
        assert_eq!(next_header_for(&sample_ipv6(60)), Ok(41));
        assert_eq!(next_header_for(&[0x10]), Err(EspError::NotIp));
        assert_eq!(next_header_for(&[]), Err(EspError::NotIp));
        assert_eq!(validate_inner(17, &[]), Err(EspError::NextHeader(17)));
    }
}
