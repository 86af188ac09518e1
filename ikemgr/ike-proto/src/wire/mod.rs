//! IKEv2 message and payload codec (RFC 7296 §3, RFC 7383 §2.5).
//!
//! [`Message::decode`] parses the IKE header and the payload chain up to and
//! including an SK/SKF payload, whose body stays opaque (the SA layer
//! decrypts it and parses the inner chain with [`decode_chain`]). Every
//! length field is checked against what is actually there: a short buffer is
//! `MessageTooShort`, bytes left over are `TrailingData`, a length field that
//! disagrees with its container is `LengthMismatch`.

mod consts;
pub mod reader;

pub use consts::*;
use reader::Reader;
use std::net::IpAddr;

/// Errors from decoding a message: all of them mean the peer sent bad data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the field needs.
    #[error("message too short reading {what}: need {need}, have {have}")]
    MessageTooShort {
        /// Field being read.
        what: &'static str,
        /// Bytes required.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// Bytes left after a structure that should have consumed all.
    #[error("{extra} trailing bytes after {what}")]
    TrailingData {
        /// Structure that ended early.
        what: &'static str,
        /// Unconsumed bytes.
        extra: usize,
    },
    /// A length field disagrees with the data or with itself.
    #[error("length of {what} is {declared}, but {actual} is possible")]
    LengthMismatch {
        /// Structure whose length lies.
        what: &'static str,
        /// Length on the wire.
        declared: usize,
        /// Length that is consistent.
        actual: usize,
    },
    /// Major version other than 2 (answer INVALID_MAJOR_VERSION, §2.5).
    #[error("IKE major version {0} not supported")]
    InvalidMajorVersion(u8),
    /// A structural rule of §3 is broken (answer INVALID_SYNTAX).
    #[error("invalid syntax: {0}")]
    InvalidSyntax(&'static str),
}

/// IKE header flags, RFC 7296 §3.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flags(pub u8);

impl Flags {
    /// Initiator bit: set by the original initiator of the IKE SA.
    pub const INITIATOR: u8 = 0x08;
    /// Version bit: sender can speak a higher major version.
    pub const VERSION: u8 = 0x10;
    /// Response bit.
    pub const RESPONSE: u8 = 0x20;

    /// Builds flags from the two meaningful bits.
    pub fn new(initiator: bool, response: bool) -> Self {
        let mut f = 0;
        if initiator {
            f |= Self::INITIATOR;
        }
        if response {
            f |= Self::RESPONSE;
        }
        Flags(f)
    }
    /// Set when the sender is the original initiator.
    pub fn initiator(self) -> bool {
        self.0 & Self::INITIATOR != 0
    }
    /// Set on responses.
    pub fn response(self) -> bool {
        self.0 & Self::RESPONSE != 0
    }
}

/// IKE header, RFC 7296 §3.1 (28 octets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// IKE SA initiator's SPI.
    pub spi_i: u64,
    /// IKE SA responder's SPI (0 in the first IKE_SA_INIT request).
    pub spi_r: u64,
    /// Type of the first payload.
    pub next_payload: PayloadType,
    /// Major (high nibble) and minor version; 0x20 for IKEv2.
    pub version: u8,
    /// Exchange type.
    pub exchange: ExchangeType,
    /// Flags.
    pub flags: Flags,
    /// Message ID.
    pub message_id: u32,
    /// Total length of the message including the header.
    pub length: u32,
}

/// Length of the IKE header.
pub const HEADER_LEN: usize = 28;
/// Length of the generic payload header, RFC 7296 §3.2.
pub const GENERIC_HEADER_LEN: usize = 4;
/// IKEv2 version octet (major 2, minor 0).
pub const IKEV2_VERSION: u8 = 0x20;

impl Header {
    /// Parses the fixed header; does not check `length` against the buffer.
    pub fn decode(r: &mut Reader<'_>) -> Result<Header, DecodeError> {
        let spi_i = r.u64("IKE SPIi")?;
        let spi_r = r.u64("IKE SPIr")?;
        let next_payload = PayloadType(r.u8("next payload")?);
        let version = r.u8("version")?;
        let exchange = ExchangeType(r.u8("exchange type")?);
        let flags = Flags(r.u8("flags")?);
        let message_id = r.u32("message id")?;
        let length = r.u32("length")?;
        if version >> 4 != 2 {
            return Err(DecodeError::InvalidMajorVersion(version >> 4));
        }
        Ok(Header {
            spi_i,
            spi_r,
            next_payload,
            version,
            exchange,
            flags,
            message_id,
            length,
        })
    }

    /// Appends the 28-octet header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.spi_i.to_be_bytes());
        out.extend_from_slice(&self.spi_r.to_be_bytes());
        out.push(self.next_payload.0);
        out.push(self.version);
        out.push(self.exchange.0);
        out.push(self.flags.0);
        out.extend_from_slice(&self.message_id.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    /// Peeks at the header of a datagram (for SPI lookup before full decode).
    pub fn peek(buf: &[u8]) -> Result<Header, DecodeError> {
        Header::decode(&mut Reader::new(buf))
    }
}

/// Transform attribute, RFC 7296 §3.3.5.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    /// Type/Value form (AF bit set), two-octet value.
    Tv(AttributeType, u16),
    /// Type/Length/Value form.
    Tlv(AttributeType, Vec<u8>),
}

/// Transform substructure, RFC 7296 §3.3.2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transform {
    /// Transform type.
    pub ty: TransformType,
    /// Transform ID (meaning depends on `ty`).
    pub id: u16,
    /// Attributes (only Key Length is defined for IKEv2).
    pub attrs: Vec<Attribute>,
}

impl Transform {
    /// A transform with an optional Key Length attribute.
    pub fn new(ty: TransformType, id: u16, key_len: Option<u16>) -> Self {
        Transform {
            ty,
            id,
            attrs: key_len
                .map(|k| vec![Attribute::Tv(AttributeType::KEY_LENGTH, k)])
                .unwrap_or_default(),
        }
    }
    /// The Key Length attribute, if present.
    pub fn key_length(&self) -> Option<u16> {
        self.attrs.iter().find_map(|a| match a {
            Attribute::Tv(AttributeType::KEY_LENGTH, v) => Some(*v),
            _ => None,
        })
    }
}

/// Proposal substructure, RFC 7296 §3.3.1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    /// Proposal number (1-based, sequential).
    pub num: u8,
    /// IKE, AH or ESP.
    pub protocol: ProtocolId,
    /// Sending entity's SPI (empty in IKE_SA_INIT, 8 octets for IKE rekey, 4 for ESP).
    pub spi: Vec<u8>,
    /// Transforms.
    pub transforms: Vec<Transform>,
}

/// Key Exchange payload, RFC 7296 §3.4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KePayload {
    /// DH group of the public value.
    pub group: DhGroup,
    /// Public value.
    pub data: Vec<u8>,
}

/// Identification payload, RFC 7296 §3.5.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdPayload {
    /// ID type.
    pub id_type: IdType,
    /// Identification data.
    pub data: Vec<u8>,
}

impl IdPayload {
    /// The body after the generic header (`RestOfInitIDPayload`, §2.15).
    pub fn body(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + self.data.len());
        v.push(self.id_type.0);
        v.extend_from_slice(&[0, 0, 0]);
        v.extend_from_slice(&self.data);
        v
    }
    /// Builds an ID from an IP address.
    pub fn from_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => IdPayload {
                id_type: IdType::IPV4_ADDR,
                data: a.octets().to_vec(),
            },
            IpAddr::V6(a) => IdPayload {
                id_type: IdType::IPV6_ADDR,
                data: a.octets().to_vec(),
            },
        }
    }
    /// Builds an FQDN ID.
    pub fn fqdn(name: &str) -> Self {
        IdPayload {
            id_type: IdType::FQDN,
            data: name.as_bytes().to_vec(),
        }
    }
}

impl core::fmt::Display for IdPayload {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match (self.id_type, self.data.len()) {
            (IdType::IPV4_ADDR, 4) => {
                let mut a = [0u8; 4];
                a.copy_from_slice(&self.data);
                write!(f, "IPV4_ADDR {}", std::net::Ipv4Addr::from(a))
            }
            (IdType::IPV6_ADDR, 16) => {
                let mut a = [0u8; 16];
                a.copy_from_slice(&self.data);
                write!(f, "IPV6_ADDR {}", std::net::Ipv6Addr::from(a))
            }
            (IdType::FQDN | IdType::RFC822_ADDR | IdType::KEY_ID, _) => {
                write!(
                    f,
                    "{} {}",
                    self.id_type,
                    String::from_utf8_lossy(&self.data)
                )
            }
            _ => write!(f, "{} ({} octets)", self.id_type, self.data.len()),
        }
    }
}

/// Authentication payload, RFC 7296 §3.8.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthPayload {
    /// Method.
    pub method: AuthMethod,
    /// Authentication data.
    pub data: Vec<u8>,
}

/// Notify payload, RFC 7296 §3.10.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifyPayload {
    /// Protocol the SPI belongs to (NONE when no SPI).
    pub protocol: ProtocolId,
    /// SPI (usually empty).
    pub spi: Vec<u8>,
    /// Notify message type.
    pub ty: NotifyType,
    /// Notification data.
    pub data: Vec<u8>,
}

impl NotifyPayload {
    /// A notify without SPI.
    pub fn new(ty: NotifyType, data: Vec<u8>) -> Self {
        NotifyPayload {
            protocol: ProtocolId::NONE,
            spi: Vec::new(),
            ty,
            data,
        }
    }
}

/// Delete payload, RFC 7296 §3.11.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeletePayload {
    /// IKE (no SPIs) or ESP/AH.
    pub protocol: ProtocolId,
    /// Size of each SPI.
    pub spi_size: u8,
    /// SPIs to delete.
    pub spis: Vec<Vec<u8>>,
}

/// One traffic selector, RFC 7296 §3.13.1.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TrafficSelector {
    /// Type (IPv4 or IPv6 range; others kept opaque).
    pub ts_type: TsType,
    /// IP protocol (0 = any).
    pub ip_proto: u8,
    /// First port.
    pub start_port: u16,
    /// Last port.
    pub end_port: u16,
    /// First address (4 or 16 octets; for unknown types, the whole body).
    pub start: Vec<u8>,
    /// Last address.
    pub end: Vec<u8>,
}

impl TrafficSelector {
    /// A selector for an address range with all protocols and ports.
    pub fn range(start: IpAddr, end: IpAddr) -> Self {
        let (ts_type, s, e) = match (start, end) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (
                TsType::IPV4_ADDR_RANGE,
                a.octets().to_vec(),
                b.octets().to_vec(),
            ),
            (IpAddr::V6(a), IpAddr::V6(b)) => (
                TsType::IPV6_ADDR_RANGE,
                a.octets().to_vec(),
                b.octets().to_vec(),
            ),
            (IpAddr::V4(a), IpAddr::V6(b)) => (
                TsType::IPV6_ADDR_RANGE,
                a.to_ipv6_mapped().octets().to_vec(),
                b.octets().to_vec(),
            ),
            (IpAddr::V6(a), IpAddr::V4(b)) => (
                TsType::IPV6_ADDR_RANGE,
                a.octets().to_vec(),
                b.to_ipv6_mapped().octets().to_vec(),
            ),
        };
        TrafficSelector {
            ts_type,
            ip_proto: 0,
            start_port: 0,
            end_port: 0xffff,
            start: s,
            end: e,
        }
    }

    /// A selector for `addr/prefix` (FortiOS `subnet` style).
    pub fn subnet(addr: IpAddr, prefix: u8) -> Self {
        match addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(prefix.min(32)))
                };
                TrafficSelector::range(
                    IpAddr::V4((bits & mask).into()),
                    IpAddr::V4((bits | !mask).into()),
                )
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(prefix.min(128)))
                };
                TrafficSelector::range(
                    IpAddr::V6((bits & mask).into()),
                    IpAddr::V6((bits | !mask).into()),
                )
            }
        }
    }

    /// The address range, for the two known types.
    pub fn addr_range(&self) -> Option<(IpAddr, IpAddr)> {
        fn ip(b: &[u8]) -> Option<IpAddr> {
            match b.len() {
                4 => {
                    let mut a = [0u8; 4];
                    a.copy_from_slice(b);
                    Some(IpAddr::from(a))
                }
                16 => {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(b);
                    Some(IpAddr::from(a))
                }
                _ => None,
            }
        }
        Some((ip(&self.start)?, ip(&self.end)?))
    }
}

impl core::fmt::Display for TrafficSelector {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.addr_range() {
            Some((s, e)) => write!(
                f,
                "{}:{}-{}:{}-{}",
                self.ip_proto, s, e, self.start_port, self.end_port
            ),
            None => write!(f, "{:?}", self.ts_type),
        }
    }
}

/// Generic payload with its critical bit and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Security Association (§3.3).
    Sa(Vec<Proposal>),
    /// Key Exchange (§3.4).
    Ke(KePayload),
    /// Initiator identification (§3.5).
    IdI(IdPayload),
    /// Responder identification (§3.5).
    IdR(IdPayload),
    /// Certificate (§3.6), opaque.
    Cert(CertEncoding, Vec<u8>),
    /// Certificate request (§3.7), opaque.
    CertReq(CertEncoding, Vec<u8>),
    /// Authentication (§3.8).
    Auth(AuthPayload),
    /// Nonce (§3.9).
    Nonce(Vec<u8>),
    /// Notify (§3.10).
    Notify(NotifyPayload),
    /// Delete (§3.11).
    Delete(DeletePayload),
    /// Vendor ID (§3.12).
    VendorId(Vec<u8>),
    /// Initiator traffic selectors (§3.13).
    TsI(Vec<TrafficSelector>),
    /// Responder traffic selectors (§3.13).
    TsR(Vec<TrafficSelector>),
    /// Encrypted and authenticated (§3.14): `first_inner` is the type of the
    /// first payload inside; `body` is IV || ciphertext || ICV, undecrypted.
    Sk {
        /// Next-payload field of the SK header.
        first_inner: PayloadType,
        /// IV, encrypted payloads, padding, ICV.
        body: Vec<u8>,
    },
    /// Encrypted fragment (RFC 7383 §2.5).
    Skf {
        /// Next-payload field (non-zero only in fragment 1).
        first_inner: PayloadType,
        /// Fragment number, from 1.
        fragment: u16,
        /// Total fragments.
        total: u16,
        /// IV, encrypted content, padding, ICV.
        body: Vec<u8>,
    },
    /// Any other payload (CP, EAP, unknown), kept verbatim.
    Unknown {
        /// Payload type.
        ty: PayloadType,
        /// Critical bit from the generic header.
        critical: bool,
        /// Body.
        data: Vec<u8>,
    },
}

impl Payload {
    /// Wire payload type of this payload.
    pub fn payload_type(&self) -> PayloadType {
        match self {
            Payload::Sa(_) => PayloadType::SA,
            Payload::Ke(_) => PayloadType::KE,
            Payload::IdI(_) => PayloadType::IDI,
            Payload::IdR(_) => PayloadType::IDR,
            Payload::Cert(..) => PayloadType::CERT,
            Payload::CertReq(..) => PayloadType::CERTREQ,
            Payload::Auth(_) => PayloadType::AUTH,
            Payload::Nonce(_) => PayloadType::NONCE,
            Payload::Notify(_) => PayloadType::NOTIFY,
            Payload::Delete(_) => PayloadType::DELETE,
            Payload::VendorId(_) => PayloadType::VENDOR_ID,
            Payload::TsI(_) => PayloadType::TSI,
            Payload::TsR(_) => PayloadType::TSR,
            Payload::Sk { .. } => PayloadType::SK,
            Payload::Skf { .. } => PayloadType::SKF,
            Payload::Unknown { ty, .. } => *ty,
        }
    }

    fn critical(&self) -> bool {
        match self {
            Payload::Unknown { critical, .. } => *critical,
            _ => false,
        }
    }

    /// True for SK and SKF, which end the chain.
    pub fn is_encrypted(&self) -> bool {
        matches!(self, Payload::Sk { .. } | Payload::Skf { .. })
    }

    /// Decodes one payload body of type `ty`. For SK/SKF, `next` is the
    /// header's next-payload field.
    fn decode_body(
        ty: PayloadType,
        critical: bool,
        next: PayloadType,
        mut r: Reader<'_>,
    ) -> Result<Payload, DecodeError> {
        let p = match ty {
            PayloadType::SA => Payload::Sa(decode_proposals(&mut r)?),
            PayloadType::KE => {
                let group = DhGroup(r.u16("KE group")?);
                r.u16("KE reserved")?;
                Payload::Ke(KePayload {
                    group,
                    data: r.rest().to_vec(),
                })
            }
            PayloadType::IDI | PayloadType::IDR => {
                let id_type = IdType(r.u8("ID type")?);
                r.take(3, "ID reserved")?;
                let id = IdPayload {
                    id_type,
                    data: r.rest().to_vec(),
                };
                if ty == PayloadType::IDI {
                    Payload::IdI(id)
                } else {
                    Payload::IdR(id)
                }
            }
            PayloadType::CERT | PayloadType::CERTREQ => {
                let enc = CertEncoding(r.u8("cert encoding")?);
                let data = r.rest().to_vec();
                if ty == PayloadType::CERT {
                    Payload::Cert(enc, data)
                } else {
                    Payload::CertReq(enc, data)
                }
            }
            PayloadType::AUTH => {
                let method = AuthMethod(r.u8("auth method")?);
                r.take(3, "AUTH reserved")?;
                Payload::Auth(AuthPayload {
                    method,
                    data: r.rest().to_vec(),
                })
            }
            PayloadType::NONCE => Payload::Nonce(r.rest().to_vec()),
            PayloadType::NOTIFY => {
                let protocol = ProtocolId(r.u8("notify protocol")?);
                let spi_size = r.u8("notify SPI size")?;
                let nty = NotifyType(r.u16("notify type")?);
                let spi = r.take(usize::from(spi_size), "notify SPI")?.to_vec();
                Payload::Notify(NotifyPayload {
                    protocol,
                    spi,
                    ty: nty,
                    data: r.rest().to_vec(),
                })
            }
            PayloadType::DELETE => {
                let protocol = ProtocolId(r.u8("delete protocol")?);
                let spi_size = r.u8("delete SPI size")?;
                let n = r.u16("delete SPI count")?;
                let mut spis = Vec::with_capacity(usize::from(n).min(r.remaining()));
                for _ in 0..n {
                    spis.push(r.take(usize::from(spi_size), "delete SPI")?.to_vec());
                }
                r.expect_end("delete payload")?;
                Payload::Delete(DeletePayload {
                    protocol,
                    spi_size,
                    spis,
                })
            }
            PayloadType::VENDOR_ID => Payload::VendorId(r.rest().to_vec()),
            PayloadType::TSI | PayloadType::TSR => {
                let ts = decode_selectors(&mut r)?;
                if ty == PayloadType::TSI {
                    Payload::TsI(ts)
                } else {
                    Payload::TsR(ts)
                }
            }
            PayloadType::SK => Payload::Sk {
                first_inner: next,
                body: r.rest().to_vec(),
            },
            PayloadType::SKF => {
                let fragment = r.u16("SKF fragment number")?;
                let total = r.u16("SKF total fragments")?;
                if fragment == 0 || fragment > total {
                    return Err(DecodeError::InvalidSyntax("SKF fragment number"));
                }
                Payload::Skf {
                    first_inner: next,
                    fragment,
                    total,
                    body: r.rest().to_vec(),
                }
            }
            _ => Payload::Unknown {
                ty,
                critical,
                data: r.rest().to_vec(),
            },
        };
        Ok(p)
    }

    /// Appends the body (without generic header).
    fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Sa(props) => encode_proposals(props, out),
            Payload::Ke(ke) => {
                out.extend_from_slice(&ke.group.0.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&ke.data);
            }
            Payload::IdI(id) | Payload::IdR(id) => out.extend_from_slice(&id.body()),
            Payload::Cert(enc, d) | Payload::CertReq(enc, d) => {
                out.push(enc.0);
                out.extend_from_slice(d);
            }
            Payload::Auth(a) => {
                out.push(a.method.0);
                out.extend_from_slice(&[0, 0, 0]);
                out.extend_from_slice(&a.data);
            }
            Payload::Nonce(d) | Payload::VendorId(d) => out.extend_from_slice(d),
            Payload::Notify(n) => {
                out.push(n.protocol.0);
                out.push(clamp_u8(n.spi.len()));
                out.extend_from_slice(&n.ty.0.to_be_bytes());
                out.extend_from_slice(&n.spi);
                out.extend_from_slice(&n.data);
            }
            Payload::Delete(d) => {
                out.push(d.protocol.0);
                out.push(d.spi_size);
                out.extend_from_slice(&clamp_u16(d.spis.len()).to_be_bytes());
                for s in &d.spis {
                    out.extend_from_slice(s);
                }
            }
            Payload::TsI(ts) | Payload::TsR(ts) => encode_selectors(ts, out),
            Payload::Sk { body, .. } => out.extend_from_slice(body),
            Payload::Skf {
                fragment,
                total,
                body,
                ..
            } => {
                out.extend_from_slice(&fragment.to_be_bytes());
                out.extend_from_slice(&total.to_be_bytes());
                out.extend_from_slice(body);
            }
            Payload::Unknown { data, .. } => out.extend_from_slice(data),
        }
    }
}

fn clamp_u8(n: usize) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX)
}
fn clamp_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn decode_proposals(r: &mut Reader<'_>) -> Result<Vec<Proposal>, DecodeError> {
    let mut out = Vec::new();
    loop {
        let last = r.u8("proposal last")?;
        r.u8("proposal reserved")?;
        let len = usize::from(r.u16("proposal length")?);
        if len < 8 {
            return Err(DecodeError::LengthMismatch {
                what: "proposal",
                declared: len,
                actual: 8,
            });
        }
        if len - 4 > r.remaining() {
            return Err(DecodeError::LengthMismatch {
                what: "proposal",
                declared: len,
                actual: r.remaining() + 4,
            });
        }
        let mut p = r.sub(len - 4, "proposal body")?;
        let num = p.u8("proposal number")?;
        let protocol = ProtocolId(p.u8("proposal protocol")?);
        let spi_size = p.u8("proposal SPI size")?;
        let ntrans = p.u8("proposal transform count")?;
        let spi = p.take(usize::from(spi_size), "proposal SPI")?.to_vec();
        let mut transforms = Vec::with_capacity(usize::from(ntrans));
        for i in 0..ntrans {
            let tlast = p.u8("transform last")?;
            p.u8("transform reserved")?;
            let tlen = usize::from(p.u16("transform length")?);
            if tlen < 8 || tlen - 4 > p.remaining() {
                return Err(DecodeError::LengthMismatch {
                    what: "transform",
                    declared: tlen,
                    actual: p.remaining() + 4,
                });
            }
            let mut t = p.sub(tlen - 4, "transform body")?;
            let ty = TransformType(t.u8("transform type")?);
            t.u8("transform reserved2")?;
            let id = t.u16("transform id")?;
            let mut attrs = Vec::new();
            while !t.is_empty() {
                let at = t.u16("attribute type")?;
                if at & 0x8000 != 0 {
                    attrs.push(Attribute::Tv(
                        AttributeType(at & 0x7fff),
                        t.u16("attribute value")?,
                    ));
                } else {
                    let alen = usize::from(t.u16("attribute length")?);
                    attrs.push(Attribute::Tlv(
                        AttributeType(at),
                        t.take(alen, "attribute value")?.to_vec(),
                    ));
                }
            }
            let is_last = i + 1 == ntrans;
            if (tlast == 0) != is_last || (tlast != 0 && tlast != 3) {
                return Err(DecodeError::InvalidSyntax(
                    "transform last-substructure flag",
                ));
            }
            transforms.push(Transform { ty, id, attrs });
        }
        p.expect_end("proposal")?;
        out.push(Proposal {
            num,
            protocol,
            spi,
            transforms,
        });
        match last {
            0 => break,
            2 => {}
            _ => {
                return Err(DecodeError::InvalidSyntax(
                    "proposal last-substructure flag",
                ))
            }
        }
    }
    r.expect_end("SA payload")?;
    Ok(out)
}

fn encode_proposals(props: &[Proposal], out: &mut Vec<u8>) {
    for (pi, p) in props.iter().enumerate() {
        let start = out.len();
        out.push(if pi + 1 == props.len() { 0 } else { 2 });
        out.push(0);
        out.extend_from_slice(&[0, 0]);
        out.push(p.num);
        out.push(p.protocol.0);
        out.push(clamp_u8(p.spi.len()));
        out.push(clamp_u8(p.transforms.len()));
        out.extend_from_slice(&p.spi);
        for (ti, t) in p.transforms.iter().enumerate() {
            let tstart = out.len();
            out.push(if ti + 1 == p.transforms.len() { 0 } else { 3 });
            out.push(0);
            out.extend_from_slice(&[0, 0]);
            out.push(t.ty.0);
            out.push(0);
            out.extend_from_slice(&t.id.to_be_bytes());
            for a in &t.attrs {
                match a {
                    Attribute::Tv(ty, v) => {
                        out.extend_from_slice(&(ty.0 | 0x8000).to_be_bytes());
                        out.extend_from_slice(&v.to_be_bytes());
                    }
                    Attribute::Tlv(ty, v) => {
                        out.extend_from_slice(&(ty.0 & 0x7fff).to_be_bytes());
                        out.extend_from_slice(&clamp_u16(v.len()).to_be_bytes());
                        out.extend_from_slice(v);
                    }
                }
            }
            patch_len(out, tstart);
        }
        patch_len(out, start);
    }
}

/// Writes the length of the structure that starts at `start` into its
/// two-octet length field at `start + 2` (reserved by the caller).
fn patch_len(out: &mut [u8], start: usize) {
    let v = clamp_u16(out.len().saturating_sub(start)).to_be_bytes();
    if let Some(s) = out.get_mut(start + 2..start + 4) {
        s.copy_from_slice(&v);
    }
}

fn decode_selectors(r: &mut Reader<'_>) -> Result<Vec<TrafficSelector>, DecodeError> {
    let n = r.u8("TS count")?;
    r.take(3, "TS reserved")?;
    let mut out = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let ts_type = TsType(r.u8("TS type")?);
        let ip_proto = r.u8("TS protocol")?;
        let len = usize::from(r.u16("TS length")?);
        if len < 8 || len - 4 > r.remaining() {
            return Err(DecodeError::LengthMismatch {
                what: "traffic selector",
                declared: len,
                actual: r.remaining() + 4,
            });
        }
        let mut t = r.sub(len - 4, "traffic selector")?;
        let start_port = t.u16("TS start port")?;
        let end_port = t.u16("TS end port")?;
        let alen = match ts_type {
            TsType::IPV4_ADDR_RANGE => Some(4),
            TsType::IPV6_ADDR_RANGE => Some(16),
            _ => None,
        };
        let (start, end) = match alen {
            Some(a) => {
                if len != 8 + 2 * a {
                    return Err(DecodeError::LengthMismatch {
                        what: "traffic selector",
                        declared: len,
                        actual: 8 + 2 * a,
                    });
                }
                (
                    t.take(a, "TS start address")?.to_vec(),
                    t.take(a, "TS end address")?.to_vec(),
                )
            }
            None => (t.rest().to_vec(), Vec::new()),
        };
        t.expect_end("traffic selector")?;
        out.push(TrafficSelector {
            ts_type,
            ip_proto,
            start_port,
            end_port,
            start,
            end,
        });
    }
    r.expect_end("TS payload")?;
    Ok(out)
}

fn encode_selectors(ts: &[TrafficSelector], out: &mut Vec<u8>) {
    out.push(clamp_u8(ts.len()));
    out.extend_from_slice(&[0, 0, 0]);
    for t in ts {
        out.push(t.ts_type.0);
        out.push(t.ip_proto);
        out.extend_from_slice(&clamp_u16(8 + t.start.len() + t.end.len()).to_be_bytes());
        out.extend_from_slice(&t.start_port.to_be_bytes());
        out.extend_from_slice(&t.end_port.to_be_bytes());
        out.extend_from_slice(&t.start);
        out.extend_from_slice(&t.end);
    }
}

/// Decodes a payload chain starting with type `first`. Stops after an SK/SKF
/// payload (which must be last). Returns the payloads and, if an SK/SKF
/// payload was found, the offset of its generic header within `buf`.
pub fn decode_chain(
    first: PayloadType,
    buf: &[u8],
) -> Result<(Vec<Payload>, Option<usize>), DecodeError> {
    let mut r = Reader::new(buf);
    let mut next = first;
    let mut out = Vec::new();
    let mut sk_at = None;
    while next != PayloadType::NONE {
        let at = r.position();
        let ty = next;
        next = PayloadType(r.u8("next payload")?);
        let crit = r.u8("critical flag")? & 0x80 != 0;
        let len = usize::from(r.u16("payload length")?);
        if len < GENERIC_HEADER_LEN || len - GENERIC_HEADER_LEN > r.remaining() {
            return Err(DecodeError::LengthMismatch {
                what: "payload",
                declared: len,
                actual: r.remaining() + GENERIC_HEADER_LEN,
            });
        }
        let body = r.sub(len - GENERIC_HEADER_LEN, "payload body")?;
        let p = Payload::decode_body(ty, crit, next, body)?;
        let enc = p.is_encrypted();
        out.push(p);
        if enc {
            sk_at = Some(at);
            r.expect_end("encrypted payload (must be last)")?;
            break;
        }
    }
    r.expect_end("payload chain")?;
    Ok((out, sk_at))
}

/// Encodes a payload chain; returns the first payload's type and appends the
/// bytes. An SK/SKF payload must be the last one.
pub fn encode_chain(payloads: &[Payload], out: &mut Vec<u8>) -> PayloadType {
    for (i, p) in payloads.iter().enumerate() {
        let next = match p {
            Payload::Sk { first_inner, .. } | Payload::Skf { first_inner, .. } => *first_inner,
            _ => payloads
                .get(i + 1)
                .map(Payload::payload_type)
                .unwrap_or(PayloadType::NONE),
        };
        let start = out.len();
        out.push(next.0);
        out.push(if p.critical() { 0x80 } else { 0 });
        out.extend_from_slice(&[0, 0]);
        p.encode_body(out);
        patch_len(out, start);
    }
    payloads
        .first()
        .map(Payload::payload_type)
        .unwrap_or(PayloadType::NONE)
}

/// A decoded IKE message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Header (its `length` and `next_payload` are recomputed on encode).
    pub header: Header,
    /// Payloads in order; if encrypted, the SK/SKF payload is last.
    pub payloads: Vec<Payload>,
    /// Offset of the SK/SKF generic header within the datagram, if any.
    pub sk_offset: Option<usize>,
}

impl Message {
    /// Decodes a whole datagram; its length must equal the header's length.
    pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader::new(buf);
        let header = Header::decode(&mut r)?;
        let declared = usize::try_from(header.length).unwrap_or(usize::MAX);
        if declared != buf.len() {
            return Err(DecodeError::LengthMismatch {
                what: "IKE message",
                declared,
                actual: buf.len(),
            });
        }
        let (payloads, sk) = decode_chain(header.next_payload, r.rest())?;
        Ok(Message {
            header,
            payloads,
            sk_offset: sk.map(|o| o + HEADER_LEN),
        })
    }

    /// Encodes, fixing up `next_payload` and `length` in the header.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let first = encode_chain(&self.payloads, &mut body);
        let mut h = self.header.clone();
        h.next_payload = first;
        h.length = u32::try_from(HEADER_LEN + body.len()).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        h.encode(&mut out);
        out.extend_from_slice(&body);
        out
    }
}

/// Notification data of `IKEV2_MESSAGE_ID_SYNC` (RFC 6311 §5): a 32-bit nonce the
/// responder echoes, then the sender's `EXPECTED_SEND_REQ_MESSAGE_ID` (the ID of its next
/// request) and `EXPECTED_RECV_REQ_MESSAGE_ID` (the ID it expects on the other side's next
/// request), each 32 bits in network byte order: exactly 12 octets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageIdSync {
    /// Nonce Data: chosen by the request's sender, echoed in the response.
    pub nonce: u32,
    /// EXPECTED_SEND_REQ_MESSAGE_ID.
    pub send: u32,
    /// EXPECTED_RECV_REQ_MESSAGE_ID.
    pub recv: u32,
}

impl MessageIdSync {
    /// Length of the notification data.
    pub const LEN: usize = 12;

    /// The notification data.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::LEN);
        v.extend_from_slice(&self.nonce.to_be_bytes());
        v.extend_from_slice(&self.send.to_be_bytes());
        v.extend_from_slice(&self.recv.to_be_bytes());
        v
    }

    /// Parses notification data; anything but exactly 12 octets is refused.
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data);
        let nonce = r.u32("MESSAGE_ID_SYNC nonce")?;
        let send = r.u32("EXPECTED_SEND_REQ_MESSAGE_ID")?;
        let recv = r.u32("EXPECTED_RECV_REQ_MESSAGE_ID")?;
        r.expect_end("MESSAGE_ID_SYNC data")?;
        Ok(MessageIdSync { nonce, send, recv })
    }
}

/// Fuzz body shared by the cargo-fuzz target and the corpus unit test:
/// decoding must not panic, and anything that decodes must re-encode to
/// bytes that decode to the same message. Also runs the inner-chain decoder
/// over the same bytes.
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(m) = Message::decode(data) {
        let again = m.encode();
        let m2 = Message::decode(&again);
        assert!(m2.is_ok(), "re-encoded message failed to decode: {m2:?}");
        if let Ok(mut m2) = m2 {
            m2.header.length = m.header.length;
            m2.header.next_payload = m.header.next_payload;
            m2.sk_offset = m.sk_offset;
            assert_eq!(m2, m, "decode -> encode -> decode changed the message");
        }
    }
    if let Some((&first, rest)) = data.split_first() {
        if let Ok((p, _)) = decode_chain(PayloadType(first), rest) {
            let mut out = Vec::new();
            let t = encode_chain(&p, &mut out);
            let again = decode_chain(t, &out);
            assert_eq!(again.map(|x| x.0), Ok(p), "inner chain round trip");
        }
    }
}

#[cfg(test)]
mod tests;
