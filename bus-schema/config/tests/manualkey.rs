//! `config vpn ipsec manualkey-interface`: the two mirrored example
//! gateways load, and every refusal points at the offending value.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use haven_config::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load_ok(name: &str) -> Parsed {
    match load(&fixture(name)) {
        Ok(p) => p,
        Err(e) => panic!("{name} did not load:\n{e}"),
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn net(s: &str) -> Ipv4Net {
    let (a, l) = s.split_once('/').unwrap();
    Ipv4Net {
        addr: ip(a),
        prefix_len: l.parse().unwrap(),
    }
}

/// One manual-key tunnel with the given keys; line 1 is the `config` line,
/// line 2 the `edit`, line 3 onwards `lines` one per line, then the fixed
/// keys that are not overridden.
fn mk(lines: &[&str]) -> String {
    let mut s = String::from("config vpn ipsec manualkey-interface\n    edit \"mk1\"\n");
    for l in lines {
        s.push_str("        ");
        s.push_str(l);
        s.push('\n');
    }
    let defaults = [
        ("interface", "set interface \"port1\""),
        ("remote-gw", "set remote-gw 192.0.2.2"),
        ("enc-alg", "set enc-alg aes256gcm"),
        (
            "enc-key",
            "set enc-key 0001020304050607-08090a0b0c0d0e0f-1011121314151617-18191a1b1c1d1e1f-20212223",
        ),
        ("local-spi", "set local-spi 0x1001"),
        ("remote-spi", "set remote-spi 0x2001"),
    ];
    for (key, line) in defaults {
        if !lines
            .iter()
            .any(|l| l.starts_with(&format!("set {key} ")) || *l == format!("unset {key}"))
        {
            s.push_str("        ");
            s.push_str(line);
            s.push('\n');
        }
    }
    s.push_str("    next\nend\n");
    s
}

fn errors(text: &str) -> Vec<ConfigError> {
    match parse(text) {
        Ok(p) => panic!("expected errors, got {:?}", p.config),
        Err(e) => e.errors,
    }
}

fn one_error(text: &str) -> ConfigError {
    let e = errors(text);
    assert_eq!(e.len(), 1, "{e:#?}");
    e.into_iter().next().unwrap()
}

fn expected_of(e: &ConfigError) -> &str {
    match &e.kind {
        ErrorKind::BadValue { expected, .. } => expected,
        ErrorKind::Invalid { message } => message,
        other => panic!("{other:?}"),
    }
}

const GCM_KEY_A: [u8; 20] = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 0x11, 0x12, 0x13, 0x14,
];

#[test]
fn gateway_a_loads_gcm_and_cbc_sha1_tunnels() {
    let p = load_ok("manualkey_gw_a.conf");
    let c = &p.config;
    assert_eq!(c.manualkey.len(), 2);
    assert!(c.phase1.is_empty());

    let gcm = c.manualkey("mk-gcm").unwrap();
    assert_eq!(gcm.interface, "port1");
    assert_eq!(gcm.local_gw, Some(ip("198.51.100.1")));
    assert_eq!(gcm.remote_gw, ip("203.0.113.2"));
    assert_eq!(gcm.proposal.to_string(), "aes128gcm");
    assert_eq!(gcm.proposal.encryption, Encryption::Aes128Gcm);
    assert_eq!(gcm.proposal.hash, None);
    assert_eq!(gcm.enc_key.expose_bytes(), GCM_KEY_A);
    assert!(gcm.auth_key.is_none());
    assert_eq!((gcm.local_spi, gcm.remote_spi), (0x1001, 0x2001));
    assert_eq!(gcm.encapsulation, ManualEncap::Udp);
    assert!(gcm.replay);
    assert_eq!(gcm.src_subnet, net("10.1.0.0/24"));
    assert_eq!(gcm.dst_subnet, net("10.2.0.0/24"));
    assert_eq!(gcm.keymat().expose_bytes(), GCM_KEY_A);

    let cbc = c.manualkey("mk-cbc").unwrap();
    assert_eq!(cbc.proposal.to_string(), "aes128-sha1");
    assert_eq!(cbc.enc_key.len(), 16);
    assert_eq!(cbc.auth_key.as_ref().unwrap().len(), 20);
    assert_eq!(
        cbc.auth_key.as_ref().unwrap().expose_bytes()[..3],
        [0x21, 0x22, 0x23]
    );
    // FortiOS writes SPIs in hex without 0x too.
    assert_eq!((cbc.local_spi, cbc.remote_spi), (0x1002, 0x2002));
    assert_eq!(cbc.encapsulation, ManualEncap::None);
    assert!(!cbc.replay);
    assert_eq!(cbc.src_subnet, Ipv4Net::ANY);
    assert_eq!(cbc.dst_subnet, Ipv4Net::ANY);
    assert_eq!(cbc.local_gw, Some(ip("198.51.100.1")));
    let km = cbc.keymat();
    assert_eq!(km.len(), 36);
    assert_eq!(&km.expose_bytes()[..16], cbc.enc_key.expose_bytes());
    assert_eq!(
        &km.expose_bytes()[16..],
        cbc.auth_key.as_ref().unwrap().expose_bytes()
    );

    // npu-offload is the only warning.
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    assert_eq!(p.warnings[0].key, "npu-offload");
    assert_eq!(c.routes_via("mk-gcm").count(), 1);
}

#[test]
fn the_two_gateways_mirror_each_other() {
    let a = load_ok("manualkey_gw_a.conf").config;
    let b = load_ok("manualkey_gw_b.conf").config;
    assert_eq!(a.manualkey.len(), b.manualkey.len());
    for ma in &a.manualkey {
        let mb = b.manualkey(&ma.name).unwrap();
        assert_eq!(ma.local_spi, mb.remote_spi);
        assert_eq!(ma.remote_spi, mb.local_spi);
        assert_eq!(ma.local_gw, Some(mb.remote_gw));
        assert_eq!(mb.local_gw, Some(ma.remote_gw));
        assert_eq!(ma.src_subnet, mb.dst_subnet);
        assert_eq!(ma.dst_subnet, mb.src_subnet);
        assert_eq!(ma.proposal, mb.proposal);
        assert_eq!(ma.keymat(), mb.keymat());
        assert_eq!(ma.encapsulation, mb.encapsulation);
        assert_eq!(ma.replay, mb.replay);
    }
}

#[test]
fn check_report_counts_manual_key_tunnels() {
    let (code, text) = check_report(&fixture("manualkey_gw_b.conf"));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("phase1: 0,"), "{text}");
    assert!(text.contains(", manualkey: 2)"), "{text}");
}

#[test]
fn keys_are_redacted_in_debug_and_json() {
    let p = load_ok("manualkey_gw_a.conf");
    let debug = format!("{:?}", p.config);
    let json = serde_json::to_string(&p).unwrap();
    for text in [&debug, &json] {
        // Neither hex nor decimal renderings of key bytes appear.
        for needle in ["0102030405060708", "2122232425262728", "4142434445464748"] {
            assert!(!text.contains(needle), "{needle} in {text}");
        }
        assert!(!text.contains("[1, 2, 3, 4"), "{text}");
        assert!(!text.contains("[1,2,3,4"), "{text}");
    }
    assert!(debug.contains("enc_key: Secret(<redacted>)"), "{debug}");
    assert!(json.contains("\"enc_key\":\"<redacted>\""), "{json}");
    assert!(json.contains("\"auth_key\":\"<redacted>\""), "{json}");
    assert!(json.contains("\"proposal\":\"aes128-sha1\""), "{json}");
    assert!(json.contains("\"encapsulation\":\"udp\""), "{json}");
    assert!(json.contains("\"local_spi\":4097"), "{json}");
}

#[test]
fn key_formats_dashes_optional_and_0x() {
    for key in [
        "0001020304050607-08090a0b0c0d0e0f-1011121314151617-18191a1b1c1d1e1f-20212223",
        "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F20212223",
        "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223",
        "\"0001020304050607-08090a0b0c0d0e0f-1011121314151617-18191a1b1c1d1e1f-20212223\"",
    ] {
        let p = parse(&mk(&[&format!("set enc-key {key}")])).unwrap();
        let m = &p.config.manualkey[0];
        let want: Vec<u8> = (0u8..36).collect();
        assert_eq!(m.enc_key.expose_bytes(), want.as_slice(), "{key}");
        assert_eq!(m.proposal.to_string(), "aes256gcm");
    }
    for bad in ["0x", "00-", "-00", "00--01", "abc", "zz", "0x0x00", "00 01"] {
        let text = mk(&[&format!("set enc-key {bad}")]);
        let e = errors(&text);
        assert!(
            e.iter()
                .any(|e| matches!(&e.kind, ErrorKind::BadValue { key, value, .. }
                if key == "enc-key" && value == REDACTED)),
            "{bad}: {e:?}"
        );
    }
}

#[test]
fn every_implemented_algorithm_pair_loads() {
    let hex = |n: usize| "ab".repeat(n);
    for (enc, enc_len, auth, auth_len, name) in [
        ("aes128", 16, "sha1", 20, "aes128-sha1"),
        ("aes128", 16, "sha256", 32, "aes128-sha256"),
        ("aes128", 16, "sha512", 64, "aes128-sha512"),
        ("aes256", 32, "sha1", 20, "aes256-sha1"),
        ("aes256", 32, "sha256", 32, "aes256-sha256"),
        ("aes256", 32, "sha512", 64, "aes256-sha512"),
        ("aes128gcm", 20, "null", 0, "aes128gcm"),
        ("aes256gcm", 36, "null", 0, "aes256gcm"),
        ("chacha20poly1305", 36, "null", 0, "chacha20poly1305"),
    ] {
        let mut lines = vec![
            format!("set enc-alg {enc}"),
            format!("set enc-key {}", hex(enc_len)),
            format!("set auth-alg {auth}"),
        ];
        if auth_len > 0 {
            lines.push(format!("set auth-key {}", hex(auth_len)));
        }
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let p = parse(&mk(&refs)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let m = &p.config.manualkey[0];
        assert_eq!(m.proposal.to_string(), name);
        assert_eq!(m.keymat().len(), enc_len + auth_len, "{name}");
        assert!(p.warnings.is_empty(), "{name}: {:?}", p.warnings);
    }
}

#[test]
fn wrong_key_length_names_line_column_and_lengths() {
    // aes256gcm wants 36 bytes; 32 is the common mistake (salt forgotten).
    let e = one_error(&mk(&["set enc-key 0x".to_string().as_str()]).replace(
        "set enc-key 0x\n",
        "set enc-key 0001020304050607-08090a0b0c0d0e0f-1011121314151617-18191a1b1c1d1e1f\n",
    ));
    assert_eq!((e.line, e.col), (3, 21), "{e}");
    assert_eq!(
        expected_of(&e),
        "36 bytes (72 hex digits) for enc-alg aes256gcm, found 32 bytes"
    );
    let s = e.to_string();
    assert!(s.starts_with("line 3, column 21: error: "), "{s}");
    assert!(s.contains("bad value \"<redacted>\" for enc-key"), "{s}");
    assert!(!s.contains("0001020304050607"), "{s}");

    // sha256 wants 32 bytes.
    let e = one_error(&mk(&[
        "set enc-alg aes128",
        "set enc-key 00112233445566778899aabbccddeeff",
        "set auth-alg sha256",
        "set auth-key 0011223344556677-8899aabbccddeeff-0011223344556677",
    ]));
    assert_eq!((e.line, e.col), (6, 22), "{e}");
    assert_eq!(
        expected_of(&e),
        "32 bytes (64 hex digits) for auth-alg sha256, found 24 bytes"
    );
}

#[test]
fn reserved_and_malformed_spis_are_refused() {
    for (spi, col, expect) in [
        ("0xff", 23, "at least 0x100: RFC 4303 §2.1 reserves"),
        ("0", 23, "at least 0x100"),
        ("0x00000001", 23, "at least 0x100"),
        ("0x1_001", 23, "a hexadecimal SPI"),
        ("123456789", 23, "a hexadecimal SPI"),
        ("0x", 23, "a hexadecimal SPI"),
    ] {
        let e = one_error(&mk(&[&format!("set local-spi {spi}")]));
        assert_eq!((e.line, e.col), (3, col), "{spi}: {e}");
        assert!(expected_of(&e).contains(expect), "{spi}: {e}");
    }
    let p = parse(&mk(&["set remote-spi ffffffff", "set local-spi 0X100"])).unwrap();
    let m = &p.config.manualkey[0];
    assert_eq!((m.local_spi, m.remote_spi), (0x100, 0xffff_ffff));
}

#[test]
fn unknown_and_unimplemented_algorithms_are_errors() {
    let e = one_error(&mk(&["set enc-alg blowfish"]));
    assert_eq!((e.line, e.col), (3, 21));
    assert!(expected_of(&e).starts_with("one of null, des, 3des"), "{e}");

    for alg in ["des", "3des", "aes192", "aria128", "seed", "null"] {
        let e = one_error(&mk(&[&format!("set enc-alg {alg}")]));
        assert_eq!((e.line, e.col), (3, 21), "{alg}");
        assert!(
            expected_of(&e).starts_with("an algorithm Haven implements: aes128, aes256"),
            "{alg}: {e}"
        );
    }
    for alg in ["md5", "sha384"] {
        let e = one_error(&mk(&[
            "set enc-alg aes128",
            "set enc-key 00112233445566778899aabbccddeeff",
            &format!("set auth-alg {alg}"),
            "set auth-key 00",
        ]));
        assert_eq!((e.line, e.col), (5, 22), "{alg}: {e}");
        assert!(
            expected_of(&e).contains("sha1, sha256, sha512 (md5 and sha384 are not implemented)"),
            "{e}"
        );
    }
    let e = one_error(&mk(&["set auth-alg whirlpool"]));
    assert!(expected_of(&e).starts_with("one of null, md5"), "{e}");
}

#[test]
fn algorithm_combinations() {
    // AEAD with an integrity algorithm.
    let e = one_error(&mk(&["set auth-alg sha256", "set auth-key 00"]));
    assert_eq!((e.line, e.col), (3, 22));
    assert!(expected_of(&e).contains("authenticates by itself"), "{e}");
    // AEAD with an auth-key only: a warning.
    let p = parse(&mk(&["set auth-key 00"])).unwrap();
    assert_eq!(p.warnings.len(), 1);
    assert_eq!(
        (p.warnings[0].key.as_str(), p.warnings[0].line),
        ("auth-key", 3)
    );
    // CBC without integrity.
    let e = one_error(&mk(&[
        "set enc-alg aes128",
        "set enc-key 00112233445566778899aabbccddeeff",
    ]));
    assert_eq!(e.line, 2);
    assert!(expected_of(&e).contains("needs set auth-alg"), "{e}");
    let e = one_error(&mk(&[
        "set enc-alg aes128",
        "set enc-key 00112233445566778899aabbccddeeff",
        "set auth-alg null",
    ]));
    assert_eq!((e.line, e.col), (5, 22));
    // CBC+SHA1 without auth-key.
    let e = one_error(&mk(&[
        "set enc-alg aes128",
        "set enc-key 00112233445566778899aabbccddeeff",
        "set auth-alg sha1",
    ]));
    assert!(expected_of(&e).contains("needs set auth-key"), "{e}");
}

#[test]
fn required_keys() {
    let text = "config vpn ipsec manualkey-interface\n    edit \"mk1\"\n    next\nend\n";
    let e = errors(text);
    let msgs: Vec<String> = e.iter().map(|e| e.to_string()).collect();
    for need in [
        "set interface",
        "set remote-gw",
        "set enc-alg",
        "set enc-key",
        "set local-spi",
        "set remote-spi",
    ] {
        assert!(msgs.iter().any(|m| m.contains(need)), "{need}: {msgs:#?}");
    }
    assert!(e.iter().all(|e| e.line == 2));
    let e = one_error(&mk(&["set remote-gw 0.0.0.0"]));
    assert_eq!((e.line, e.col), (3, 23));
}

#[test]
fn fortios_extras_and_haven_extensions() {
    let p = parse(&mk(&[
        "set npu-offload enable",
        "set local-gw6 ::",
        "set remote-gw6 ::",
        "set ip-version 4",
        "set addr-type 4",
        "set local-gw 0.0.0.0",
        "set encapsulation none",
        "set replay enable",
        "set src-subnet 10.9.0.0/16",
    ]))
    .unwrap();
    let keys: Vec<&str> = p.warnings.iter().map(|w| w.key.as_str()).collect();
    assert_eq!(keys, ["npu-offload"]);
    let m = &p.config.manualkey[0];
    assert_eq!(m.local_gw, None);
    // With ip-version 4 the IPv6 gateway keys are not used.
    assert_eq!((m.local_gw6, m.remote_gw6), (None, None));
    assert_eq!(m.remote_addr(), ip("192.0.2.2"));
    assert_eq!(m.encapsulation, ManualEncap::None);
    assert_eq!(m.src_subnet, net("10.9.0.0/16"));

    let e = one_error(&mk(&["set ip-version 6"]));
    assert!(expected_of(&e).contains("set remote-gw6"), "{e}");
    let e = one_error(&mk(&["set ip-version 6", "set remote-gw6 ::"]));
    assert!(expected_of(&e).contains("::"), "{e}");
    let e = one_error(&mk(&["set ip-version 6", "set remote-gw6 192.0.2.1"]));
    assert!(expected_of(&e).contains("IPv6 address"), "{e}");
    let e = one_error(&mk(&["set ip-version 5"]));
    assert!(expected_of(&e).contains("one of 4, 6"), "{e}");
    let e = one_error(&mk(&["set addr-type 7"]));
    assert_eq!((e.line, e.col), (3, 23));
    // addr-type 6: IPv6 selectors (`src-subnet6`/`dst-subnet6`, default ::/0).
    let p = parse(&mk(&["set addr-type 6", "set src-subnet6 fd00:99:1::/64"])).unwrap();
    let m = &p.config.manualkey[0];
    assert_eq!(
        m.selectors(),
        ("fd00:99:1::/64".to_string(), "::/0".to_string())
    );
    assert_eq!(p.config.manualkey.len(), 1, "{:?}", p.warnings);
    let p = parse(&mk(&["set src-subnet6 fd00:99:1::/64"])).unwrap();
    assert_eq!(p.config.manualkey[0].selectors().0, "0.0.0.0/0");
    let keys: Vec<&str> = p.warnings.iter().map(|w| w.key.as_str()).collect();
    assert_eq!(keys, ["src-subnet6"]);
    let e = one_error(&mk(&["set encapsulation tcp"]));
    assert!(expected_of(&e).contains("one of none, udp"), "{e}");
    let e = one_error(&mk(&["set authkey 00"]));
    assert!(
        matches!(&e.kind, ErrorKind::UnknownKey { expected, .. } if expected.contains("did you mean \"auth-key\"")),
        "{e}"
    );
}

/// `ip-version 6`: the gateways are `local-gw6` / `remote-gw6` (FortiOS keys), `remote-gw`
/// is not needed.
#[test]
fn ipv6_gateways() {
    let p = parse(
        &mk(&[
            "set ip-version 6",
            "set local-gw6 2001:db8::1",
            "set remote-gw6 2001:db8::2",
        ])
        .replace("        set remote-gw 192.0.2.2\n", ""),
    )
    .unwrap();
    let m = &p.config.manualkey[0];
    assert_eq!(m.remote_gw6, Some("2001:db8::2".parse().unwrap()));
    assert_eq!(m.remote_addr().to_string(), "2001:db8::2");
    assert_eq!(
        m.local_addr().map(|a| a.to_string()).as_deref(),
        Some("2001:db8::1")
    );
    let p = parse(&mk(&["set ip-version 6", "set remote-gw6 2001:db8::2"])).unwrap();
    assert_eq!(p.config.manualkey[0].local_addr(), None);
}

#[test]
fn encrypted_and_masked_keys_are_refused() {
    let e = one_error(&mk(&["set enc-key ENC AAAABBBBCCCC"]));
    assert_eq!((e.line, e.col), (3, 21));
    assert!(expected_of(&e).contains("FortiOS-encrypted"), "{e}");
    let e = one_error(&mk(&["set enc-key ********"]));
    assert!(expected_of(&e).contains("masked"), "{e}");
}

#[test]
fn names_spis_and_phase2_references_are_checked_across_blocks() {
    let p1 = "config vpn ipsec phase1-interface\n    edit \"mk1\"\n        set interface \"port1\"\n        set ike-version 2\n        set remote-gw 192.0.2.9\n        set psksecret \"secret-key\"\n    next\nend\nconfig vpn ipsec phase2-interface\n    edit \"p2\"\n        set phase1name \"mk1\"\n    next\nend\n";
    let text = format!("{p1}{}", mk(&[]));
    let e = one_error(&text);
    assert_eq!(e.line, 15, "{e}");
    assert!(
        expected_of(&e).contains("is also a config vpn ipsec phase1-interface entry (line 2)"),
        "{e}"
    );

    // A phase2 naming a manual-key tunnel.
    let text = format!(
        "{}config vpn ipsec phase2-interface\n    edit \"p2\"\n        set phase1name \"mk1\"\n    next\nend\n",
        mk(&[])
    );
    let e = one_error(&text);
    assert!(
        expected_of(&e).contains("names a manualkey-interface, which takes no phase2"),
        "{e}"
    );

    // Two tunnels with one inbound SPI.
    let two = format!(
        "{}{}",
        mk(&[]),
        mk(&["set remote-gw 192.0.2.3"]).replace("\"mk1\"", "\"mk2\"")
    );
    let e = one_error(&two);
    assert_eq!((e.line, e.col), (17, 23), "{e}");
    assert!(
        expected_of(&e).contains("local-spi 0x1001 is already used by \"mk1\" (line 7)"),
        "{e}"
    );

    // Duplicate edits and over-long names.
    let e = one_error(&format!("{}{}", mk(&[]), mk(&["set local-spi 0x1002"])));
    assert!(expected_of(&e).contains("duplicate edit \"mk1\""), "{e}");
    let e = one_error(&mk(&[]).replace("\"mk1\"", "\"a-very-long-name\""));
    assert_eq!((e.line, e.col), (2, 10), "{e}");
}
