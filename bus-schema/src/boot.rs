//! Boot ids: 128-bit random values, one per process start.
//!
//! Wire form: in MessagePack (a binary serializer) a boot id is `bin 8` of exactly 16 bytes,
//! big-endian, so Python reads it as `bytes` and `int.from_bytes(b, "big")` gives the number.
//! In human-readable serializers (JSON views) it is 32 lowercase hex digits. Readers accept
//! either form regardless of the serializer.

use std::fmt;
use std::io::Read;

/// A fresh random boot id from `/dev/urandom`.
pub fn new_boot_id() -> std::io::Result<u128> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(u128::from_be_bytes(b))
}

/// 32 lowercase hex digits, the display form used by tools (`vpnctl status`, `bus-tap`).
pub fn boot_hex(boot: u128) -> String {
    format!("{boot:032x}")
}

fn parse_hex(s: &str) -> Option<u128> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

struct BootVisitor;

impl<'de> serde::de::Visitor<'de> for BootVisitor {
    type Value = u128;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a boot id: 16 big-endian bytes or 32 hex digits")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<u128, E> {
        let arr: [u8; 16] = v
            .try_into()
            .map_err(|_| E::invalid_length(v.len(), &self))?;
        Ok(u128::from_be_bytes(arr))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u128, E> {
        parse_hex(v).ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<u128, A::Error> {
        let mut arr = [0u8; 16];
        for (i, slot) in arr.iter_mut().enumerate() {
            *slot = seq
                .next_element()?
                .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
        }
        if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
            return Err(serde::de::Error::invalid_length(17, &self));
        }
        Ok(u128::from_be_bytes(arr))
    }
}

/// `#[serde(with = "crate::boot::serde_u128")]`
pub mod serde_u128 {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&super::boot_hex(*v))
        } else {
            s.serialize_bytes(&v.to_be_bytes())
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        d.deserialize_any(super::BootVisitor)
    }
}

/// `#[serde(with = "crate::boot::serde_opt_u128")]`: `nil` or a boot id.
pub mod serde_opt_u128 {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u128>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::serde_u128::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    struct OptVisitor;
    impl<'de> serde::de::Visitor<'de> for OptVisitor {
        type Value = Option<u128>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("nil or a boot id")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            super::serde_u128::deserialize(d).map(Some)
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            serde::de::Visitor::visit_bytes(super::BootVisitor, v).map(Some)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            serde::de::Visitor::visit_str(super::BootVisitor, v).map(Some)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            serde::de::Visitor::visit_seq(super::BootVisitor, seq).map(Some)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u128>, D::Error> {
        d.deserialize_any(OptVisitor)
    }
}

/// `#[serde(with = "crate::boot::serde_bin")]`: a byte string (key material) as MessagePack
/// `bin`, or lowercase hex in human-readable formats (JSON). At most [`serde_bin::MAX`] bytes,
/// on both sides: a longer one is an encode error (never published) and a decode error
/// (never an allocation).
pub mod serde_bin {
    use serde::{Deserializer, Serializer};

    /// Longest byte string accepted.
    pub const MAX: usize = 1024;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        super::bounded_bin::serialize(v, s, MAX)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(super::bounded_bin::BinVisitor(MAX))
    }
}

/// `#[serde(with = "crate::boot::serde_blob")]`: like [`serde_bin`] for an opaque state
/// blob (an IKE SA with its CHILD SAs), at most [`serde_blob::MAX`] bytes.
pub mod serde_blob {
    use serde::{Deserializer, Serializer};

    /// Longest blob accepted.
    pub const MAX: usize = 64 * 1024;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        super::bounded_bin::serialize(v, s, MAX)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(super::bounded_bin::BinVisitor(MAX))
    }
}

/// The bounded byte-string codec behind [`serde_bin`] and [`serde_blob`].
mod bounded_bin {
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S, max: usize) -> Result<S::Ok, S::Error> {
        if v.len() > max {
            return Err(serde::ser::Error::custom(format!(
                "byte string of {} bytes, at most {max} allowed",
                v.len()
            )));
        }
        if s.is_human_readable() {
            let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
            s.serialize_str(&hex)
        } else {
            s.serialize_bytes(v)
        }
    }

    /// Accepts a byte string of at most `.0` bytes.
    pub struct BinVisitor(pub usize);
    impl<'de> serde::de::Visitor<'de> for BinVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a byte string of at most {} bytes", self.0)
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            if v.len() > self.0 {
                return Err(E::invalid_length(v.len(), &self));
            }
            Ok(v.to_vec())
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            if v.len() % 2 != 0 || v.len() > 2 * self.0 {
                return Err(E::invalid_length(v.len(), &self));
            }
            (0..v.len())
                .step_by(2)
                .map(|i| {
                    v.get(i..i + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
                })
                .collect()
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                if out.len() == self.0 {
                    return Err(serde::de::Error::invalid_length(out.len() + 1, &self));
                }
                out.push(b);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_parse_is_strict() {
        assert_eq!(parse_hex(&boot_hex(0x0102)), Some(0x0102));
        assert_eq!(parse_hex("12"), None);
        assert_eq!(parse_hex(&"g".repeat(32)), None);
        assert_eq!(parse_hex(&format!("+{}", "0".repeat(31))), None);
    }

    #[test]
    fn boot_ids_differ() {
        let a = new_boot_id().unwrap();
        let b = new_boot_id().unwrap();
        assert_ne!(a, b);
    }
}

#[cfg(test)]
mod bounded_bin_tests {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Key {
        #[serde(with = "super::serde_bin")]
        k: Vec<u8>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Blob {
        #[serde(with = "super::serde_blob")]
        b: Vec<u8>,
    }

    #[test]
    fn key_bound_holds_on_both_sides() {
        let ok = Key {
            k: vec![7; super::serde_bin::MAX],
        };
        let bytes = rmp_serde::to_vec_named(&ok).unwrap();
        assert_eq!(rmp_serde::from_slice::<Key>(&bytes).unwrap(), ok);
        let long = Key {
            k: vec![7; super::serde_bin::MAX + 1],
        };
        assert!(
            rmp_serde::to_vec_named(&long).is_err(),
            "encoded past the bound"
        );
        // A forged frame past the bound is refused, not allocated.
        let forged = rmp_serde::to_vec_named(&Blob {
            b: vec![7; super::serde_bin::MAX + 1],
        })
        .unwrap()
        .into_iter()
        .map(|x| if x == b'b' { b'k' } else { x })
        .collect::<Vec<u8>>();
        assert!(rmp_serde::from_slice::<Key>(&forged).is_err());
    }

    #[test]
    fn blob_carries_an_ike_sa_with_children() {
        // An IKE SA with a few CHILD SAs and CBC+HMAC-512 keys is well past 1 KiB.
        let ok = Blob {
            b: (0..5000u32).map(|i| i as u8).collect(),
        };
        let bytes = rmp_serde::to_vec_named(&ok).unwrap();
        assert_eq!(rmp_serde::from_slice::<Blob>(&bytes).unwrap(), ok);
        let json = serde_json::to_string(&ok).unwrap();
        assert_eq!(serde_json::from_str::<Blob>(&json).unwrap(), ok);
        let long = Blob {
            b: vec![0; super::serde_blob::MAX + 1],
        };
        assert!(rmp_serde::to_vec_named(&long).is_err());
    }
}
