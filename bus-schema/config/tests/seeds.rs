//! Every configuration block of the vendor seeds (`shared/seeds/`), as
//! fixtures under `tests/fixtures/`, parses to the expected model.

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

fn prop(s: &str, ike: bool) -> Proposal {
    let (e, h) = s.split_once('-').unwrap();
    let encryption = Encryption::ALL.iter().find(|(n, _)| *n == e).unwrap().1;
    let hash = Hash::ALL.iter().find(|(n, _)| *n == h).map(|x| x.1);
    Proposal {
        encryption,
        hash,
        ike,
    }
}

fn warning_keys(p: &Parsed) -> Vec<&str> {
    p.warnings.iter().map(|w| w.key.as_str()).collect()
}

/// Seed 000/001's dial-up phase1 `vpn1` (the two seeds differ in local-gw,
/// add-route and the secret).
fn seed_vpn1(local_gw: &str, psk: Secret, add_route: bool) -> Phase1 {
    Phase1 {
        kind: Phase1Type::Dynamic,
        interface: "port2".into(),
        ike_version: 2,
        local_gw: Some(ip(local_gw)),
        keylife: 90000,
        peertype: PeerType::One,
        net_device: false,
        proposal: vec![prop("aes128-sha1", true)],
        add_route,
        dpd: DpdMode::OnIdle,
        dhgrp: vec![2],
        fgsp_sync: true,
        nattraversal: NatTraversal::Disable,
        peerid: Some("Nokia_Peer".into()),
        psksecret: Some(psk),
        dpd_retryinterval_ms: 60_000,
        ..Phase1::new("vpn1")
    }
}

fn seed_vpn1_phase2() -> Phase2 {
    Phase2 {
        proposal: vec![prop("aes128-sha1", false)],
        keylifeseconds: 10800,
        ..Phase2::new("vpn1", "vpn1")
    }
}

fn peer(sync_id: u32, addr: &str) -> ClusterPeer {
    ClusterPeer {
        sync_id,
        peerip: ip(addr),
        peervd: "root".into(),
        port: 708,
        hb_interval: 2,
        hb_lost_threshold: 6,
    }
}

#[test]
fn seed_000_dc1_vm1() {
    let p = load_ok("000_dc1_vm1.conf");
    let expected = Config {
        ha: None,
        standalone: Some(StandaloneCluster {
            standalone_group_id: 1,
            group_member_id: 1,
            cluster_peers: vec![
                peer(1, "172.31.1.2"),
                peer(2, "172.31.1.3"),
                peer(3, "172.31.1.4"),
            ],
            ..StandaloneCluster::default()
        }),
        phase1: vec![seed_vpn1("192.168.202.31", Secret::new("xxxxx"), true)],
        phase2: vec![seed_vpn1_phase2()],
        routes: vec![],
        manualkey: vec![],
        haven: HavenSettings::default(),
        interfaces: vec![],
    };
    assert_eq!(p.config, expected);
    // The seed's diagnose output: idle=60000ms retry=3.
    assert_eq!(p.config.phase1[0].dpd_retryinterval_ms, 60_000);
    assert_eq!(p.config.phase1[0].dpd_retrycount, 3);
    // The only remark: the seed's placeholder key is short.
    assert_eq!(warning_keys(&p), vec!["psksecret"]);
    assert_eq!(p.config.phase2_for("vpn1").count(), 1);
}

fn seed_001_ha(group_id: u16, name: &str) -> Ha {
    Ha {
        group_id,
        group_name: name.into(),
        mode: HaMode::ActivePassive,
        password: Some(Secret::with_form("********", SecretForm::Masked)),
        hbdev: vec![HbDev {
            interface: "port4".into(),
            priority: 50,
        }],
        session_pickup: true,
        override_: false,
        priority: 100,
        ..Ha::default()
    }
}

#[test]
fn seed_001_ha_clusters() {
    for (file, id, name) in [
        ("001_dc2_vm12_ha.conf", 1, "DC2_VM12"),
        ("001_dc2_vm34_ha.conf", 2, "DC2_VM34"),
    ] {
        let p = load_ok(file);
        let expected = Config {
            ha: Some(seed_001_ha(id, name)),
            ..Config::default()
        };
        assert_eq!(p.config, expected, "{file}");
        // upgrade-mode is known but not implemented; the masked password
        // is accepted but flagged.
        assert_eq!(warning_keys(&p), vec!["password", "upgrade-mode"], "{file}");
        let ha = p.config.ha.as_ref().unwrap();
        assert!(!ha.password.as_ref().unwrap().is_usable());
        assert_eq!(ha.hb_interval_ms(), 200);
        assert_eq!(ha.hb_lost_threshold, 6);
    }
}

#[test]
fn seed_001_fgcp_over_fgsp_members() {
    for (file, id, name, member, peer_ip) in [
        ("001_dc2_vm1.conf", 1, "DC2_VM12", 1, "172.31.2.2"),
        ("001_dc2_vm3.conf", 2, "DC2_VM34", 2, "172.31.2.1"),
    ] {
        let p = load_ok(file);
        let expected = Config {
            ha: Some(seed_001_ha(id, name)),
            standalone: Some(StandaloneCluster {
                standalone_group_id: 2,
                group_member_id: member,
                cluster_peers: vec![peer(1, peer_ip)],
                ..StandaloneCluster::default()
            }),
            phase1: vec![seed_vpn1(
                "192.168.202.35",
                Secret::with_form("********", SecretForm::Masked),
                false,
            )],
            phase2: vec![seed_vpn1_phase2()],
            routes: vec![],
            manualkey: vec![],
            haven: HavenSettings::default(),
            interfaces: vec![],
        };
        assert_eq!(p.config, expected, "{file}");
        // The seed keeps FortiOS's heartbeat defaults on both links: the FGCP failover
        // (200 ms x 6) is as slow as the FGSP loss time (200 ms x 6).
        assert_eq!(
            warning_keys(&p),
            vec!["hb-lost-threshold", "password", "upgrade-mode", "psksecret"],
            "{file}"
        );
        let w = p
            .warnings
            .iter()
            .find(|w| w.key == "hb-lost-threshold")
            .unwrap();
        assert!(w.to_string().contains("takes 1200 ms"), "{w}");
        assert!(w.to_string().contains("after 1200 ms"), "{w}");
    }
}

fn vpntotest_phase1() -> Phase1 {
    Phase1 {
        interface: "Internet1".into(),
        ike_version: 2,
        local_gw: Some(ip("198.51.100.1")),
        peertype: PeerType::Any,
        net_device: false,
        proposal: vec![prop("aes256-sha512", true)],
        dhgrp: vec![21],
        nattraversal: NatTraversal::Disable,
        remote_gw: vec![ip("203.0.113.1")],
        psksecret: Some(Secret::with_form("zzzzzz", SecretForm::FortiosEncrypted)),
        ..Phase1::new("VPNtoTest")
    }
}

fn vpntotest_phase2() -> Phase2 {
    Phase2 {
        proposal: vec![prop("aes256-sha512", false)],
        dhgrp: vec![21],
        replay: false,
        keepalive: true,
        keylifeseconds: 600,
        ..Phase2::new("VPNtoTest", "VPNtoTest")
    }
}

#[test]
fn seed_002_configuration_in_cli() {
    let p = load_ok("002_vpntotest.conf");
    let expected = Config {
        phase1: vec![vpntotest_phase1()],
        phase2: vec![vpntotest_phase2()],
        routes: vec![Route {
            dst: Ipv4Net {
                addr: ip("192.168.0.0"),
                prefix_len: 24,
            },
            device: Some("VPNtoTest".into()),
            ..Route::new(8)
        }],
        ..Config::default()
    };
    assert_eq!(p.config, expected);
    // ENC secret flagged; the firewall policy block is ignored, not an error.
    assert_eq!(warning_keys(&p), vec!["psksecret", ""]);
    assert!(p.warnings[1].block.contains("firewall policy"));
    assert_eq!(p.config.routes_via("VPNtoTest").count(), 1);
}

#[test]
fn seed_002_full_configuration_loads_with_warnings() {
    let p = load_ok("002_full_configuration.conf");
    // Every value the listing spells out equals a default or the short
    // listing above, so the model is the same tunnel.
    let p1 = Phase1 {
        psksecret: Some(Secret::with_form("...", SecretForm::FortiosEncrypted)),
        ..vpntotest_phase1()
    };
    let p2 = Phase2 {
        pfs: true,
        auto_negotiate: false,
        ..vpntotest_phase2()
    };
    assert_eq!(p.config.phase1, vec![p1]);
    assert_eq!(p.config.phase2, vec![p2]);
    let keys = warning_keys(&p);
    for k in [
        "authmethod-remote",
        "mode-cfg",
        "negotiate-timeout",
        "fragmentation",
        "npu-offload",
        "reauth",
        "idle-timeout",
        "encapsulation",
        "childless-ike",
        "ipv4-df",
        "auto-discovery-sender",
        "auto-negotiate",
        "psksecret",
    ] {
        assert!(keys.contains(&k), "no warning for {k}: {keys:?}");
    }
    // Implemented keys raise nothing.
    for k in [
        "dpd",
        "dhgrp",
        "keylife",
        "proposal",
        "rekey",
        "monitor",
        "src-subnet",
    ] {
        assert!(!keys.contains(&k), "unexpected warning for {k}");
    }
    assert!(p.warnings.len() >= 25, "{}", p.warnings.len());
    for w in &p.warnings {
        assert!(w.line > 0 && w.col > 0);
        assert!(
            w.to_string().contains("002_full_configuration.conf:"),
            "{w}"
        );
    }
}

#[test]
fn seed_002_flattened_listing_is_rejected_with_a_hint() {
    let e = load(&fixture("002_full_configuration_verbatim.txt")).unwrap_err();
    let first = e.first().unwrap();
    assert_eq!((first.line, first.col), (1, 35));
    assert!(first.to_string().contains("own line"), "{first}");
}

#[test]
fn seed_002_redacted_addresses_are_errors() {
    // The seed's X.X.X.X is a redaction: loading it verbatim must fail at
    // the value, not silently produce a tunnel to nowhere.
    let text = std::fs::read_to_string(fixture("002_vpntotest.conf"))
        .unwrap()
        .replace("198.51.100.1", "X.X.X.X");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.errors.len(), 1, "{e}");
    let err = &e.errors[0];
    assert_eq!((err.line, err.col), (12, 22));
    assert!(matches!(&err.kind, ErrorKind::BadValue { key, .. } if key == "local-gw"));
}

#[test]
fn seed_002_snippets() {
    let p = load_ok("002_add_route.conf");
    assert!(p.config.phase1[0].add_route);
    assert_eq!(p.config.phase1[0].name, "VPN-name");
    let p = load_ok("002_responder_only.conf");
    assert!(!p.config.phase1[0].auto_negotiate);
    let p = load_ok("002_ha_sync_esp_seqno.conf");
    assert!(p.config.phase1[0].ha_sync_esp_seqno);
    let p = load_ok("002_session_pickup.conf");
    assert_eq!(
        p.config.ha,
        Some(Ha {
            session_pickup: false,
            ..Ha::default()
        })
    );
    assert!(p.warnings.is_empty());
}

#[test]
fn every_fixture_is_covered_and_loads_or_is_a_known_failure() {
    let mut n = 0;
    for entry in std::fs::read_dir(fixture("")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        n += 1;
        let (code, text) = check_report(&path);
        if name.ends_with(".conf") {
            assert_eq!(code, 0, "{name}:\n{text}");
            assert!(text.contains(": OK ("), "{text}");
        } else {
            assert_eq!(code, 1, "{name}:\n{text}");
        }
    }
    assert!(n >= 10);
}

#[test]
fn json_view_redacts_secrets() {
    let p = load_ok("000_dc1_vm1.conf");
    let json = serde_json::to_string(&p).unwrap();
    assert!(json.contains("\"psksecret\":\"<redacted>\""), "{json}");
    assert!(!json.contains("xxxxx"));
    assert!(json.contains("\"proposal\":[\"aes128-sha1\"]"));
    assert!(json.contains("\"type\":\"dynamic\""));
    assert!(json.contains("\"dpd\":\"on-idle\""));
    let p = load_ok("001_dc2_vm12_ha.conf");
    let json = serde_json::to_string(&p.config).unwrap();
    assert!(json.contains("\"mode\":\"a-p\""));
    assert!(json.contains("\"override\":false"));
    assert!(!json.contains("********"));
}
