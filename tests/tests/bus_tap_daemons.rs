//! `ops/bus-tap` (Python, pyzmq + msgpack) follows the real daemons' bus: a reader in
//! another language sees every daemon's heartbeats and state messages with named fields.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use haven_tests::daemons::{
    bus_tap_attached, vpnctl, vpnctl_json, wait_for, workspace_root, Supervised,
};
use serde_json::Value;

const CONFIG: &str = include_str!("../../ops/examples/haven.conf");

#[test]
fn bus_tap_prints_every_daemons_messages_as_json() {
    let sup = Supervised::start(CONFIG);
    let run = sup.run_dir.clone();
    wait_for("daemons up", Duration::from_secs(30), || {
        let v = vpnctl_json(&run, &["status"])?;
        let up = v
            .as_array()
            .map(|a| a.iter().all(|r| r["state"] == "up"))
            .unwrap_or(false);
        if up {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });

    let mut tap = Command::new(workspace_root().join("ops/bus-tap"))
        .arg("--run-dir")
        .arg(&run)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ops/bus-tap (needs /usr/bin/python3 with python3-zmq, python3-msgpack)");
    let out = tap.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });

    // A new tunnel makes ikemgr publish tunnel.state and dpdmon dpd.state: the tap must
    // show both, with decoded bodies. The reload waits until the tap hears both daemons.
    bus_tap_attached(
        tap.stderr.take().unwrap(),
        &["ikemgr", "dpdmon"],
        Duration::from_secs(15),
    );
    let extra = "config vpn ipsec phase1-interface\n    edit \"tapped\"\n        set ike-version 2\n        set type dynamic\n        set interface \"port2\"\n        set psksecret \"k\"\n    next\nend\n";
    std::fs::write(&sup.config, format!("{CONFIG}\n{extra}")).unwrap();
    assert!(vpnctl(&run, &["config", "reload"]).status.success());

    let mut heartbeats = std::collections::BTreeSet::new();
    let mut saw_tunnel = false;
    let mut saw_dpd = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !(heartbeats.len() == 4 && saw_tunnel && saw_dpd) {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("bus-tap printed a non-JSON line ({e}): {line}"));
        for k in ["topic", "schema", "src", "boot", "seq", "ts_ns", "body"] {
            assert!(v.get(k).is_some(), "bus-tap line lacks {k}: {line}");
        }
        assert_eq!(v["boot"].as_str().map(str::len), Some(32), "{line}");
        match v["topic"].as_str().unwrap_or("") {
            "sys.heartbeat" => {
                heartbeats.insert(v["src"].as_str().unwrap_or("").to_string());
            }
            "tunnel.state" if v["body"]["data"]["name"] == "tapped" => saw_tunnel = true,
            "dpd.state" if v["body"]["data"]["tunnel"] == "tapped" => saw_dpd = true,
            _ => {}
        }
    }
    let _ = tap.kill();
    let _ = tap.wait();
    assert_eq!(heartbeats.len(), 4, "heartbeats seen from {heartbeats:?}");
    assert!(saw_tunnel, "no tunnel.state for the new tunnel");
    assert!(saw_dpd, "no dpd.state for the new tunnel");
}
