//! `ops/bus-tap` (Python) reads the bus: JSON lines with the envelope fields, binary boot ids
//! in hex, topic filtering, bad frames on stderr, clean exit on SIGTERM and SIGINT.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bus_schema::*;
use bytes::Bytes;
use common::{now_ns, RunDir, PATIENCE};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use zeromq::{PubSocket, Socket, SocketSend, ZmqMessage};

fn bus_tap() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ops/bus-tap")
}

fn spawn_tap(run: &RunDir, extra: &[&str]) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(bus_tap())
        .arg("--run-dir")
        .arg(run.path())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run ops/bus-tap");
    let out = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, out)
}

/// Publish `make()` every 50 ms until bus-tap prints a line satisfying `want`, and return it.
async fn pump_until(
    out: &mut Lines<BufReader<ChildStdout>>,
    mut make: impl FnMut(),
    want: impl Fn(&Value) -> bool,
    seen: &mut Vec<Value>,
) -> Value {
    if let Some(v) = seen.iter().find(|v| want(v)) {
        return v.clone();
    }
    let found = tokio::time::timeout(PATIENCE, async {
        loop {
            make();
            while let Ok(line) =
                tokio::time::timeout(Duration::from_millis(50), out.next_line()).await
            {
                let line = line.expect("read").expect("bus-tap exited early");
                let v: Value = serde_json::from_str(&line).expect("one JSON object per line");
                let hit = want(&v);
                seen.push(v.clone());
                if hit {
                    return v;
                }
            }
        }
    })
    .await;
    match found {
        Ok(v) => v,
        Err(_) => panic!("bus-tap did not print the expected line; it printed {seen:?}"),
    }
}

async fn signal_and_wait(mut child: Child, sig: i32) -> std::process::ExitStatus {
    let pid = child.id().expect("running") as i32;
    // SAFETY: plain kill(2) on the pid of our own child process.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("bus-tap exits after the signal")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_tap_prints_envelopes_as_json_lines_and_exits_on_sigterm() {
    let run = RunDir::new("tap");
    let ike = BusPublisher::bind(run.path(), DaemonKind::Ikemgr)
        .await
        .unwrap();
    let esp = BusPublisher::bind(run.path(), DaemonKind::Espd)
        .await
        .unwrap();
    // dpdmon's socket carries garbage, to see bus-tap report it and carry on.
    std::fs::create_dir_all(run.path().join("bus")).unwrap();
    let mut raw = PubSocket::new();
    raw.bind(&pub_endpoint(run.path(), DaemonKind::Dpdmon))
        .await
        .unwrap();

    let (child, mut out) = spawn_tap(
        &run,
        &[
            "--daemon", "ikemgr", "--daemon", "espd", "--daemon", "dpdmon",
        ],
    );
    let boot: u128 = 0x00ff_0000_0000_0000_0000_0000_0000_ab01;
    let mut ike_owner = Owner::new(DaemonKind::Ikemgr, boot);
    let mut esp_owner = Owner::new(DaemonKind::Espd, 3);
    let mut seen = Vec::new();

    // Slow joiner: heartbeats until bus-tap's subscriptions to both publishers are live.
    pump_until(
        &mut out,
        || {
            ike.publish(&ike_owner.stamp(Body::Heartbeat { uptime_ms: 5 }, now_ns()))
                .unwrap();
        },
        |v| v["src"] == "ikemgr",
        &mut seen,
    )
    .await;
    pump_until(
        &mut out,
        || {
            esp.publish(&esp_owner.stamp(Body::Heartbeat { uptime_ms: 5 }, now_ns()))
                .unwrap();
        },
        |v| v["src"] == "espd",
        &mut seen,
    )
    .await;

    let mut garbage = ZmqMessage::from(Bytes::from_static(b"dpd.state"));
    garbage.push_back(Bytes::from_static(b"\xc1\xc1"));
    raw.send(garbage).await.unwrap();
    let mut t = TunnelInfo {
        name: "vpn1".into(),
        phase1: "vpn1".into(),
        kind: TunnelKind::Static,
        local_gw: None,
        remote_gw: Some("203.0.113.9".into()),
        interface: Some("port1".into()),
        state: TunnelState::Up,
        phase2: vec!["vpn1-p2".into()],
        dpd: DpdSettings::default(),
    };
    t.dpd.mode = "on-idle".into();
    let tunnel = ike_owner.stamp(Body::Tunnel(t), 1_700_000_000_000_000_001);
    ike.publish(&tunnel).unwrap();
    let esp_env = esp_owner.stamp(
        Body::EspTunnel(EspTunnelInfo {
            tunnel: "vpn1".into(),
            device: "tun0".into(),
            sa_in: 0xdead_beef,
            sa_out: 1,
            rx_pkts: u64::MAX,
            tx_pkts: 0,
            rx_bytes: 0,
            tx_bytes: 0,
        }),
        7,
    );
    esp.publish(&esp_env).unwrap();

    let v = pump_until(&mut out, || {}, |v| v["topic"] == "tunnel.state", &mut seen).await;
    assert_eq!(v["schema"], 1);
    assert_eq!(v["src"], "ikemgr");
    assert_eq!(v["boot"], "00ff000000000000000000000000ab01");
    assert_eq!(v["boot"], boot_hex(boot));
    assert_eq!(v["seq"], tunnel.seq);
    assert_eq!(v["ts_ns"], 1_700_000_000_000_000_001u64);
    assert_eq!(v["body"]["type"], "Tunnel");
    assert_eq!(v["body"]["data"]["name"], "vpn1");
    assert_eq!(v["body"]["data"]["local_gw"], Value::Null);
    assert_eq!(v["body"]["data"]["kind"], "static");
    assert_eq!(v["body"]["data"]["phase2"][0], "vpn1-p2");
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    let mut want = vec!["topic", "schema", "src", "boot", "seq", "ts_ns", "body"];
    want.sort();
    let mut got = keys.clone();
    got.sort();
    assert_eq!(got, want);

    let v = pump_until(&mut out, || {}, |v| v["topic"] == "esp.tunnel", &mut seen).await;
    assert_eq!(v["body"]["data"]["rx_pkts"], u64::MAX);
    assert_eq!(v["body"]["data"]["sa_in"], 0xdead_beefu32);
    assert_eq!(v["boot"], boot_hex(3));

    let status = signal_and_wait(child, libc::SIGTERM).await;
    assert!(status.success(), "{status:?}");
    assert!(seen.iter().all(|v| v["topic"] != "dpd.state"));
    ike.close().await;
    esp.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_tap_filters_by_topic_reports_bad_frames_and_exits_on_sigint() {
    let run = RunDir::new("tapf");
    std::fs::create_dir_all(run.path().join("bus")).unwrap();
    let mut raw = PubSocket::new();
    raw.bind(&pub_endpoint(run.path(), DaemonKind::Hasyncd))
        .await
        .unwrap();
    let mut child = Command::new(bus_tap())
        .arg("--run-dir")
        .arg(run.path())
        .args(["--daemon", "hasyncd", "--topic", "ha.role"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut owner = Owner::new(DaemonKind::Hasyncd, 1);
    let mut seen = Vec::new();
    let mut frames = Vec::new();
    for body in [
        Body::Heartbeat { uptime_ms: 1 },
        Body::TunnelRole {
            tunnel: "vpn1".into(),
            role: "standby".into(),
        },
    ] {
        let env = owner.stamp(body, 0);
        let mut m = ZmqMessage::from(Bytes::from_static(env.body.topic().as_bytes()));
        m.push_back(Bytes::from(encode(&env)));
        frames.push(m);
    }
    let mut bad = ZmqMessage::from(Bytes::from_static(b"ha.role"));
    bad.push_back(Bytes::from_static(b"\x92\x01"));
    // Repeat both messages until bus-tap shows the role, then send one bad frame.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let pumper = tokio::spawn(async move {
        loop {
            for m in &frames {
                raw.send(m.clone()).await.unwrap();
            }
            tokio::select! {
                _ = &mut stop_rx => break,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        raw.send(bad).await.unwrap();
        raw
    });
    let v = pump_until(&mut out, || {}, |v| v["topic"] == "ha.role", &mut seen).await;
    stop_tx.send(()).unwrap();
    let _raw = pumper.await.unwrap();
    assert_eq!(v["body"]["data"]["role"], "standby");
    assert!(
        seen.iter().all(|v| v["topic"] == "ha.role"),
        "heartbeats are filtered out: {seen:?}"
    );
    let mut next_err = async || -> Value {
        let line = tokio::time::timeout(PATIENCE, err.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        serde_json::from_str(&line).unwrap()
    };
    // The heartbeats came before the role was shown, so the daemon was reported attached first.
    let a = next_err().await;
    assert_eq!(a, serde_json::json!({"attached": "hasyncd"}));
    let e = next_err().await;
    assert_eq!(e["topic"], "ha.role");
    assert!(e["error"].as_str().is_some(), "{e}");
    let status = signal_and_wait(child, libc::SIGINT).await;
    assert!(status.success(), "{status:?}");
}
