//! ESP wire format constants and header peeking (RFC 4303 §2).

/// SPI (4) + Sequence Number (4) (RFC 4303 §2.1, §2.2).
pub const ESP_HEADER_LEN: usize = 8;
/// Pad Length + Next Header trailer (RFC 4303 §2.5, §2.6).
pub const ESP_TRAILER_LEN: usize = 2;
/// IP protocol number of ESP (RFC 4303 §2).
pub const IPPROTO_ESP: u8 = 50;
/// Next Header for an IPv4 inner packet in tunnel mode (IANA protocol 4, RFC 4303 §2.6).
pub const NEXT_HEADER_IPV4: u8 = 4;
/// Next Header for an IPv6 inner packet in tunnel mode (IANA protocol 41, RFC 4303 §2.6).
pub const NEXT_HEADER_IPV6: u8 = 41;
/// Next Header of a dummy (TFC) packet, which the receiver discards (RFC 4303 §2.6).
pub const NEXT_HEADER_NONE: u8 = 59;
/// Largest Pad Length (RFC 4303 §2.5: 0-255).
pub const MAX_PAD_LEN: usize = 255;
/// Largest inner packet or ESP packet handled: the IPv4/IPv6 (non-jumbogram) limit
/// (RFC 791 §3.1 Total Length, RFC 8200 §3 Payload Length are 16 bits).
pub const MAX_PACKET_LEN: usize = 65_535 + 40;

/// The cleartext header of an ESP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EspHeader {
    /// Security Parameters Index (RFC 4303 §2.1).
    pub spi: u32,
    /// Low 32 bits of the sequence number (RFC 4303 §2.2).
    pub seq: u32,
}

impl EspHeader {
    /// Read the header of an ESP packet; `None` if it is shorter than 8 bytes. This is what
    /// the caller uses to find the SA (the SPI lookup is the caller's, RFC 4303 §3.4.2).
    pub fn peek(esp: &[u8]) -> Option<EspHeader> {
        let spi = esp.get(0..4)?;
        let seq = esp.get(4..8)?;
        Some(EspHeader {
            spi: u32::from_be_bytes([spi[0], spi[1], spi[2], spi[3]]),
            seq: u32::from_be_bytes([seq[0], seq[1], seq[2], seq[3]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek() {
        assert_eq!(EspHeader::peek(&[1, 2, 3, 4, 0, 0, 0]), None);
        assert_eq!(
            EspHeader::peek(&[1, 2, 3, 4, 0, 0, 0, 5, 9]),
            Some(EspHeader {
                spi: 0x0102_0304,
                seq: 5
            })
        );
    }
}
