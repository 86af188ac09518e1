//! esp-inject: sends one crafted ESP packet (raw IP protocol 50, or in UDP when DST is
//! `ADDR:PORT/SPORT`) to a gateway, for testing how espd treats hostile input. Test tool, not
//! part of the datapath.
//!
//! ```text
//! esp-inject DST SPI KEYHEX TRANSFORM KIND SEQ [INNER_SRC INNER_DST]
//! KIND: valid | truncated | bad-icv | bad-padding | inner-length
//! ```
//! `valid` is a well-formed ESP packet carrying a small UDP/IPv4 packet from INNER_SRC to
//! INNER_DST (defaults 10.99.1.2 -> 10.99.2.2); the others break one thing each:
//! `truncated` is an 8-byte header plus 4 bytes; `bad-icv` flips the last ICV byte;
//! `bad-padding` carries padding bytes that are not 1, 2, ... (RFC 4303 §2.4) under a valid
//! ICV; `inner-length` carries an IPv4 header whose total length claims 8 bytes more than
//! the packet has, under a valid ICV. With IPv6 INNER_SRC and INNER_DST the inner packet is
//! UDP/IPv6, and `inner-length` makes its payload length claim 8 bytes more.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::ExitCode;

use esp_proto::{EspCrypto, LifetimeConfig, SaConfig, SaKeys, Transform};

fn hex(s: &str) -> Option<Vec<u8>> {
    let s: String = s.chars().filter(|c| *c != '-').collect();
    let s = s.strip_prefix("0x").unwrap_or(&s);
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A 44-byte UDP/IPv4 packet (RFC 791, RFC 768) to the discard port, valid header checksum.
fn inner_packet(src: Ipv4Addr, dst: Ipv4Addr, lie: usize) -> Vec<u8> {
    let len = 44usize;
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((len + lie) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&9999u16.to_be_bytes());
    p[22..24].copy_from_slice(&9u16.to_be_bytes());
    p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    for (i, b) in p[28..].iter_mut().enumerate() {
        *b = i as u8;
    }
    esp_proto::inner::ipv4_fix_checksum(&mut p);
    p
}

/// A 64-byte UDP/IPv6 packet (RFC 8200 §3, RFC 768) to the discard port; its payload length
/// claims `lie` bytes more than it carries. The UDP checksum is left 0 (the receiver's
/// stack drops it; espd checks only the IP header).
fn inner_packet6(src: Ipv6Addr, dst: Ipv6Addr, lie: usize) -> Vec<u8> {
    let len = 64usize;
    let mut p = vec![0u8; len];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((len - 40 + lie) as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..42].copy_from_slice(&9999u16.to_be_bytes());
    p[42..44].copy_from_slice(&9u16.to_be_bytes());
    p[44..46].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    for (i, b) in p[48..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

/// The inner packet of the family of `src` and `dst` (IPv4 when they differ).
fn inner(src: IpAddr, dst: IpAddr, lie: usize) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => inner_packet6(s, d, lie),
        (IpAddr::V4(s), IpAddr::V4(d)) => inner_packet(s, d, lie),
        _ => inner_packet(
            Ipv4Addr::new(10, 99, 1, 2),
            Ipv4Addr::new(10, 99, 2, 2),
            lie,
        ),
    }
}

fn send_raw(dst: Ipv4Addr, pkt: &[u8]) -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ESP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_in is plain old data.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_addr.s_addr = u32::from(dst).to_be();
    // SAFETY: pkt and sa are live for the call; fd is ours and closed right after.
    let r = unsafe {
        let r = libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        libc::close(fd);
        r
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn run(args: &[String]) -> Result<(), String> {
    let [dst, spi, key, transform, kind, seq, rest @ ..] = args else {
        return Err(
            "usage: esp-inject DST SPI KEYHEX TRANSFORM KIND SEQ [INNER_SRC INNER_DST]".into(),
        );
    };
    // DST is an address (raw ESP) or ADDR:PORT/SPORT (ESP in UDP from source port SPORT).
    let udp = match dst.split_once(':') {
        Some((_, rest)) => {
            let (port, sport) = rest.split_once('/').ok_or("DST: ADDR:PORT/SPORT")?;
            let port: u16 = port.parse().map_err(|e| format!("DST port: {e}"))?;
            let sport: u16 = sport.parse().map_err(|e| format!("DST source port: {e}"))?;
            Some((port, sport))
        }
        None => None,
    };
    let dst: Ipv4Addr = dst
        .split(':')
        .next()
        .unwrap_or("")
        .parse()
        .map_err(|e| format!("DST: {e}"))?;
    let spi =
        u32::from_str_radix(spi.trim_start_matches("0x"), 16).map_err(|e| format!("SPI: {e}"))?;
    let key = hex(key).ok_or("KEYHEX: not hex")?;
    let t = Transform::from_name(transform).ok_or("unknown TRANSFORM")?;
    let seq: u64 = seq.parse().map_err(|e| format!("SEQ: {e}"))?;
    let (isrc, idst): (IpAddr, IpAddr) = match rest {
        [s, d] => (
            s.parse().map_err(|e| format!("INNER_SRC: {e}"))?,
            d.parse().map_err(|e| format!("INNER_DST: {e}"))?,
        ),
        _ => (
            Ipv4Addr::new(10, 99, 1, 2).into(),
            Ipv4Addr::new(10, 99, 2, 2).into(),
        ),
    };
    let keys = SaKeys::split(t, &key).map_err(|e| e.to_string())?;
    let cfg = SaConfig {
        spi,
        transform: t,
        esn: false,
        lifetime: LifetimeConfig::default(),
    };
    let mut c = EspCrypto::new(&cfg, keys, true).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; 2048];
    let len = match kind.as_str() {
        "valid" => c.seal(seq, &inner(isrc, idst, 0), &mut out),
        "inner-length" => c.seal(seq, &inner(isrc, idst, 8), &mut out),
        "bad-icv" => c.seal(seq, &inner(isrc, idst, 0), &mut out).inspect(|n| {
            if let Some(b) = out.get_mut(n - 1) {
                *b ^= 0x55;
            }
        }),
        "bad-padding" => {
            let mut payload = inner(isrc, idst, 0);
            let align = t.encryption().align().max(4);
            let mut pad = (align - (payload.len() + 2) % align) % align;
            if pad < 2 {
                pad += align;
            }
            // Wrong padding: 1, 2, ... with the last byte off by 6.
            for i in 0..pad {
                payload.push(if i + 1 == pad {
                    (i + 7) as u8
                } else {
                    (i + 1) as u8
                });
            }
            payload.push(pad as u8);
            // Next Header: IPv4 (4) or IPv6 (41).
            payload.push(if matches!((isrc, idst), (IpAddr::V6(_), IpAddr::V6(_))) {
                41
            } else {
                4
            });
            let iv = vec![0x42u8; t.iv_len()];
            c.seal_payload(seq, &iv, &payload, &mut out)
        }
        "truncated" => {
            out[..4].copy_from_slice(&spi.to_be_bytes());
            out[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
            Ok(12)
        }
        other => return Err(format!("unknown KIND {other:?}")),
    }
    .map_err(|e| e.to_string())?;
    let pkt = out.get(..len).unwrap_or(&[]);
    match udp {
        Some((port, sport)) => std::net::UdpSocket::bind(("0.0.0.0", sport))
            .and_then(|s| s.send_to(pkt, (dst, port)))
            .map(|_| ())
            .map_err(|e| format!("send: {e}")),
        None => send_raw(dst, pkt).map_err(|e| format!("send: {e}")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("esp-inject: {e}");
            ExitCode::from(2)
        }
    }
}
