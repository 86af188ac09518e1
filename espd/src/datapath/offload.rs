//! TUN offloads: the virtio-net header the kernel puts before each packet on a TUN device
//! opened with IFF_VNET_HDR, checksum completion, and TCP segmentation of the large (TSO)
//! packets the kernel hands us once TUN_F_TSO4 and TUN_F_TSO6 are offered, so one `read`
//! brings up to 64 KiB of TCP data instead of one MTU-sized packet.
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
const GSO_TCPV6: u8 = 4;
/// IPv6 fixed header length (RFC 8200 §3).
const IP6_HDR: usize = 40;
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
/// Adds `data` to a ones-complement sum of big-endian 16-bit words (RFC 1071), eight bytes
/// at a time: a big-endian 32-bit word `h << 16 | l` is congruent to `h + l` modulo
/// 0xffff, so summing 32-bit halves and folding at the end gives the same checksum. `acc`
/// cannot overflow: each step adds less than 2^33, and a packet has under 2^14 steps.
fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let v = u64::from_be_bytes(b);
        acc += (v >> 32) + (v & 0xffff_ffff);
    }
    let mut pairs = words.remainder().chunks_exact(2);
    for w in &mut pairs {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = pairs.remainder() {
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
    // A UDP checksum of 0 means "none" (RFC 768; not allowed over IPv6, RFC 8200 §8.1):
    // send all ones instead.
    let is_udp = match pkt.first().map(|b| b >> 4) {
        Some(4) => pkt.get(9) == Some(&17),
        Some(6) => pkt.get(6) == Some(&17),
        _ => false,
    };
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
        GSO_TCPV4 => segment_tcp(pkt, usize::from(hdr.gso_size), seg, emit, false),
        GSO_TCPV6 => segment_tcp(pkt, usize::from(hdr.gso_size), seg, emit, true),
        _ => Err(OffloadError::Malformed),
    }
}

/// TCP segmentation of a TSO packet (what a NIC does, RFC 9293 semantics): each segment
/// gets the IP and TCP headers, its sequence number, FIN/PSH only on the last and CWR only
/// on the first, and a full TCP checksum; IPv4 (`v6` false) its own total length, ID (+1
/// per segment) and header checksum, IPv6 its own payload length. An IPv6 packet must
/// carry TCP right after the fixed header (no extension headers).
fn segment_tcp(
    pkt: &[u8],
    mss: usize,
    seg: &mut [u8],
    mut emit: impl FnMut(&[u8]),
    v6: bool,
) -> Result<(), OffloadError> {
    let m = OffloadError::Malformed;
    let first = *pkt.first().ok_or(m)?;
    let ihl = if v6 {
        IP6_HDR
    } else {
        usize::from(first & 0x0f) * 4
    };
    let (version, next) = if v6 { (6, 6) } else { (4, 9) };
    if first >> 4 != version || ihl < 20 || pkt.get(next) != Some(&6) || mss == 0 {
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
    // Pseudo-header: the addresses and the protocol (RFC 9293 §3.1, RFC 8200 §8.1); the
    // TCP length is added per segment.
    let pseudo = if v6 {
        sum16(&hdrs[8..IP6_HDR], 6)
    } else {
        sum16(&hdrs[12..20], 6)
    };
    for i in 0..count {
        let chunk = payload
            .get(i * mss..((i + 1) * mss).min(payload.len()))
            .unwrap_or(&[]);
        let total = h + chunk.len();
        let s = seg.get_mut(..total).ok_or(m)?;
        s[..h].copy_from_slice(hdrs);
        s[h..].copy_from_slice(chunk);
        if v6 {
            s[4..6].copy_from_slice(&((total - IP6_HDR) as u16).to_be_bytes());
        } else {
            s[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            s[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            s[10..12].copy_from_slice(&[0, 0]);
            let ipc = !fold(sum16(&s[..ihl], 0));
            s[10..12].copy_from_slice(&ipc.to_be_bytes());
        }
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

/// Receive-side coalescing (what GRO does in a NIC driver): consecutive in-order TCP/IPv4
/// or TCP/IPv6 segments of one flow, decrypted from one receive batch, are joined into one
/// TSO packet and written to the TUN device with one `write`; the kernel re-segments it
/// only if it must. Anything else passes through unchanged, one write each, in order.
pub struct Coalescer {
    /// Virtio-net header, then the packet being built.
    buf: Box<[u8]>,
    /// Bytes of IP packet in `buf` after the header (0: empty).
    len: usize,
    tun: Option<std::sync::Arc<super::tun::TunDev>>,
    /// Whether more segments may be appended.
    open: bool,
    /// IP header length of the packet being built: 20 (IPv4) or 40 (IPv6).
    ihl: usize,
    hdr_len: usize,
    mss: usize,
    segs: usize,
    next_seq: u32,
}

/// At most this many segments per coalesced packet (as Linux GRO).
const MAX_SEGS: usize = 64;
const IP_MAX: usize = 65_535;

/// A TCP segment eligible for coalescing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    /// IP header length: 20 (IPv4) or 40 (IPv6).
    ihl: usize,
    /// IP and TCP header length.
    h: usize,
    payload: usize,
    seq: u32,
}

/// A TCP packet eligible for coalescing: IPv4 without options or fragmentation, or IPv6
/// with TCP right after the fixed header; its length field matching what was received;
/// only ACK (and PSH) set; some payload.
fn tcp_candidate(p: &[u8]) -> Option<Candidate> {
    let (ihl, total) = match *p.first()? {
        0x45 => {
            let ip = p.get(..20)?;
            if ip[9] != 6 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return None;
            }
            (20, usize::from(u16::from_be_bytes([ip[2], ip[3]])))
        }
        b if b >> 4 == 6 => {
            let ip = p.get(..IP6_HDR)?;
            if ip[6] != 6 {
                return None;
            }
            (
                IP6_HDR,
                IP6_HDR + usize::from(u16::from_be_bytes([ip[4], ip[5]])),
            )
        }
        _ => return None,
    };
    if total != p.len() {
        return None;
    }
    let tcp = p.get(ihl..ihl + 20)?;
    let thl = usize::from(tcp[12] >> 4) * 4;
    let flags = tcp[13];
    if thl < 20 || flags & !(TCP_PSH | 0x10) != 0 || flags & 0x10 == 0 {
        return None;
    }
    let h = ihl + thl;
    let payload = p.len().checked_sub(h).filter(|n| *n > 0)?;
    Some(Candidate {
        ihl,
        h,
        payload,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
    })
}

/// Whether segment `pkt` (a candidate with header length `h`) belongs to the flow of `cur`
/// (the first segment's headers, `ihl` + TCP) with the same header shape: IPv4 TOS, TTL and
/// addresses, or IPv6 traffic class, flow label, hop limit and addresses; then ports, ack,
/// data offset, window and options.
fn same_flow(cur: &[u8], pkt: &[u8], ihl: usize, h: usize) -> bool {
    let ip = if ihl == IP6_HDR {
        cur[..4] == pkt[..4] && cur[7] == pkt[7] && cur[8..40] == pkt[8..40]
    } else {
        cur[1] == pkt[1] && cur[8] == pkt[8] && cur[12..20] == pkt[12..20]
    };
    let t = ihl;
    ip && cur.len() == h
        && cur[t..t + 4] == pkt[t..t + 4]
        && cur[t + 8..t + 13] == pkt[t + 8..t + 13]
        && cur[t + 14..t + 16] == pkt[t + 14..t + 16]
        && cur[t + 20..h] == pkt[t + 20..h]
}

/// Turns `pkt` (`segs` coalesced segments, `ihl`-byte IP header, `hdr_len` bytes of IP and
/// TCP headers, `mss` bytes of payload per segment but the last) into one TSO packet
/// behind the virtio-net header `hdr`: its IP length (and IPv4 header checksum), the
/// pseudo-header sum in the TCP checksum field for the kernel to complete (F_NEEDS_CSUM),
/// and the GSO fields. One segment is left as it arrived (header zeroed).
fn finish_tso(hdr: &mut [u8], pkt: &mut [u8], ihl: usize, hdr_len: usize, mss: usize, segs: usize) {
    hdr.fill(0);
    if segs <= 1 {
        return;
    }
    let len = pkt.len();
    let tcp_len = (len - ihl) as u64;
    let (pseudo, gso) = if ihl == IP6_HDR {
        pkt[4..6].copy_from_slice(&((len - IP6_HDR) as u16).to_be_bytes());
        (fold(sum16(&pkt[8..IP6_HDR], 6) + tcp_len), GSO_TCPV6)
    } else {
        pkt[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        pkt[10..12].copy_from_slice(&[0, 0]);
        let ipc = !fold(sum16(&pkt[..20], 0));
        pkt[10..12].copy_from_slice(&ipc.to_be_bytes());
        (fold(sum16(&pkt[12..20], 6) + tcp_len), GSO_TCPV4)
    };
    pkt[ihl + 16..ihl + 18].copy_from_slice(&pseudo.to_be_bytes());
    hdr[0] = F_NEEDS_CSUM;
    hdr[1] = gso;
    let put = |h: &mut [u8], i: usize, v: u16| h[i..i + 2].copy_from_slice(&v.to_ne_bytes());
    put(hdr, 2, hdr_len as u16);
    put(hdr, 4, mss as u16);
    put(hdr, 6, ihl as u16);
    put(hdr, 8, 16);
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer {
            buf: vec![0u8; VNET_HDR_LEN + IP_MAX].into_boxed_slice(),
            len: 0,
            tun: None,
            open: false,
            ihl: 20,
            hdr_len: 0,
            mss: 0,
            segs: 0,
            next_seq: 0,
        }
    }
}

impl Coalescer {
    /// Queues `pkt` for `tun`; returns how many TUN writes failed meanwhile.
    pub fn push(&mut self, tun: &std::sync::Arc<super::tun::TunDev>, pkt: &[u8]) -> usize {
        let mut failed = 0;
        if self.len > 0 && !self.try_append(tun, pkt) {
            failed += self.flush();
        }
        if self.len == 0 {
            self.start(tun, pkt);
            if !self.open {
                failed += self.flush();
            }
        }
        failed
    }

    fn start(&mut self, tun: &std::sync::Arc<super::tun::TunDev>, pkt: &[u8]) {
        let Some(dst) = self.buf.get_mut(VNET_HDR_LEN..VNET_HDR_LEN + pkt.len()) else {
            return;
        };
        dst.copy_from_slice(pkt);
        self.len = pkt.len();
        self.tun = Some(tun.clone());
        self.segs = 1;
        match tcp_candidate(pkt) {
            Some(c) => {
                self.ihl = c.ihl;
                self.hdr_len = c.h;
                self.mss = c.payload;
                self.next_seq = c.seq.wrapping_add(c.payload as u32);
                // Indexing: tcp_candidate checked pkt.len() >= ihl + 20.
                self.open = pkt[c.ihl + 13] & TCP_PSH == 0;
            }
            None => self.open = false,
        }
    }

    fn try_append(&mut self, tun: &std::sync::Arc<super::tun::TunDev>, pkt: &[u8]) -> bool {
        if !self.open
            || !self
                .tun
                .as_ref()
                .is_some_and(|t| std::sync::Arc::ptr_eq(t, tun))
        {
            return false;
        }
        let Some(Candidate {
            ihl,
            h,
            payload,
            seq,
        }) = tcp_candidate(pkt)
        else {
            return false;
        };
        let h0 = self.hdr_len;
        let cur = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + h0];
        // Same flow and header shape; in order; not longer than the first segment; an
        // IPv6 payload length stays below 64 KiB as well.
        let same = ihl == self.ihl
            && h == h0
            && same_flow(cur, pkt, ihl, h)
            && seq == self.next_seq
            && payload <= self.mss
            && self.segs < MAX_SEGS
            && self.len + payload <= IP_MAX;
        if !same {
            return false;
        }
        let at = VNET_HDR_LEN + self.len;
        self.buf[at..at + payload].copy_from_slice(&pkt[h..]);
        self.len += payload;
        self.segs += 1;
        self.next_seq = seq.wrapping_add(payload as u32);
        if pkt[ihl + 13] & TCP_PSH != 0 {
            self.buf[VNET_HDR_LEN + ihl + 13] |= TCP_PSH;
            self.open = false;
        }
        if payload < self.mss {
            self.open = false;
        }
        true
    }

    /// Writes what is queued; returns 1 if the write failed.
    pub fn flush(&mut self) -> usize {
        if self.len == 0 {
            return 0;
        }
        let len = self.len;
        self.len = 0;
        self.open = false;
        let Some(tun) = self.tun.take() else {
            return 0;
        };
        let (hdr, pkt) = self.buf.split_at_mut(VNET_HDR_LEN);
        finish_tso(
            hdr,
            &mut pkt[..len],
            self.ihl,
            self.hdr_len,
            self.mss,
            self.segs,
        );
        match tun.write(&self.buf[..VNET_HDR_LEN + len]) {
            Ok(()) => 0,
            Err(_) => 1,
        }
    }
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

    /// RFC 1071 the plain way: 16-bit words one by one.
    fn naive_sum(data: &[u8], mut acc: u64) -> u64 {
        for (i, b) in data.iter().enumerate() {
            acc += if i % 2 == 0 {
                u64::from(*b) << 8
            } else {
                u64::from(*b)
            };
        }
        acc
    }

    #[test]
    fn wide_sum_matches_the_plain_one() {
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in (0..40).chain([1399, 1400, 1401, 9000, 65_535, 70_000]) {
            for start in 0..3 {
                let d = &data[start..start + len.min(data.len() - start)];
                assert_eq!(
                    fold(sum16(d, 0x1_2345)),
                    fold(naive_sum(d, 0x1_2345)),
                    "len {len} start {start}"
                );
            }
        }
        let ones = vec![0xffu8; 65_535];
        assert_eq!(fold(sum16(&ones, 0)), fold(naive_sum(&ones, 0)));
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

    /// A TCP/IPv6 packet with `payload` bytes (checksum not filled: segmentation computes
    /// each segment's).
    fn tcp6(payload: usize, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 60 + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
        p[6] = 6;
        p[7] = 64;
        p[8..24].copy_from_slice(
            &"fd00:99:1::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        p[24..40].copy_from_slice(
            &"fd00:99:2::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        p[40..42].copy_from_slice(&5000u16.to_be_bytes());
        p[42..44].copy_from_slice(&80u16.to_be_bytes());
        p[44..48].copy_from_slice(&1000u32.to_be_bytes());
        p[52] = 5 << 4;
        p[53] = flags;
        for (i, b) in p[60..].iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        p
    }

    fn tcp6_ok(s: &[u8]) -> bool {
        let pseudo = sum16(&s[8..40], 6) + (s.len() - 40) as u64;
        fold(sum16(&s[40..], pseudo)) == 0xffff
    }

    #[test]
    fn tso6_packet_is_cut_into_valid_segments() {
        let mut buf = vnet(GSO_TCPV6, 1000, F_NEEDS_CSUM, 40, 16);
        buf.extend(tcp6(2500, TCP_PSH | TCP_FIN | TCP_CWR | 0x10));
        let mut seg = vec![0u8; 2000];
        let mut out: Vec<Vec<u8>> = Vec::new();
        split(&mut buf, &mut seg, |s| out.push(s.to_vec())).unwrap();
        assert_eq!(out.len(), 3);
        let mut data = Vec::new();
        for (i, s) in out.iter().enumerate() {
            assert!(tcp6_ok(s), "segment {i}");
            assert_eq!(usize::from(u16::from_be_bytes([s[4], s[5]])), s.len() - 40);
            assert_eq!(&s[..4], &[0x60, 0, 0, 0]);
            assert_eq!(
                &s[6..40],
                &tcp6(0, 0)[6..40],
                "next header, hop limit, addresses"
            );
            let seq = u32::from_be_bytes([s[44], s[45], s[46], s[47]]);
            assert_eq!(seq, 1000 + 1000 * i as u32);
            let f = s[53];
            assert_eq!(f & TCP_FIN != 0, i == 2);
            assert_eq!(f & TCP_PSH != 0, i == 2);
            assert_eq!(f & TCP_CWR != 0, i == 0);
            data.extend_from_slice(&s[60..]);
        }
        assert_eq!(data, tcp6(2500, 0)[60..].to_vec());
        assert_eq!(out[2].len(), 60 + 500);
        // An extension header before TCP, or an IPv4 packet under the IPv6 type: refused.
        for bad in [
            {
                let mut p = tcp6(2500, 0x10);
                p[6] = 0;
                p
            },
            tcp4(2500, 0x10),
        ] {
            let mut buf = vnet(GSO_TCPV6, 1000, F_NEEDS_CSUM, 40, 16);
            buf.extend(bad);
            let mut n = 0;
            assert_eq!(
                split(&mut buf, &mut seg, |_| n += 1),
                Err(OffloadError::Malformed)
            );
            assert_eq!(n, 0);
        }
    }

    /// Receive-side coalescing undoes segmentation: the segments of a TSO packet are all
    /// candidates of one flow, and the packet `finish_tso` builds from them, cut again as
    /// the kernel would (its header says how), gives the same segments. IPv4 and IPv6.
    #[test]
    fn coalesced_segments_make_a_tso_packet_that_cuts_back_into_them() {
        for (v6, pkt) in [(false, tcp4(3500, 0x10)), (true, tcp6(3500, 0x10))] {
            let gso = if v6 { GSO_TCPV6 } else { GSO_TCPV4 };
            let ihl = if v6 { 40 } else { 20 };
            let mut buf = vnet(gso, 1000, F_NEEDS_CSUM, ihl as u16, 16);
            buf.extend(pkt);
            let mut seg = vec![0u8; 2000];
            let mut segs: Vec<Vec<u8>> = Vec::new();
            split(&mut buf, &mut seg, |s| segs.push(s.to_vec())).unwrap();
            assert_eq!(segs.len(), 4);
            let first = tcp_candidate(&segs[0]).expect("candidate");
            assert_eq!((first.ihl, first.h, first.payload), (ihl, ihl + 20, 1000));
            let mut joined = segs[0].clone();
            for s in &segs[1..] {
                let c = tcp_candidate(s).expect("candidate");
                assert_eq!(c.ihl, ihl);
                assert!(same_flow(&joined[..first.h], s, c.ihl, c.h), "v6 {v6}");
                joined.extend_from_slice(&s[c.h..]);
            }
            let mut out = vec![0u8; VNET_HDR_LEN];
            finish_tso(
                &mut out,
                &mut joined,
                ihl,
                first.h,
                first.payload,
                segs.len(),
            );
            out.extend(joined);
            let mut again: Vec<Vec<u8>> = Vec::new();
            split(&mut out, &mut seg, |s| again.push(s.to_vec())).unwrap();
            assert_eq!(again, segs, "v6 {v6}");
            // Another flow (a port) or a lone segment's header stay apart.
            let mut other = segs[1].clone();
            other[ihl] ^= 1;
            assert!(!same_flow(&segs[0][..first.h], &other, ihl, first.h));
            let mut lone = vec![0xaa; VNET_HDR_LEN];
            let mut one = segs[0].clone();
            finish_tso(&mut lone, &mut one, ihl, first.h, first.payload, 1);
            assert_eq!((lone, one), (vec![0; VNET_HDR_LEN], segs[0].clone()));
        }
        // Not candidates: an IPv6 extension header, an IPv4 fragment, a SYN.
        let mut ext = tcp6(100, 0x10);
        ext[6] = 0;
        let mut frag = tcp4(100, 0x10);
        frag[6] = 0x20;
        for p in [ext, frag, tcp4(100, 0x12), tcp6(0, 0x10)] {
            assert_eq!(tcp_candidate(&p), None);
        }
    }

    #[test]
    fn a_zero_udp6_checksum_goes_out_as_all_ones() {
        // UDP/IPv6 whose checksum comes out as 0: the pseudo-header sum left by the kernel
        // is chosen so that the completed sum is 0xffff (complement 0).
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&8u16.to_be_bytes());
        p[6] = 17;
        p[40..42].copy_from_slice(&1u16.to_be_bytes());
        p[44..46].copy_from_slice(&8u16.to_be_bytes());
        let rest = fold(sum16(&p[40..], 0));
        p[46..48].copy_from_slice(&(0xffff - rest).to_be_bytes());
        let mut buf = vnet(GSO_NONE, 0, F_NEEDS_CSUM, 40, 6);
        buf.extend(p);
        let mut out = Vec::new();
        split(&mut buf, &mut [0u8; 10], |s| out.push(s.to_vec())).unwrap();
        assert_eq!(&out[0][46..48], &[0xff, 0xff]);
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
