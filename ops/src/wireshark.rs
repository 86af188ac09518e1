//! Wireshark key export: ESP SAs in Wireshark's `esp_sa` UAT format, IKE SAs in its
//! `ikev2_decryption_table` format.
//!
//! `vpnctl diagnose vpn ike export-keys --wireshark DIR` writes `DIR/esp_sa`, one record per
//! direction of every CHILD SA ikemgr has installed (negotiated or manual-key), taken from
//! ikemgr's snapshot, and `DIR/ikev2_decryption_table`, one record per established IKE SA,
//! from ikemgr's `ike-keys` view. DIR can be used as Wireshark's configuration directory
//! (`WIRESHARK_CONFIG_DIR=DIR wireshark`), or the files copied into a profile directory.
//!
//! Record layout (Wireshark's ESP preferences, "ESP SAs" table): protocol, source address,
//! destination address, SPI, encryption algorithm, encryption key, authentication algorithm,
//! authentication key, each field a quoted string. Keys are `0x`-prefixed hex; for AES-GCM
//! and ChaCha20-Poly1305 the key includes the 4-byte salt (RFC 4106 §8.1, RFC 7634 §2).

use bus_schema::schema::{ChildSaInfo, EspEncap};

/// How Wireshark names one of our transforms: (encryption, key bytes, authentication,
/// key bytes). Key lengths per RFC 7296 §2.17 KEYMAT order: encryption (with salt) first.
fn wireshark_algorithms(transform: &str) -> Option<(&'static str, usize, &'static str, usize)> {
    const GCM16: &str = "AES-GCM with 16 octet ICV [RFC4106]";
    const CBC: &str = "AES-CBC [RFC3602]";
    const SHA1: &str = "HMAC-SHA-1-96 [RFC2404]";
    const SHA256: &str = "HMAC-SHA-256-128 [RFC4868]";
    const SHA512: &str = "HMAC-SHA-512-256 [RFC4868]";
    Some(match transform {
        "aes128gcm" => (GCM16, 16 + 4, "NULL", 0),
        "aes256gcm" => (GCM16, 32 + 4, "NULL", 0),
        // Wireshark 4.2 and later; older versions ignore the record.
        "chacha20poly1305" => ("ChaCha20 with Poly1305 [RFC7634]", 32 + 4, "NULL", 0),
        "aes128-sha1" => (CBC, 16, SHA1, 20),
        "aes128-sha256" => (CBC, 16, SHA256, 32),
        "aes128-sha512" => (CBC, 16, SHA512, 64),
        "aes256-sha1" => (CBC, 32, SHA1, 20),
        "aes256-sha256" => (CBC, 32, SHA256, 32),
        "aes256-sha512" => (CBC, 32, SHA512, 64),
        _ => return None,
    })
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * bytes.len());
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Outer source and destination of packets sent with `spi`: outbound SAs go from us to the
/// peer, inbound ones from the peer to us. A wildcard (`*`) matches any address, which
/// Wireshark accepts and which covers an unspecified local address.
fn record(
    proto: &str,
    src: &str,
    dst: &str,
    spi: u32,
    keys: &[u8],
    t: &str,
) -> Result<String, String> {
    let (enc, enc_len, auth, auth_len) =
        wireshark_algorithms(t).ok_or_else(|| format!("transform {t:?} has no Wireshark name"))?;
    if keys.len() != enc_len + auth_len {
        return Err(format!(
            "SPI {spi:08x}: {} key bytes, {t} needs {}",
            keys.len(),
            enc_len + auth_len
        ));
    }
    let (ek, ak) = keys.split_at(enc_len);
    let ak = if auth_len == 0 {
        String::new()
    } else {
        hex(ak)
    };
    Ok(format!(
        "\"{proto}\",\"{src}\",\"{dst}\",\"0x{spi:08x}\",\"{enc}\",\"{}\",\"{auth}\",\"{ak}\"",
        hex(ek)
    ))
}

fn addr_or_any(a: &str) -> &str {
    if a.is_empty() || a == "0.0.0.0" || a == "::" {
        "*"
    } else {
        a
    }
}

/// The `esp_sa` file for `sas`, and the number of records in it. An SA whose transform or
/// key length is unknown is skipped with a comment line naming it.
pub fn esp_sa_file(sas: &[ChildSaInfo]) -> (String, usize) {
    let mut out = String::from(
        "# Wireshark ESP SAs (esp_sa UAT) exported by vpnctl; contains keys: keep it secret.\n",
    );
    let mut n = 0;
    for sa in sas {
        let proto = if sa.local.contains(':') {
            "IPv6"
        } else {
            "IPv4"
        };
        // Our own address is a wildcard: on the wire it can differ from the SA's local
        // address (a NAT in front of us, or replies leaving from the outgoing interface's
        // address rather than local-gw); the SPI and the peer's address identify the SA.
        let local = "*";
        let remote = addr_or_any(&sa.remote);
        let encap = match sa.encap {
            EspEncap::None => "ESP",
            EspEncap::Udp { .. } => "ESP in UDP",
        };
        out.push_str(&format!(
            "# {} ({}) {encap} {} in={:08x} out={:08x}\n",
            sa.tunnel, sa.phase2, sa.transform, sa.spi_in, sa.spi_out
        ));
        for (src, dst, spi, keys) in [
            (remote, local, sa.spi_in, &sa.keys_in),
            (local, remote, sa.spi_out, &sa.keys_out),
        ] {
            match record(proto, src, dst, spi, keys, &sa.transform) {
                Ok(line) => {
                    out.push_str(&line);
                    out.push('\n');
                    n += 1;
                }
                Err(e) => out.push_str(&format!("# skipped: {e}\n")),
            }
        }
    }
    (out, n)
}

/// Wireshark's IKEv2 names of ikemgr's `encr` and `integ` spellings (the `ike-keys` view).
fn ikev2_algorithms(encr: &str, integ: Option<&str>) -> Option<(&'static str, &'static str)> {
    let e = match encr {
        "aes-cbc-128" => "AES-CBC-128 [RFC3602]",
        "aes-cbc-192" => "AES-CBC-192 [RFC3602]",
        "aes-cbc-256" => "AES-CBC-256 [RFC3602]",
        "aes-gcm-128" => "AES-GCM-128 with 16 octet ICV [RFC5282]",
        "aes-gcm-192" => "AES-GCM-192 with 16 octet ICV [RFC5282]",
        "aes-gcm-256" => "AES-GCM-256 with 16 octet ICV [RFC5282]",
        _ => return None,
    };
    let i = match integ {
        None => "NONE [RFC4306]",
        Some("hmac-sha1-96") => "HMAC_SHA1_96 [RFC2404]",
        Some("hmac-sha256-128") => "HMAC_SHA2_256_128 [RFC4868]",
        Some("hmac-sha384-192") => "HMAC_SHA2_384_192 [RFC4868]",
        Some("hmac-sha512-256") => "HMAC_SHA2_512_256 [RFC4868]",
        Some(_) => return None,
    };
    Some((e, i))
}

/// The `ikev2_decryption_table` file for ikemgr's `ike-keys` view, and its record count.
/// Fields: initiator's SPI, responder's SPI, SK_ei, SK_er, encryption algorithm, SK_ai,
/// SK_ar, integrity algorithm (SPIs and keys as bare hex). An SA with an algorithm
/// Wireshark cannot decrypt (ChaCha20-Poly1305) is skipped with a comment.
pub fn ikev2_file(view: &serde_json::Value) -> (String, usize) {
    let mut out = String::from(
        "# Wireshark IKEv2 decryption table exported by vpnctl; contains keys: keep it secret.\n",
    );
    let mut n = 0;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    for sa in view.as_array().into_iter().flatten() {
        let (encr, integ) = (s(&sa["encr"]), sa["integ"].as_str());
        out.push_str(&format!(
            "# {} {}/{} {encr} {}\n",
            s(&sa["name"]),
            s(&sa["spi_i"]),
            s(&sa["spi_r"]),
            integ.unwrap_or("aead")
        ));
        let Some((e, i)) = ikev2_algorithms(&encr, integ) else {
            out.push_str("# skipped: Wireshark cannot decrypt this algorithm\n");
            continue;
        };
        // Byte fields are bare hex in a UAT file; an empty one is an empty quoted string.
        let b = |v: &serde_json::Value| {
            let h = s(v);
            if h.is_empty() || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
                "\"\"".to_string()
            } else {
                h
            }
        };
        out.push_str(&format!(
            "{},{},{},{},\"{e}\",{},{},\"{i}\"\n",
            b(&sa["spi_i"]),
            b(&sa["spi_r"]),
            b(&sa["sk_ei"]),
            b(&sa["sk_er"]),
            b(&sa["sk_ai"]),
            b(&sa["sk_ar"]),
        ));
        n += 1;
    }
    (out, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_schema::schema::SaLifetime;

    fn sa(transform: &str, key_len: usize) -> ChildSaInfo {
        ChildSaInfo {
            tunnel: "vpn1_1".into(),
            phase1: "vpn1".into(),
            phase2: "vpn1".into(),
            spi_in: 0xc0ffee01,
            spi_out: 0x1234,
            transform: transform.into(),
            esn: false,
            keys_in: (0..key_len as u8).collect(),
            keys_out: (0..key_len as u8).rev().collect(),
            local: "192.0.2.1".into(),
            remote: "198.51.100.7".into(),
            encap: EspEncap::None,
            local_ts: vec![],
            remote_ts: vec![],
            replay_window: 64,
            lifetime: SaLifetime::default(),
            initial_seq: 1,
            outbound: true,
        }
    }

    #[test]
    fn gcm_records_carry_key_and_salt_per_direction() {
        let (text, n) = esp_sa_file(&[sa("aes128gcm", 20)]);
        assert_eq!(n, 2);
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines[0],
            "\"IPv4\",\"198.51.100.7\",\"*\",\"0xc0ffee01\",\"AES-GCM with 16 octet ICV [RFC4106]\",\"0x000102030405060708090a0b0c0d0e0f10111213\",\"NULL\",\"\""
        );
        assert!(lines[1].starts_with(
            "\"IPv4\",\"*\",\"198.51.100.7\",\"0x00001234\",\"AES-GCM with 16 octet ICV [RFC4106]\",\"0x131211"
        ));
    }

    #[test]
    fn cbc_hmac_splits_the_key_block() {
        let (text, n) = esp_sa_file(&[sa("aes256-sha256", 64)]);
        assert_eq!(n, 2);
        let first = text.lines().find(|l| !l.starts_with('#')).unwrap();
        let fields: Vec<&str> = first.split("\",\"").collect();
        assert_eq!(fields[4], "AES-CBC [RFC3602]");
        assert_eq!(fields[5].len(), 2 + 64);
        assert_eq!(fields[6], "HMAC-SHA-256-128 [RFC4868]");
        assert_eq!(fields[7].trim_end_matches('"').len(), 2 + 64);
    }

    #[test]
    fn ikev2_records_name_wireshark_algorithms() {
        let view = serde_json::json!([
            {"name": "vpn1_1", "spi_i": "0011223344556677", "spi_r": "8899aabbccddeeff",
             "encr": "aes-gcm-128", "integ": null, "sk_ei": "aa", "sk_er": "bb", "sk_ai": "", "sk_ar": ""},
            {"name": "hub", "spi_i": "01", "spi_r": "02", "encr": "aes-cbc-256",
             "integ": "hmac-sha256-128", "sk_ei": "e1", "sk_er": "e2", "sk_ai": "a1", "sk_ar": "a2"},
            {"name": "cc", "spi_i": "03", "spi_r": "04", "encr": "chacha20poly1305", "integ": null}
        ]);
        let (text, n) = ikev2_file(&view);
        assert_eq!(n, 2);
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines[0],
            "0011223344556677,8899aabbccddeeff,aa,bb,\"AES-GCM-128 with 16 octet ICV [RFC5282]\",\"\",\"\",\"NONE [RFC4306]\""
        );
        assert_eq!(
            lines[1],
            "01,02,e1,e2,\"AES-CBC-256 [RFC3602]\",a1,a2,\"HMAC_SHA2_256_128 [RFC4868]\""
        );
        assert!(text.contains("# skipped"));
    }

    #[test]
    fn wrong_key_length_or_unknown_transform_is_skipped_not_guessed() {
        let (text, n) = esp_sa_file(&[sa("aes128gcm", 16), sa("rot13", 4)]);
        assert_eq!(n, 0);
        assert_eq!(text.matches("# skipped:").count(), 4);
    }
}
