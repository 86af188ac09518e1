//! Key material stays out of default views: `vpnctl show snapshot` and `ops/bus-tap`
//! redact CHILD SA keys unless asked explicitly, and the daemons' logs never carry them.

use std::process::{Command, Stdio};
use std::time::Duration;

use haven_tests::daemons::{
    bus_tap_attached, unique_loopback, vpnctl, vpnctl_json, wait_for, workspace_root, Daemon,
    TempDir,
};

/// The GCM key of the fixture's "mk-gcm" tunnel, as it appears in hex.
const KEY_HEX: &str = "0102030405060708090a0b0c0d0e0f1011121314";

#[test]
fn snapshot_and_bus_tap_redact_keys_by_default() {
    let dir = TempDir::new("secrets");
    let conf = workspace_root().join("bus-schema/config/tests/fixtures/manualkey_gw_a.conf");
    let conf2 = dir.path().join("gw_a.conf");
    std::fs::copy(&conf, &conf2).unwrap();
    let run = dir.path().join("run");
    let addr = format!("{}:9701", unique_loopback());
    let mut ikemgr = Daemon::spawn(
        "ikemgr",
        &[
            "--config",
            conf2.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "--metrics-listen",
            &addr,
            "--log-level",
            "trace",
        ],
    );
    let snap = wait_for("ikemgr publishing its SAs", Duration::from_secs(15), || {
        let v = vpnctl_json(&run, &["show", "snapshot", "ikemgr"])?;
        let n = v["items"]
            .as_array()
            .map(|a| a.iter().filter(|i| i["type"] == "ChildSa").count())
            .unwrap_or(0);
        if n == 2 {
            Ok(v)
        } else {
            Err(format!("{n} ChildSa items: {v}"))
        }
    });
    let text = snap.to_string();
    assert!(
        !text.contains(KEY_HEX),
        "keys in default snapshot view: {text}"
    );
    assert!(text.contains("<redacted>"));

    let shown = vpnctl(
        &run,
        &["--json", "show", "snapshot", "ikemgr", "--show-keys"],
    );
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains(KEY_HEX),
        "--show-keys must show them"
    );

    // bus-tap sees a new SA when the configuration changes its SPI (removal + install).
    // `timeout` bounds the wait should the tap never see its two messages.
    let mut tap = Command::new("timeout")
        .arg("20")
        .arg(workspace_root().join("ops/bus-tap"))
        .args([
            "--run-dir",
            run.to_str().unwrap(),
            "--daemon",
            "ikemgr",
            "--topic",
            "sa.",
            "--count",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ops/bus-tap");
    // Reloading before the tap's subscription reached ikemgr loses the two messages (a CI
    // run: a fixed 1.5 s wait for the tap's start was too short once).
    bus_tap_attached(
        tap.stderr.take().unwrap(),
        &["ikemgr"],
        Duration::from_secs(15),
    );
    let text = std::fs::read_to_string(&conf)
        .unwrap()
        .replace("set local-spi 0x1001", "set local-spi 0x1003");
    std::fs::write(&conf2, text).unwrap();
    let out = vpnctl(&run, &["config", "reload"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ikemgr: reloaded"),
        "{out:?}"
    );
    let out = tap.wait_with_output().expect("bus-tap output");
    let lines = String::from_utf8_lossy(&out.stdout);
    assert_eq!(lines.lines().count(), 2, "bus-tap lines: {lines}");
    assert!(!lines.contains(KEY_HEX), "keys on bus-tap output: {lines}");
    assert!(lines.contains("<redacted>"));

    // Even at trace level the daemon's log carries no key bytes.
    let _ = ikemgr.child.kill();
    let mut err = String::new();
    if let Some(mut e) = ikemgr.child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert!(
        !err.contains(KEY_HEX) && !err.contains("0102030405060708"),
        "keys in log: {err}"
    );
}
