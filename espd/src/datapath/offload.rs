//! TUN offloads: the virtio-net header the kernel puts before each packet on a TUN device
//! opened with IFF_VNET_HDR, checksum completion, and TCP segmentation of the large (TSO)
//! packets the kernel hands us once TUN_F_TSO4 is offered, so one `read` brings up to 64 KiB
//! of TCP data instead of one MTU-sized packet.
//!
//! Header layout (linux/virtio_net.h, `struct virtio_net_hdr`, native byte order on a TUN
//! device without TUNSETVNETLE/BE): flags u8, gso_type u8, hdr_len u16, gso_size u16,
//! csum_start u16, csum_offset u16.

/// `sizeof(struct virtio_net_hdr)`.
pub const VNET_HDR_LEN: usize = 10;
/// virtio_net.h: the checksum from `csum_start` on must be completed by us.
const F_NEEDS_CSUM: u8 = 1;
/// virtio_net.h GSO types.
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_ECN: u8 = 0x80;

/// TCP flags (RFC 9293 §3.1).
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why an offloaded packet could not be turned into wire packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    /// Header fields point outside the packet, or an unsupported GSO type.
    Malformed,
}

#[derive(Debug, Clone, Copy)]
struct VnetHdr {
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

fn parse(b: &[u8]) -> Option<VnetHdr> {
    let h = b.get(..VNET_HDR_LEN)?;
    let u = |i: usize| u16::from_ne_bytes([h[i], h[i + 1]]);
    Some(VnetHdr {
        flags: h[0],
        gso_type: h[1],
        gso_size: u(4),
        csum_start: u(6),
        csum_offset: u(8),
    })
}

/// One's-complement sum of big-endian 16-bit words (RFC 1071), odd byte padded with zero.
fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = chunks.remainder() {
        acc += u64::from(*b) << 8;
    }
    acc
}

fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Completes a partial checksum: the field at `start + offset` holds the pseudo-header sum
/// (as the kernel leaves it); the result covers everything from `start` to the end.
fn complete_csum(pkt: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let at = start.checked_add(offset).ok_or(OffloadError::Malformed)?;
    if at + 2 > pkt.len() || start > pkt.len() {
        return Err(OffloadError::Malformed);
    }
    let mut c = !fold(sum16(&pkt[start..], 0));
    // A UDP checksum of 0 means "none" (RFC 768): send all ones instead.
    let is_udp = pkt.first().map(|b| b >> 4) == Some(4) && pkt.get(9) == Some(&17);
    if c == 0 && is_udp {
        c = 0xffff;
    }
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Turns one packet read from the TUN device (virtio-net header first) into wire-sized IP
/// packets, calling `emit` for each: as is (checksum completed if asked), or cut into
/// `gso_size` TCP segments in `seg` (which must hold one segment).
pub fn split(
    buf: &mut [u8],
    seg: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<(), OffloadError> {
    let hdr = parse(buf).ok_or(OffloadError::Malformed)?;
    let pkt = buf.get_mut(VNET_HDR_LEN..).ok_or(OffloadError::Malformed)?;
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                complete_csum(
                    pkt,
                    usize::from(hdr.csum_start),
                    usize::from(hdr.csum_offset),
                )?;
            }
            emit(pkt);
            Ok(())
        }
        GSO_TCPV4 => segment_tcp4(pkt, usize::from(hdr.gso_size), seg, emit),
        _ => Err(OffloadError::Malformed),
    }
}

/// TCP segmentation of an IPv4 TSO packet (what a NIC does, RFC 9293 semantics): each
/// segment gets the IP and TCP headers, its own IP length, ID (+1 per segment) and header
/// checksum, its sequence number, FIN/PSH only on the last and CWR only on the first, and a
/// full TCP checksum.
fn segment_tcp4(
    pkt: &[u8],
    mss: usize,
    seg: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<(), OffloadError> {
    let m = OffloadError::Malformed;
    let first = *pkt.first().ok_or(m)?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || pkt.get(9) != Some(&6) || mss == 0 {
        return Err(m);
    }
    let thl = usize::from(pkt.get(ihl + 12).ok_or(m)? >> 4) * 4;
    let h = ihl + thl;
    if thl < 20 || pkt.len() < h {
        return Err(m);
    }
    // Indexing below: pkt.len() >= h >= ihl + 20 >= 40.
    let (hdrs, payload) = pkt.split_at(h);
    let id = u16::from_be_bytes([hdrs[4], hdrs[5]]);
    let seq0 = u32::from_be_bytes([hdrs[ihl + 4], hdrs[ihl + 5], hdrs[ihl + 6], hdrs[ihl + 7]]);
    let flags = hdrs[ihl + 13];
    let count = payload.len().div_ceil(mss).max(1);
    let pseudo = sum16(&hdrs[12..20], 6);
    for i in 0..count {
        let chunk = payload
            .get(i * mss..((i + 1) * mss).min(payload.len()))
            .unwrap_or(&[]);
        let total = h + chunk.len();
        let s = seg.get_mut(..total).ok_or(m)?;
        s[..h].copy_from_slice(hdrs);
        s[h..].copy_from_slice(chunk);
        s[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        s[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        s[10..12].copy_from_slice(&[0, 0]);
        let ipc = !fold(sum16(&s[..ihl], 0));
        s[10..12].copy_from_slice(&ipc.to_be_bytes());
        let seq = seq0.wrapping_add((i * mss) as u32);
        s[ihl + 4..ihl + 8].copy_from_slice(&seq.to_be_bytes());
        let mut f = flags;
        if i + 1 < count {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            f &= !TCP_CWR;
        }
        s[ihl + 13] = f;
        s[ihl + 16..ihl + 18].copy_from_slice(&[0, 0]);
        let tcp_len = (total - ihl) as u64;
        let c = !fold(sum16(&s[ihl..], pseudo + tcp_len));
        s[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
        emit(s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP/IPv4 packet with `len` payload bytes and correct checksums.
    fn tcp4(payload: usize, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40 + payload];
        p[0] = 0x45;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[20..22].copy_from_slice(&5000u16.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        p[24..28].copy_from_slice(&1000u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        p
    }

    fn ip_ok(s: &[u8]) -> bool {
        fold(sum16(&s[..20], 0)) == 0xffff
    }

    fn tcp_ok(s: &[u8]) -> bool {
        let pseudo = sum16(&s[12..20], 6) + (s.len() - 20) as u64;
        fold(sum16(&s[20..], pseudo)) == 0xffff
    }

    fn vnet(gso_type: u8, gso_size: u16, flags: u8, start: u16, off: u16) -> Vec<u8> {
        let mut h = vec![flags, gso_type];
        for v in [40u16, gso_size, start, off] {
            h.extend_from_slice(&v.to_ne_bytes());
        }
        h
    }

    #[test]
    fn tso_packet_is_cut_into_valid_segments() {
        let mut buf = vnet(GSO_TCPV4, 1000, F_NEEDS_CSUM, 20, 16);
        buf.extend(tcp4(2500, TCP_PSH | TCP_FIN | TCP_CWR | 0x10));
        let mut seg = vec![0u8; 2000];
        let mut out: Vec<Vec<u8>> = Vec::new();
        split(&mut buf, &mut seg, |s| out.push(s.to_vec())).unwrap();
        assert_eq!(out.len(), 3);
        let mut data = Vec::new();
        for (i, s) in out.iter().enumerate() {
            assert!(ip_ok(s) && tcp_ok(s), "segment {i}");
            assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16);
            let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
            assert_eq!(seq, 1000 + 1000 * i as u32);
            let f = s[33];
            assert_eq!(f & TCP_FIN != 0, i == 2);
            assert_eq!(f & TCP_PSH != 0, i == 2);
            assert_eq!(f & TCP_CWR != 0, i == 0);
            assert!(f & 0x10 != 0);
            data.extend_from_slice(&s[40..]);
        }
        assert_eq!(data, tcp4(2500, 0)[40..].to_vec());
        assert_eq!(out[2].len(), 40 + 500);
    }

    #[test]
    fn partial_checksum_is_completed() {
        let mut p = tcp4(101, 0x18);
        // What the kernel leaves: the pseudo-header sum, not complemented.
        let pseudo = fold(sum16(&p[12..20], 6) + (p.len() - 20) as u64);
        p[36..38].copy_from_slice(&pseudo.to_be_bytes());
        let mut buf = vnet(GSO_NONE, 0, F_NEEDS_CSUM, 20, 16);
        buf.extend(p);
        let mut out = Vec::new();
        split(&mut buf, &mut [0u8; 10], |s| out.push(s.to_vec())).unwrap();
        assert_eq!(out.len(), 1);
        assert!(tcp_ok(&out[0]));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let mut seg = vec![0u8; 2000];
        for mut buf in [
            vec![0u8; 5],
            vnet(GSO_NONE, 0, F_NEEDS_CSUM, 60000, 16),
            vnet(GSO_TCPV4, 0, 0, 0, 0),
            vnet(3, 100, 0, 0, 0),
            {
                let mut b = vnet(GSO_TCPV4, 100, 0, 0, 0);
                b.extend_from_slice(&[0x45, 0, 0, 30]);
                b
            },
        ] {
            let mut n = 0;
            assert_eq!(
                split(&mut buf, &mut seg, |_| n += 1),
                Err(OffloadError::Malformed)
            );
            assert_eq!(n, 0);
        }
        // A segment buffer too small for one segment.
        let mut buf = vnet(GSO_TCPV4, 1000, 0, 0, 0);
        buf.extend(tcp4(2000, 0));
        assert!(split(&mut buf, &mut [0u8; 100], |_| {}).is_err());
    }
}
