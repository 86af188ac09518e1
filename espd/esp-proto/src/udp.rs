//! UDP encapsulation of ESP (RFC 3948): demultiplexing what arrives on UDP port 4500 and
//! building what is sent there.

use crate::error::{EspError, Result};
use crate::wire::ESP_HEADER_LEN;

/// The IKE/ESP NAT-traversal port (RFC 3948 §1, RFC 7296 §2.23).
pub const NAT_T_PORT: u16 = 4500;
/// The non-ESP marker that prefixes IKE messages on port 4500 (RFC 3948 §2.2).
pub const NON_ESP_MARKER: [u8; 4] = [0; 4];
/// A NAT-keepalive packet: one octet 0xFF (RFC 3948 §2.3).
pub const NAT_KEEPALIVE: [u8; 1] = [0xff];
/// UDP header length (RFC 768).
pub const UDP_HEADER_LEN: usize = 8;

/// What a UDP/4500 payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Udp4500<'a> {
    /// A NAT keepalive (RFC 3948 §2.3): drop it (it only refreshes NAT state).
    Keepalive,
    /// An IKE message, with the non-ESP marker removed: hand it to ikemgr.
    Ike(&'a [u8]),
    /// An ESP packet (first four octets are a non-zero SPI, RFC 3948 §2.2).
    Esp(&'a [u8]),
}

/// Classify the payload of a UDP datagram received on port 4500.
///
/// Empty payloads, 1-3 byte payloads other than the keepalive, and ESP shorter than its
/// 8-byte header are [`EspError::Truncated`]. An IKE message shorter than its 28-byte header
/// is left for ikemgr to reject.
pub fn classify_udp4500(payload: &[u8]) -> Result<Udp4500<'_>> {
    if payload == NAT_KEEPALIVE {
        return Ok(Udp4500::Keepalive);
    }
    match payload.get(..4) {
        None => Err(EspError::Truncated),
        Some(m) if m == NON_ESP_MARKER => Ok(Udp4500::Ike(payload.get(4..).unwrap_or(&[]))),
        Some(_) if payload.len() < ESP_HEADER_LEN => Err(EspError::Truncated),
        Some(_) => Ok(Udp4500::Esp(payload)),
    }
}

/// Write `ike` prefixed with the non-ESP marker into `out`; returns the length.
pub fn write_ike_payload(ike: &[u8], out: &mut [u8]) -> Result<usize> {
    let n = ike.len() + NON_ESP_MARKER.len();
    let dst = out.get_mut(..n).ok_or(EspError::BufferTooSmall)?;
    dst[..4].copy_from_slice(&NON_ESP_MARKER);
    dst[4..].copy_from_slice(ike);
    Ok(n)
}

/// Write a UDP header for a payload of `payload_len` bytes (for raw-socket senders; a UDP
/// socket adds its own). The checksum is zero, as RFC 3948 §2.1 allows for IPv4; IPv6
/// senders must fill it in (RFC 8200 §8.1).
pub fn write_udp_header(
    src_port: u16,
    dst_port: u16,
    payload_len: usize,
    out: &mut [u8],
) -> Result<()> {
    let len = u16::try_from(payload_len + UDP_HEADER_LEN).map_err(|_| EspError::BufferTooSmall)?;
    let h = out
        .get_mut(..UDP_HEADER_LEN)
        .ok_or(EspError::BufferTooSmall)?;
    h[0..2].copy_from_slice(&src_port.to_be_bytes());
    h[2..4].copy_from_slice(&dst_port.to_be_bytes());
    h[4..6].copy_from_slice(&len.to_be_bytes());
    h[6..8].copy_from_slice(&[0, 0]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify() {
        assert_eq!(classify_udp4500(&[0xff]), Ok(Udp4500::Keepalive));
        assert_eq!(classify_udp4500(&[]), Err(EspError::Truncated));
        assert_eq!(classify_udp4500(&[0xfe]), Err(EspError::Truncated));
        assert_eq!(classify_udp4500(&[0, 0, 0]), Err(EspError::Truncated));
        assert_eq!(classify_udp4500(&[0, 0, 0, 0]), Ok(Udp4500::Ike(&[])));
        assert_eq!(
            classify_udp4500(&[0, 0, 0, 0, 7, 8]),
            Ok(Udp4500::Ike(&[7, 8]))
        );
        assert_eq!(
            classify_udp4500(&[1, 2, 3, 4, 0, 0, 0]),
            Err(EspError::Truncated)
        );
        let esp = [1, 2, 3, 4, 0, 0, 0, 1, 9];
        assert_eq!(classify_udp4500(&esp), Ok(Udp4500::Esp(&esp)));
        // A keepalive is exactly one octet.
        assert_eq!(classify_udp4500(&[0xff, 0xff]), Err(EspError::Truncated));
    }

    #[test]
    fn build_round_trips() {
        let mut buf = [0u8; 16];
        let n = write_ike_payload(&[1, 2, 3], &mut buf).unwrap();
        assert_eq!(classify_udp4500(&buf[..n]), Ok(Udp4500::Ike(&[1, 2, 3])));
        assert_eq!(
            write_ike_payload(&[0; 13], &mut buf),
            Err(EspError::BufferTooSmall)
        );
        let mut h = [0u8; 8];
        write_udp_header(4500, 4500, 100, &mut h).unwrap();
        assert_eq!(h, [0x11, 0x94, 0x11, 0x94, 0, 108, 0, 0]);
        assert!(write_udp_header(1, 2, 70_000, &mut h).is_err());
        assert!(write_udp_header(1, 2, 10, &mut h[..7]).is_err());
    }
}
