//! `vpnctl config check FILE`: warnings exit 0, errors exit 1 with file, line and column.

use haven_tests::daemons::{vpnctl, workspace_root, TempDir};

#[test]
fn seed_full_configuration_checks_with_warnings() {
    let file =
        workspace_root().join("bus-schema/config/tests/fixtures/002_full_configuration.conf");
    let out = vpnctl(
        std::path::Path::new("/nonexistent"),
        &["config", "check", file.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("warning:"),
        "expected warnings for unimplemented keys: {text}"
    );
}

#[test]
fn every_seed_fixture_passes_check() {
    let dir = workspace_root().join("bus-schema/config/tests/fixtures");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) != Some("conf") {
            continue;
        }
        let out = vpnctl(
            std::path::Path::new("/nonexistent"),
            &["config", "check", p.to_str().unwrap()],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}{}",
            p.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        n += 1;
    }
    assert!(n >= 5, "only {n} fixtures found in {}", dir.display());
}

#[test]
fn errors_exit_one_with_line_and_column() {
    let dir = TempDir::new("check");
    let f = dir.path().join("bad.conf");
    std::fs::write(&f, "config vpn ipsec phase1-interface\n    edit \"v\"\n        set type dynamic\n        set ike-version 2\n        set interface \"port2\"\n        set psksecret \"k\"\n        set frobnicate 7\n    next\nend\n").unwrap();
    let out = vpnctl(
        std::path::Path::new("/nonexistent"),
        &["config", "check", f.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.conf:7:"), "no file:line in {err}");
    assert!(err.contains("frobnicate"), "does not name the key: {err}");

    let out = vpnctl(
        std::path::Path::new("/nonexistent"),
        &["--json", "config", "check", f.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(v["ok"], false);
}
