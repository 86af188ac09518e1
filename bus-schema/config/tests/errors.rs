//! Errors carry line, column and what was expected; warnings and defaults;
//! quoting; hostile input.

use haven_config::*;

/// A minimal valid tunnel, to which tests add lines.
fn tunnel(extra_p1: &str, extra_p2: &str) -> String {
    format!(
        "config vpn ipsec phase1-interface\n\
         \x20   edit \"t1\"\n\
         \x20       set interface \"port1\"\n\
         \x20       set ike-version 2\n\
         \x20       set remote-gw 192.0.2.1\n\
         \x20       set psksecret \"secret-key\"\n\
         {extra_p1}\
         \x20   next\n\
         end\n\
         config vpn ipsec phase2-interface\n\
         \x20   edit \"t1-p2\"\n\
         \x20       set phase1name \"t1\"\n\
         {extra_p2}\
         \x20   next\n\
         end\n"
    )
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

#[test]
fn defaults_apply_to_unset_keys() {
    let p = parse(&tunnel("", "")).unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let p1 = &p.config.phase1[0];
    assert_eq!(p1.kind, Phase1Type::Static);
    assert_eq!(p1.keylife, 86400);
    assert_eq!(p1.dpd, DpdMode::OnDemand);
    assert_eq!(p1.dpd_retrycount, 3);
    assert_eq!(p1.dpd_retryinterval_ms, 20_000);
    assert_eq!(p1.nattraversal, NatTraversal::Enable);
    assert_eq!(p1.dhgrp, vec![14, 5]);
    assert_eq!(p1.proposal.len(), 4);
    assert!(p1.add_route && p1.auto_negotiate && p1.rekey && p1.ha_sync_esp_seqno);
    assert!(!p1.fgsp_sync && !p1.net_device && !p1.passive_mode);
    assert_eq!(p1.authmethod, AuthMethod::Psk);
    assert_eq!(p1.psksecret.as_ref().unwrap().expose_bytes(), b"secret-key");
    let p2 = &p.config.phase2[0];
    assert_eq!(p2.keylifeseconds, 43200);
    assert_eq!(p2.keylifekbs, 5120);
    assert!(p2.pfs && p2.replay && !p2.keepalive && !p2.auto_negotiate);
    assert_eq!(p2.src, Selector::Subnet(Ipv4Net::ANY));
    assert_eq!(p2.proposal.len(), 7);
}

#[test]
fn unset_restores_the_default() {
    let p = parse(&tunnel(
        "        set keylife 3600\n        unset keylife\n",
        "",
    ))
    .unwrap();
    assert_eq!(p.config.phase1[0].keylife, 86400);
}

#[test]
fn set_twice_warns_and_later_wins() {
    let p = parse(&tunnel(
        "        set dpd on-idle\n        set dpd disable\n",
        "",
    ))
    .unwrap();
    assert_eq!(p.config.phase1[0].dpd, DpdMode::Disable);
    assert_eq!(p.warnings.len(), 1);
    assert_eq!((p.warnings[0].line, p.warnings[0].key.as_str()), (8, "dpd"));
}

#[test]
fn unknown_key_names_line_column_block_and_expected() {
    let e = one_error(&tunnel("        set foo 1\n", ""));
    assert_eq!((e.line, e.col), (7, 13));
    let s = e.to_string();
    assert!(
        s.starts_with(
            "line 7, column 13: error: unknown key \"foo\" in config vpn ipsec phase1-interface, edit \"t1\"; expected one of type, interface"
        ),
        "{s}"
    );
    let e = one_error(&tunnel("        set psksecrte x\n", ""));
    assert!(e.to_string().contains("did you mean \"psksecret\"?"), "{e}");
}

#[test]
fn bad_values_point_at_the_value() {
    for (line, col, expect) in [
        (
            "        set dpd banana\n",
            17,
            "one of disable, on-idle, on-demand, periodic",
        ),
        ("        set remote-gw 10.0.0.256\n", 23, "an IPv4 address"),
        ("        set keylife 60\n", 21, "an integer 120..=172800"),
        ("        set dhgrp 14 3\n", 22, "a Diffie-Hellman group"),
        (
            "        set proposal aes128-sha1 aes128-sha3\n",
            34,
            "a phase1 proposal",
        ),
        ("        set dpd-retrycount -1\n", 28, "an integer 0..=10"),
        (
            "        set nattraversal yes\n",
            26,
            "one of enable, disable, forced",
        ),
        ("        set fgsp-sync on\n", 23, "one of enable, disable"),
        ("        set interface a b\n", 25, "a single value"),
    ] {
        let e = one_error(&tunnel(line, ""));
        assert_eq!((e.line, e.col), (7, col), "{line}: {e}");
        match &e.kind {
            ErrorKind::BadValue { expected, .. } => {
                assert!(expected.contains(expect), "{line}: {expected}")
            }
            other => panic!("{line}: {other:?}"),
        }
    }
    let e = one_error(&tunnel("", "        set src-port 99999\n"));
    assert_eq!((e.line, e.col), (12, 22));
    assert!(e.to_string().contains("expected an integer 0..=65535"));
}

#[test]
fn dpd_retryinterval_seconds_or_seconds_and_millis() {
    let p = parse(&tunnel("        set dpd-retryinterval 60\n", "")).unwrap();
    assert_eq!(p.config.phase1[0].dpd_retryinterval_ms, 60_000);
    let p = parse(&tunnel("        set dpd-retryinterval 1 500\n", "")).unwrap();
    assert_eq!(p.config.phase1[0].dpd_retryinterval_ms, 1_500);
    let e = one_error(&tunnel("        set dpd-retryinterval 0\n", ""));
    assert_eq!((e.line, e.col), (7, 31));
    let e = one_error(&tunnel("        set dpd-retryinterval 1 1000\n", ""));
    assert_eq!((e.line, e.col), (7, 33));
}

#[test]
fn multi_word_values() {
    let text = "config system ha\n    set mode a-p\n    set hbdev \"port3\" 50 \"port4\" 40\n    set password \"p w\"\n    set hb-interval 5\nend\n";
    let p = parse(text).unwrap();
    let ha = p.config.ha.unwrap();
    assert_eq!(ha.hbdev.len(), 2);
    assert_eq!(ha.hbdev[1].interface, "port4");
    assert_eq!(ha.hbdev[1].priority, 40);
    assert_eq!(ha.password.as_ref().unwrap().expose_bytes(), b"p w");
    assert_eq!(ha.hb_interval_ms(), 500);
    let p = parse(
        "config system ha\n    set hb-interval 5\n    set hb-interval-in-milliseconds 10ms\nend\n",
    )
    .unwrap();
    assert_eq!(p.config.ha.unwrap().hb_interval_ms(), 50);
    let e = one_error("config system ha\n    set hbdev \"port3\" 50 \"port4\"\nend\n");
    assert_eq!((e.line, e.col), (2, 26));
    let e = one_error("config system ha\n    set hbdev port3 50 port3 60\nend\n");
    assert_eq!((e.line, e.col), (2, 24));
    let p = parse(&tunnel(
        "        set proposal aes128-sha1 aes256-sha256 aes256gcm-prfsha384\n        set remote-gw 192.0.2.1 192.0.2.2\n",
        "        set src-subnet 10.1.0.0/16\n        set dst-subnet 10.2.0.0 255.255.0.0\n",
    ))
    .unwrap();
    let p1 = &p.config.phase1[0];
    assert_eq!(p1.proposal.len(), 3);
    assert_eq!(p1.proposal[2].to_string(), "aes256gcm-prfsha384");
    assert_eq!(p1.remote_gw.len(), 2);
    let p2 = &p.config.phase2[0];
    assert_eq!(
        p2.src.clone(),
        Selector::Subnet(Ipv4Net {
            addr: "10.1.0.0".parse().unwrap(),
            prefix_len: 16
        })
    );
    assert_eq!(
        p2.dst,
        Selector::Subnet(Ipv4Net {
            addr: "10.2.0.0".parse().unwrap(),
            prefix_len: 16
        })
    );
    let e = one_error(&tunnel("", "        set dst-subnet 10.2.0.0 255.0.255.0\n"));
    assert_eq!((e.line, e.col), (12, 33));
}

#[test]
fn quoted_and_escaped_strings() {
    let p = parse(&tunnel(
        "        set comments \"say \\\"hi\\\" \\\\ # not a comment\"\n        set peerid 'it\\'s'\n        set peertype one # trailing comment\n",
        "",
    ))
    .unwrap();
    let p1 = &p.config.phase1[0];
    assert_eq!(p1.comments, "say \"hi\" \\ # not a comment");
    assert_eq!(p1.peerid.as_deref(), Some("it's"));
    let p = parse("config vpn ipsec phase1-interface\n    edit \"a b\"\n").unwrap_err();
    assert!(p
        .errors
        .iter()
        .any(|e| e.to_string().contains("unexpected end of input")));
}

#[test]
fn crlf_comments_blank_lines_and_bom() {
    let text = format!(
        "\u{feff}#config-version=FGT\r\n\r\n{}",
        tunnel("", "").replace('\n', "\r\n")
    );
    let p = parse(&text).unwrap();
    assert_eq!(p.config.phase1[0].interface, "port1");
    // CR is not part of any value.
    assert_eq!(p.config.phase2[0].phase1name, "t1");
}

#[test]
fn known_unimplemented_keys_and_blocks_warn() {
    let text = format!(
        "config system global\n    set hostname \"gw\"\nend\nconfig firewall policy\n    edit 1\n    next\nend\n{}",
        tunnel("        set mode-cfg enable\n        set fragmentation enable\n", "        set ipv4-df disable\n")
    );
    let p = parse(&text).unwrap();
    let w: Vec<(u32, &str)> = p
        .warnings
        .iter()
        .map(|w| (w.line, w.key.as_str()))
        .collect();
    assert_eq!(
        w,
        vec![
            (1, ""),
            (4, ""),
            (14, "mode-cfg"),
            (15, "fragmentation"),
            (21, "ipv4-df")
        ]
    );
    let s = p.warnings[2].to_string();
    assert!(
        s.starts_with("line 14, column 13: warning: mode-cfg in config vpn ipsec phase1-interface"),
        "{s}"
    );
}

#[test]
fn unknown_blocks_are_errors_with_hints() {
    let e = one_error("config vpn ipsec phase1-interfac\nend\n");
    assert!(
        e.to_string()
            .contains("did you mean config vpn ipsec phase1-interface?"),
        "{e}"
    );
    let e = one_error("config frobnicator\nend\n");
    assert_eq!((e.line, e.col), (1, 1));
    assert!(matches!(e.kind, ErrorKind::UnknownBlock { .. }));
    let e = one_error("config system ha\n    config nonsense\n    end\nend\n");
    assert_eq!((e.line, e.col), (2, 5));
    // Policy-based VPN tables exist in FortiOS: ignored, not an error.
    assert!(parse("config vpn ipsec phase1\nend\n").is_ok());
}

#[test]
fn semantic_validation() {
    // phase2 naming a missing phase1: error at the value.
    let e = one_error(&tunnel("", "").replace("phase1name \"t1\"", "phase1name \"nope\""));
    assert_eq!((e.line, e.col), (11, 24));
    assert!(
        e.to_string().contains("phase1name \"nope\" does not name"),
        "{e}"
    );
    // Static without remote-gw.
    let e = one_error(&tunnel("", "").replace("        set remote-gw 192.0.2.1\n", ""));
    assert_eq!((e.line, e.col), (2, 5));
    assert!(e.to_string().contains("remote-gw"));
    // IKEv1 asked for: error. Not set (FortiOS's default is 1): IKEv2 with
    // a warning.
    let e = one_error(&tunnel("", "").replace("ike-version 2", "ike-version 1"));
    assert_eq!((e.line, e.col), (4, 25));
    let p = parse(&tunnel("", "").replace("        set ike-version 2\n", "")).unwrap();
    assert_eq!(p.config.phase1[0].ike_version, 2);
    assert_eq!(
        (p.warnings[0].line, p.warnings[0].key.as_str()),
        (2, "ike-version")
    );
    // peertype one without peerid.
    let e = one_error(&tunnel("        set peertype one\n", ""));
    assert!(e.to_string().contains("peerid"));
    // a-p without hbdev.
    let e = one_error("config system ha\n    set mode a-p\n    set password x\nend\n");
    assert!(e.to_string().contains("hbdev"), "{e}");
    // Route without device.
    let e =
        one_error("config router static\n    edit 1\n        set dst 10.0.0.0/8\n    next\nend\n");
    assert!(e.to_string().contains("device"), "{e}");
    // monitor naming a missing phase1.
    let e = one_error(&tunnel("        set monitor \"ghost\"\n", ""));
    assert_eq!((e.line, e.col), (7, 21));
}

#[test]
fn duplicate_edits_and_blocks() {
    let text = format!(
        "{}config vpn ipsec phase1-interface\n    edit \"t1\"\n        set interface \"port9\"\n    next\nend\n",
        tunnel("", "")
    );
    let e = one_error(&text);
    assert_eq!((e.line, e.col), (15, 5));
    assert!(e.to_string().contains("duplicate edit \"t1\""), "{e}");
    assert!(e.to_string().contains("first at line 2"), "{e}");
    let e = one_error("config system standalone-cluster\n    config cluster-peer\n        edit 1\n            set peerip 10.0.0.1\n        next\n        edit 1\n            set peerip 10.0.0.2\n        next\n    end\nend\n");
    assert_eq!((e.line, e.col), (6, 9));
    let e = one_error("config system ha\nend\nconfig system ha\nend\n");
    assert_eq!((e.line, e.col), (3, 1));
    let e = one_error("config system standalone-cluster\n    config cluster-peer\n        edit 1\n            set peerip 10.0.0.1\n        next\n        edit 2\n            set peerip 10.0.0.1\n        next\n    end\nend\n");
    assert_eq!((e.line, e.col), (7, 24));
}

#[test]
fn edit_zero_takes_the_next_number() {
    let p = parse("config router static\n    edit 5\n        set device \"a\"\n    next\n    edit 0\n        set device \"b\"\n    next\nend\n").unwrap();
    let ids: Vec<u32> = p.config.routes.iter().map(|r| r.seq_num).collect();
    assert_eq!(ids, vec![5, 6]);
}

#[test]
fn standalone_cluster_keys() {
    let p = parse("config system standalone-cluster\n    set standalone-group-id 7\n    set group-member-id 3\n    set layer2-connection available\n    set session-sync-dev \"port5\" \"port6\"\n    set encryption enable\n    set psksecret \"fgsp-key-1\"\n    config cluster-peer\n        edit 1\n            set peerip 10.9.0.2\n            set peervd \"vd1\"\n        next\n    end\nend\n").unwrap();
    let sc = p.config.standalone.unwrap();
    assert_eq!(sc.standalone_group_id, 7);
    assert_eq!(sc.group_member_id, 3);
    assert!(sc.layer2_connection && sc.encryption);
    assert_eq!(sc.session_sync_dev, vec!["port5", "port6"]);
    assert_eq!(sc.cluster_peers[0].peervd, "vd1");
    assert_eq!(sc.cluster_peers[0].port, FGSP_PORT);
    let e = one_error("config system standalone-cluster\n    set group-member-id 16\nend\n");
    assert_eq!((e.line, e.col), (2, 25));
}

#[test]
fn file_names_in_diagnostics() {
    let dir = std::env::temp_dir().join(format!("haven-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.conf");
    std::fs::write(&path, tunnel("        set dpd banana\n", "")).unwrap();
    let e = load(&path).unwrap_err();
    let s = e.to_string();
    assert!(
        s.starts_with(&format!("{}:7:17: error: ", path.display())),
        "{s}"
    );
    let (code, text) = check_report(&path);
    assert_eq!(code, 1);
    assert!(text.contains("1 error"), "{text}");
    std::fs::write(&path, tunnel("        set mode-cfg disable\n", "")).unwrap();
    let (code, text) = check_report(&path);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(":7:13: warning: mode-cfg"), "{text}");
    let (code, text) = check_report(&dir.join("missing.conf"));
    assert_eq!(code, 1);
    assert!(text.contains("missing.conf: error: cannot read"), "{text}");
    std::fs::write(&path, [0xffu8, 0xfe, 0x00]).unwrap();
    let e = load(&path).unwrap_err();
    assert!(e.to_string().contains("not UTF-8"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_input_never_panics() {
    let full = format!(
        "{}config system ha\n    set mode a-p\n    set hbdev \"port4\" 50\nend\nconfig router static\n    edit 1\n        set device \"t1\"\n        set comment \"x y\"\n    next\nend\n",
        tunnel("        set comments \"a\\\"b\"\n", "")
    );
    for (i, _) in full.char_indices() {
        let _ = parse(&full[..i]);
    }
    for i in 0..full.len() {
        if let Some(s) = full.get(i..) {
            let _ = parse(s);
        }
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let text = "config system ha\n".repeat(100_000);
    let e = errors(&text);
    assert!(e
        .iter()
        .any(|e| matches!(e.kind, ErrorKind::TooDeep { .. })));
    let text = format!(
        "{}{}",
        "config a\n edit 1\n".repeat(20_000),
        "next\nend\n".repeat(20_000)
    );
    assert!(parse(&text).is_err());
    // Legitimate nesting inside the limit still parses.
    let ok = format!("config global\n{}end\n", tunnel("", ""));
    assert_eq!(parse(&ok).unwrap().config.phase1.len(), 1);
}

#[test]
fn vdom_wrapper_is_read() {
    let text = format!(
        "config vdom\n    edit root\n{}    next\nend\n",
        tunnel("", "")
    );
    let p = parse(&text).unwrap();
    assert_eq!(p.config.phase1.len(), 1);
}

#[test]
fn text_errors_come_before_consistency_errors() {
    let e = parse("config vpn ipsec phase1-interface\n    edit \"v\"\n        set dpd banana\n    next\nend\n")
        .unwrap_err();
    let first = e.first().unwrap();
    assert_eq!((first.line, first.col), (3, 17));
    assert!(matches!(first.kind, ErrorKind::BadValue { .. }));
    // The entry's missing interface, remote-gw and psksecret follow.
    assert!(e.errors.len() >= 4, "{e}");
    assert!(e.errors[1..]
        .iter()
        .all(|x| matches!(x.kind, ErrorKind::Invalid { .. })));
}

#[test]
fn full_backup_shape_loads_with_warnings() {
    let text = format!(
        "#config-version=FGVM64-7.00-FW-build0000-000000:opmode=0:vdom=0:user=admin\n\
         #conf_file_ver=1234567890\n\
         #buildno=0000\n\
         #global_vdom=1\n\
         config system global\n    set alias \"FortiGate-VM64\"\n    set hostname \"DC1_VM1\"\n    set timezone 04\nend\n\
         config system interface\n    edit \"port2\"\n        set vdom \"root\"\n        set ip 192.168.125.254 255.255.255.0\n        set allowaccess ping\n        config ipv6\n            set ip6-send-adv disable\n        end\n    next\nend\n\
         config vpn certificate local\n    edit \"Fortinet_Factory\"\n        set password ENC abc==\n        set private-key \"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0wQTApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\"\n    next\nend\n\
         {}\
         config router static\n    edit 1\n        set gateway 192.168.125.1\n        set device \"port2\"\n    next\nend\n",
        tunnel("", "")
    );
    let p = parse(&text).unwrap();
    assert_eq!(p.config.phase1.len(), 1);
    assert_eq!(
        p.config.routes[0].gateway,
        Some("192.168.125.1".parse().unwrap())
    );
    let ignored: Vec<&str> = p
        .warnings
        .iter()
        .filter(|w| w.key.is_empty())
        .map(|w| w.block.as_str())
        .collect();
    assert_eq!(
        ignored,
        vec![
            "config system global",
            "config system interface, edit \"port2\"",
            "config vpn certificate local"
        ]
    );
    // config system interface is read: ip kept with its host bits, the rest warned.
    let port2 = p.config.interface("port2").unwrap();
    assert_eq!(port2.ip, Some(("192.168.125.254".parse().unwrap(), 24)));
    assert!(!port2.loopback);
    assert!(p
        .warnings
        .iter()
        .any(|w| w.key == "allowaccess" && w.block.starts_with("config system interface")));
    // Positions after the multi-line string are still right.
    let first_p1_line = text
        .lines()
        .position(|l| l == "config vpn ipsec phase1-interface")
        .unwrap() as u32
        + 1;
    let bad = text.replace("set ike-version 2", "set ike-version 3");
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.errors[0].line, first_p1_line + 3);
    assert_eq!(e.errors[0].col, 25);
}

#[test]
fn check_report_json_view() {
    let dir = std::env::temp_dir().join(format!("haven-config-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ok.conf");
    std::fs::write(&path, tunnel("        set mode-cfg disable\n", "")).unwrap();
    let r = CheckReport::run(&path);
    assert_eq!(r.exit_code(), 0);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["ok"], true);
    assert_eq!(json["summary"]["phase1"], 1);
    assert_eq!(json["warnings"][0]["key"], "mode-cfg");
    assert_eq!(json["warnings"][0]["line"], 7);
    std::fs::write(&path, tunnel("        set dpd banana\n", "")).unwrap();
    let json = serde_json::to_value(CheckReport::run(&path)).unwrap();
    assert_eq!(json["ok"], false);
    assert_eq!(json["errors"][0]["kind"]["kind"], "bad-value");
    assert_eq!(json["errors"][0]["col"], 17);
    let (code, _) = check_report(&dir);
    assert_eq!(code, 1, "a directory is not a configuration");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Haven's DPD keys: `dpd periodic`, and the exponential (PAN-OS) schedule with
/// `dpd-backoff`, `dpd-backoff-initial`, `dpd-backoff-max` (`SECONDS [MILLISECONDS]`).
#[test]
fn dpd_periodic_and_exponential_schedule() {
    let p = parse(&tunnel("", "")).unwrap();
    let p1 = &p.config.phase1[0];
    assert_eq!(p1.dpd_backoff, DpdBackoff::Fixed);
    assert_eq!(
        (p1.dpd_backoff_initial_ms, p1.dpd_backoff_max_ms),
        (1_000, 64_000)
    );
    let p = parse(&tunnel(
        "        set dpd periodic\n        set dpd-retryinterval 5\n        set dpd-retrycount 10\n        \
         set dpd-backoff exponential\n        set dpd-backoff-initial 0 500\n        set dpd-backoff-max 64\n",
        "",
    ))
    .unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let p1 = &p.config.phase1[0];
    assert_eq!(p1.dpd, DpdMode::Periodic);
    assert_eq!(p1.dpd_backoff, DpdBackoff::Exponential);
    assert_eq!(
        (p1.dpd_backoff_initial_ms, p1.dpd_backoff_max_ms),
        (500, 64_000)
    );
    for (line, col, what) in [
        ("        set dpd-backoff sometimes\n", 25, "fixed"),
        ("        set dpd-backoff-initial 0 50\n", 35, "at least 100 ms"),
        ("        set dpd-backoff-max 3601\n", 29, "seconds 1..=3600"),
        ("        set dpd-backoff-max 1 2 3\n", 33, "SECONDS or SECONDS MILLISECONDS"),
        (
            "        set dpd-backoff exponential\n        set dpd-backoff-initial 8\n        set dpd-backoff-max 4\n",
            29,
            "not below dpd-backoff-initial",
        ),
        (
            "        set dpd-backoff exponential\n        set dpd-backoff-initial 65\n",
            33,
            "not above dpd-backoff-max",
        ),
    ] {
        let e = one_error(&tunnel(line, ""));
        assert_eq!(e.col, col, "{line:?}: {e}");
        assert!(e.to_string().contains(what), "{line:?}: {e}");
    }
}

#[test]
fn dpd_action_selects_clear_hold_or_restart() {
    let p = parse(&tunnel("", "")).unwrap();
    assert_eq!(p.config.phase1[0].dpd_action, None);
    for (word, want) in [
        ("clear", DpdAction::Clear),
        ("hold", DpdAction::Hold),
        ("restart", DpdAction::Restart),
    ] {
        let p = parse(&tunnel(&format!("        set dpd-action {word}\n"), "")).unwrap();
        assert_eq!(p.config.phase1[0].dpd_action, Some(want));
    }
    let e = one_error(&tunnel("        set dpd-action reboot\n", ""));
    assert!(e.to_string().contains("clear, hold, restart"), "{e}");
}

/// `config system interface`: `ip` in both forms (host bits kept), `type loopback`,
/// `unset ip`, 0.0.0.0 as unset; a bad mask is an error; other keys are warnings.
#[test]
fn system_interface_addresses() {
    let text = "config system interface\n\
                \x20   edit \"port5\"\n        set ip 172.31.2.1 255.255.255.0\n        set mtu-override enable\n    next\n\
                \x20   edit \"lb1\"\n        set type loopback\n        set ip 192.168.202.35/32\n    next\n\
                \x20   edit \"port9\"\n        set ip 10.0.0.1 255.255.255.0\n        unset ip\n    next\n\
                \x20   edit \"port4\"\n        set ip 0.0.0.0 0.0.0.0\n        config ipv6\n        end\n    next\n\
                end\n";
    let p = parse(text).unwrap();
    let i = &p.config.interfaces;
    assert_eq!(i.len(), 4);
    assert_eq!(i[0].ip, Some(("172.31.2.1".parse().unwrap(), 24)));
    assert_eq!(
        (i[1].ip, i[1].loopback),
        (Some(("192.168.202.35".parse().unwrap(), 32)), true)
    );
    assert_eq!(i[2].ip, None);
    assert_eq!(i[3].ip, None);
    assert!(p.warnings.iter().any(|w| w.key == "mtu-override"));
    let e = parse(&text.replace(
        "255.255.255.0\n        set mtu",
        "255.0.255.0\n        set mtu",
    ))
    .unwrap_err();
    assert!(
        matches!(&e.first().unwrap().kind, ErrorKind::BadValue { key, .. } if key == "ip"),
        "{e}"
    );
    let e = parse(&text.replace("edit \"lb1\"", "edit \"port5\"")).unwrap_err();
    assert!(e.to_string().contains("duplicate edit"), "{e}");
}

/// `ip-version 6`: the peers are `remote-gw6` (a list, like `remote-gw`), the local
/// address `local-gw6`; `remote-gw` is then unused and `remote-gw6` is required for static.
#[test]
fn phase1_ip_version_6() {
    let p = parse(&tunnel(
        "        set ip-version 6\n        set local-gw6 2001:db8::1\n        set remote-gw6 2001:db8::2 2001:db8::3\n",
        "",
    ))
    .unwrap();
    let p1 = &p.config.phase1[0];
    assert!(p1.ipv6);
    let peers: Vec<String> = p1.remote_addrs().iter().map(|a| a.to_string()).collect();
    assert_eq!(peers, ["2001:db8::2", "2001:db8::3"]);
    assert_eq!(
        p1.local_addr().map(|a| a.to_string()).as_deref(),
        Some("2001:db8::1")
    );
    let v4 = parse(&tunnel("", "")).unwrap();
    let peers: Vec<String> = v4.config.phase1[0]
        .remote_addrs()
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(peers, ["192.0.2.1"]);
    let e = one_error(&tunnel("        set ip-version 6\n", ""));
    assert!(e.to_string().contains("set remote-gw6"), "{e}");
    let e = one_error(&tunnel(
        "        set ip-version 6\n        set remote-gw6 192.0.2.9\n",
        "",
    ));
    assert!(e.to_string().contains("IPv6 address"), "{e}");
}

/// IPv6 phase2 selectors: `subnet6` with `*-subnet6`, `ip6` with `*-start-ip6`; mixing
/// families is an error, as is a bad prefix.
#[test]
fn phase2_ipv6_selectors() {
    let p = parse(&tunnel(
        "",
        "        set src-addr-type subnet6
        set src-subnet6 fd00:99:1::5/64
        set dst-addr-type ip6
        set dst-start-ip6 fd00:99:2::2
",
    ))
    .unwrap();
    let p2 = &p.config.phase2[0];
    assert_eq!(
        p2.src,
        Selector::Subnet6 {
            addr: "fd00:99:1::".parse().unwrap(),
            prefix_len: 64
        }
    );
    assert_eq!(
        p2.dst,
        Selector::Subnet6 {
            addr: "fd00:99:2::2".parse().unwrap(),
            prefix_len: 128
        }
    );
    // Host bits set: a warning naming the prefix used.
    assert!(
        p.warnings
            .iter()
            .any(|w| w.to_string().contains("using fd00:99:1::/64")),
        "{:?}",
        p.warnings
    );
    let e = one_error(&tunnel(
        "",
        "        set src-addr-type subnet6
        set src-subnet6 fd00::/64
",
    ));
    assert!(e.to_string().contains("both IPv6"), "{e}");
    let e = one_error(&tunnel(
        "",
        "        set src-addr-type subnet6
        set src-subnet6 fd00::/129
        set dst-addr-type subnet6
",
    ));
    assert!(e.to_string().contains("IPv6 prefix"), "{e}");
}

/// `config cluster-peer` `hb-interval` (1..=20, 100 ms ticks) and `hb-lost-threshold`
/// (1..=60): defaults 2 and 6; out of range is an error.
#[test]
fn cluster_peer_heartbeat_keys() {
    let text = |extra: &str| {
        format!(
            "config system standalone-cluster\n    config cluster-peer\n        edit 1\n            \
             set peerip 10.0.0.2\n{extra}        next\n    end\nend\n"
        )
    };
    let p = parse(&text("")).unwrap();
    let peer = &p.config.standalone.unwrap().cluster_peers[0];
    assert_eq!((peer.hb_interval, peer.hb_lost_threshold), (2, 6));
    assert_eq!((peer.hb_interval_ms(), peer.lost_after_ms()), (200, 1_200));
    let p = parse(&text(
        "            set hb-interval 5\n            set hb-lost-threshold 10\n",
    ))
    .unwrap();
    let peer = &p.config.standalone.unwrap().cluster_peers[0];
    assert_eq!((peer.hb_interval_ms(), peer.lost_after_ms()), (500, 5_000));
    assert!(p.warnings.iter().all(|w| !w.key.starts_with("hb-")));
    let e = parse(&text("            set hb-interval 21\n")).unwrap_err();
    assert!(
        matches!(&e.first().unwrap().kind, ErrorKind::BadValue { key, .. } if key == "hb-interval"),
        "{e}"
    );
}

/// An FGCP pair that is also an FGSP peer: a failover as slow as the FGSP loss time is
/// warned about, with both times; one well below it is not. A pair without FGSP, or FGSP
/// without a pair, has nothing to compare.
#[test]
fn an_fgcp_failover_slower_than_the_fgsp_loss_time_warns() {
    let conf = |ha_hb: &str, fgsp_hb: &str| {
        format!(
            "config system ha\n    set group-id 1\n    set mode a-p\n    set password \"pair-pw\"\n\
             \x20   set hbdev \"port4\" 50\n{ha_hb}end\n\
             config system standalone-cluster\n    set group-member-id 1\n    config cluster-peer\n\
             \x20       edit 1\n            set peerip 172.31.2.2\n{fgsp_hb}        next\n    end\nend\n"
        )
    };
    let warned = |text: &str| -> Vec<String> {
        parse(text)
            .unwrap()
            .warnings
            .iter()
            .filter(|w| w.key == "hb-lost-threshold")
            .map(|w| w.to_string())
            .collect()
    };
    // FortiOS defaults on both links: 200 ms x 6 each.
    let w = warned(&conf("", ""));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("line 1, column 1: warning: hb-lost-threshold in config system ha"),
        "{}",
        w[0]
    );
    assert!(
        w[0].contains("takes 1200 ms") && w[0].contains("after 1200 ms"),
        "{}",
        w[0]
    );
    // 100 ms x 20 against 300 ms x 6.
    let w = warned(&conf(
        "    set hb-interval 1\n    set hb-lost-threshold 20\n",
        "            set hb-interval 3\n",
    ));
    assert!(
        w.len() == 1 && w[0].contains("takes 2000 ms") && w[0].contains("after 1800 ms"),
        "{w:?}"
    );
    // 200 ms x 3 = 600 ms, well below 1.2 s.
    assert!(warned(&conf(
        "    set hb-interval 2\n    set hb-lost-threshold 3\n",
        ""
    ))
    .is_empty());
    // Without the other link.
    let pair_only = "config system ha\n    set group-id 1\n    set mode a-p\n    \
                     set password \"pair-pw\"\n    set hbdev \"port4\" 50\nend\n";
    assert!(warned(pair_only).is_empty());
}
