//! Wire code points as newtypes with named constants (IANA "IKEv2
//! Parameters" registry). Unknown codes are kept as their number so a
//! decoded message re-encodes unchanged.

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident($repr:ty) { $($(#[$cm:meta])* $c:ident = $v:expr,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub $repr);
        #[allow(missing_docs)]
        impl $name {
            $($(#[$cm])* pub const $c: $name = $name($v);)*
            /// The registry name, when this code is one we know.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($v => Some(stringify!($c)),)*
                    _ => None,
                }
            }
        }
        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}({})", stringify!($name), self.0),
                }
            }
        }
        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::Debug::fmt(self, f)
            }
        }
        impl From<$repr> for $name {
            fn from(v: $repr) -> Self { $name(v) }
        }
    };
}

wire_enum! {
    /// Exchange type, RFC 7296 §3.1.
    ExchangeType(u8) {
        IKE_SA_INIT = 34,
        IKE_AUTH = 35,
        CREATE_CHILD_SA = 36,
        INFORMATIONAL = 37,
    }
}

wire_enum! {
    /// Next-payload type, RFC 7296 §3.2; SKF from RFC 7383 §2.5.
    PayloadType(u8) {
        NONE = 0,
        SA = 33,
        KE = 34,
        IDI = 35,
        IDR = 36,
        CERT = 37,
        CERTREQ = 38,
        AUTH = 39,
        NONCE = 40,
        NOTIFY = 41,
        DELETE = 42,
        VENDOR_ID = 43,
        TSI = 44,
        TSR = 45,
        SK = 46,
        CP = 47,
        EAP = 48,
        SKF = 53,
    }
}

wire_enum! {
    /// Protocol ID in proposals, notifies and deletes, RFC 7296 §3.3.1.
    ProtocolId(u8) {
        NONE = 0,
        IKE = 1,
        AH = 2,
        ESP = 3,
    }
}

wire_enum! {
    /// Transform type, RFC 7296 §3.3.2.
    TransformType(u8) {
        ENCR = 1,
        PRF = 2,
        INTEG = 3,
        DH = 4,
        ESN = 5,
    }
}

wire_enum! {
    /// Transform IDs for type 1 (ENCR), RFC 7296 §3.3.2, RFC 5282 §7, RFC 7634 §4.
    EncrId(u16) {
        DES3 = 3,
        NULL = 11,
        AES_CBC = 12,
        AES_CTR = 13,
        AES_GCM_8 = 18,
        AES_GCM_12 = 19,
        AES_GCM_16 = 20,
        CHACHA20_POLY1305 = 28,
    }
}

wire_enum! {
    /// Transform IDs for type 2 (PRF), RFC 7296 §3.3.2, RFC 4868.
    PrfId(u16) {
        HMAC_MD5 = 1,
        HMAC_SHA1 = 2,
        AES128_XCBC = 4,
        HMAC_SHA2_256 = 5,
        HMAC_SHA2_384 = 6,
        HMAC_SHA2_512 = 7,
    }
}

wire_enum! {
    /// Transform IDs for type 3 (INTEG), RFC 7296 §3.3.2, RFC 4868.
    IntegId(u16) {
        NONE = 0,
        HMAC_MD5_96 = 1,
        HMAC_SHA1_96 = 2,
        AES_XCBC_96 = 5,
        HMAC_SHA2_256_128 = 12,
        HMAC_SHA2_384_192 = 13,
        HMAC_SHA2_512_256 = 14,
    }
}

wire_enum! {
    /// Transform IDs for type 4 (DH group), RFC 7296 §3.3.2, RFC 3526,
    /// RFC 5903, RFC 8031.
    DhGroup(u16) {
        NONE = 0,
        MODP768 = 1,
        MODP1024 = 2,
        MODP1536 = 5,
        MODP2048 = 14,
        MODP3072 = 15,
        MODP4096 = 16,
        ECP256 = 19,
        ECP384 = 20,
        ECP521 = 21,
        CURVE25519 = 31,
    }
}

wire_enum! {
    /// Transform IDs for type 5 (ESN), RFC 7296 §3.3.2.
    EsnId(u16) {
        NO_ESN = 0,
        ESN = 1,
    }
}

wire_enum! {
    /// Transform attribute type, RFC 7296 §3.3.5 (without the AF bit).
    AttributeType(u16) {
        KEY_LENGTH = 14,
    }
}

wire_enum! {
    /// Identification type, RFC 7296 §3.5.
    IdType(u8) {
        IPV4_ADDR = 1,
        FQDN = 2,
        RFC822_ADDR = 3,
        IPV6_ADDR = 5,
        DER_ASN1_DN = 9,
        DER_ASN1_GN = 10,
        KEY_ID = 11,
    }
}

wire_enum! {
    /// Authentication method, RFC 7296 §3.8, RFC 7427.
    AuthMethod(u8) {
        RSA_SIG = 1,
        SHARED_KEY_MIC = 2,
        DSS_SIG = 3,
        ECDSA_SHA256_P256 = 9,
        ECDSA_SHA384_P384 = 10,
        ECDSA_SHA512_P521 = 11,
        DIGITAL_SIGNATURE = 14,
    }
}

wire_enum! {
    /// Certificate encoding, RFC 7296 §3.6.
    CertEncoding(u8) {
        PKCS7_X509 = 1,
        X509_SIG = 4,
        CRL = 7,
        HASH_URL_X509 = 12,
    }
}

wire_enum! {
    /// Traffic selector type, RFC 7296 §3.13.1.
    TsType(u8) {
        IPV4_ADDR_RANGE = 7,
        IPV6_ADDR_RANGE = 8,
    }
}

wire_enum! {
    /// Notify message type, RFC 7296 §3.10.1 (errors below 16384, status
    /// above), RFC 7383 §2.3, RFC 6311 §3.
    NotifyType(u16) {
        UNSUPPORTED_CRITICAL_PAYLOAD = 1,
        INVALID_IKE_SPI = 4,
        INVALID_MAJOR_VERSION = 5,
        INVALID_SYNTAX = 7,
        INVALID_MESSAGE_ID = 9,
        INVALID_SPI = 11,
        NO_PROPOSAL_CHOSEN = 14,
        INVALID_KE_PAYLOAD = 17,
        AUTHENTICATION_FAILED = 24,
        SINGLE_PAIR_REQUIRED = 34,
        NO_ADDITIONAL_SAS = 35,
        INTERNAL_ADDRESS_FAILURE = 36,
        FAILED_CP_REQUIRED = 37,
        TS_UNACCEPTABLE = 38,
        INVALID_SELECTORS = 39,
        TEMPORARY_FAILURE = 43,
        CHILD_SA_NOT_FOUND = 44,
        INITIAL_CONTACT = 16384,
        SET_WINDOW_SIZE = 16385,
        ADDITIONAL_TS_POSSIBLE = 16386,
        IPCOMP_SUPPORTED = 16387,
        NAT_DETECTION_SOURCE_IP = 16388,
        NAT_DETECTION_DESTINATION_IP = 16389,
        COOKIE = 16390,
        USE_TRANSPORT_MODE = 16391,
        HTTP_CERT_LOOKUP_SUPPORTED = 16392,
        REKEY_SA = 16393,
        ESP_TFC_PADDING_NOT_SUPPORTED = 16394,
        NON_FIRST_FRAGMENTS_ALSO = 16395,
        MOBIKE_SUPPORTED = 16396,
        /// RFC 6311 §3 (IANA 16420): announced in IKE_AUTH by a peer that can answer
        /// message ID synchronisation requests.
        IKEV2_MESSAGE_ID_SYNC_SUPPORTED = 16420,
        IKEV2_REPLAY_COUNTER_SYNC_SUPPORTED = 16421,
        /// RFC 6311 §5: alone in an INFORMATIONAL with message ID 0; data in
        /// [`super::MessageIdSync`].
        IKEV2_MESSAGE_ID_SYNC = 16422,
        IPSEC_REPLAY_COUNTER_SYNC = 16423,
        IKEV2_FRAGMENTATION_SUPPORTED = 16430,
        SIGNATURE_HASH_ALGORITHMS = 16431,
    }
}

impl NotifyType {
    /// Error notifies are the types below 16384 (RFC 7296 §3.10.1).
    pub fn is_error(self) -> bool {
        self.0 < 16384
    }
}
