//! hasyncd replicates ikemgr's CHILD SAs to the other FGCP member: two members (ikemgr +
//! hasyncd each, network namespaces, heartbeats on a bridge) carry the same manual-key
//! tunnel `vpn1`; the primary sends its `sa.child` records over the HA link and the
//! secondary keeps them as standby copies. Tunnel roles: `sync-primary` on the primary,
//! `standby` on the secondary. Timings are not asserted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bus_schema::{ctl_call, Body, CtlReply, CtlRequest, DaemonKind};
use haven_tests::daemons::{bin, vpnctl_json, wait_for, TempDir};
use haven_tests::netns::{preflight, veth, Netns, Proc};
use serde_json::Value;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn hasyncd_view(run: &Path, name: &str) -> Result<Value, String> {
    let req = CtlRequest::View {
        name: name.into(),
        args: vec![],
    };
    match rt().block_on(ctl_call(
        run,
        DaemonKind::Hasyncd,
        &req,
        Duration::from_secs(2),
    )) {
        Ok(CtlReply::View(v)) => Ok(v),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn tunnel_role(run: &Path, tunnel: &str) -> Option<String> {
    let snap = rt()
        .block_on(ctl_call(
            run,
            DaemonKind::Hasyncd,
            &CtlRequest::Snapshot,
            Duration::from_secs(2),
        ))
        .ok()?;
    let CtlReply::Snapshot(s) = snap else {
        return None;
    };
    s.items.into_iter().find_map(|b| match b {
        Body::TunnelRole { tunnel: t, role } if t == tunnel => Some(role),
        _ => None,
    })
}

const CONFIG: &str = "config system ha\n    set group-id 3\n    set mode a-p\n    \
    set password pairpw\n    set hbdev \"port4\" 50\n    set priority PRIO\n    \
    set hb-interval 1\n    set hb-lost-threshold 3\nend\n\
    config vpn ipsec manualkey-interface\n    edit \"vpn1\"\n        set interface \"out0\"\n        \
    set local-gw 10.9.0.1\n        set remote-gw 10.9.0.2\n        set enc-alg aes128gcm\n        \
    set enc-key 0102030405060708-090a0b0c0d0e0f10-11121314\n        set local-spi 0x1001\n        \
    set remote-spi 0x2001\n        set encapsulation none\n        set src-subnet 10.1.0.0/24\n        \
    set dst-subnet 10.2.0.0/24\n    next\nend\n";

#[test]
fn primary_child_sas_become_standby_copies_on_the_secondary() {
    preflight().expect("preflight");
    let dir = TempDir::new("hasyncd-repl");
    let hub = Netns::new("harepl-hub").unwrap();
    hub.add_bridge("br0").unwrap();
    let mut keep: Vec<(Netns, Vec<Proc>)> = Vec::new();
    let mut runs: Vec<PathBuf> = Vec::new();
    for (i, prio) in [200u8, 100].iter().enumerate() {
        let ns = Netns::new(&format!("harepl-m{i}")).unwrap();
        veth(&ns, "port4", &hub, &format!("v{i}")).unwrap();
        hub.enslave(&format!("v{i}"), "br0").unwrap();
        hub.link_up(&format!("v{i}")).unwrap();
        ns.link_up("port4").unwrap();
        ns.add_addr("port4", &format!("169.254.0.{}/24", i + 1))
            .unwrap();
        let run = dir.path().join(format!("m{i}"));
        std::fs::create_dir_all(&run).unwrap();
        let conf = dir.path().join(format!("m{i}.conf"));
        std::fs::write(&conf, CONFIG.replace("PRIO", &prio.to_string())).unwrap();
        let mut procs = Vec::new();
        for (d, port) in [("ikemgr", "9701"), ("hasyncd", "9703")] {
            let args = [
                "--config".to_string(),
                conf.display().to_string(),
                "--run-dir".to_string(),
                run.display().to_string(),
                "--metrics-listen".to_string(),
                format!("127.0.0.1:{port}"),
            ];
            procs.push(
                ns.spawn(bin(d).to_str().unwrap(), &args)
                    .expect("spawn daemon"),
            );
        }
        keep.push((ns, procs));
        runs.push(run);
    }
    let role = |run: &Path| -> Option<String> {
        vpnctl_json(run, &["diagnose", "sys", "ha", "status"]).ok()?["role"]
            .as_str()
            .map(str::to_string)
    };
    wait_for(
        "m0 primary, m1 secondary",
        Duration::from_secs(20),
        || match (role(&runs[0]), role(&runs[1])) {
            (Some(a), Some(b)) if a == "primary" && b == "secondary" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let me0 = hasyncd_view(&runs[0], "ha-status").unwrap()["me"].clone();
    let standby = wait_for("standby copy on m1", Duration::from_secs(20), || {
        let v = hasyncd_view(&runs[1], "replicas")?;
        match v["standby"].as_array() {
            Some(a) if !a.is_empty() => Ok(v),
            _ => Err(v.to_string()),
        }
    });
    let s = &standby["standby"][0];
    assert_eq!(s["tunnel"], "vpn1", "{standby}");
    assert_eq!(s["spi_in"], "00001001", "{standby}");
    assert_eq!(s["from"], me0, "{standby}");
    assert_eq!(s["link"], "fgcp", "{standby}");
    // The primary carries its own record. (It may also hold a copy from m1: when m1 left
    // its hello phase first it was primary for a moment and sent its records.)
    let v0 = hasyncd_view(&runs[0], "replicas").unwrap();
    assert_eq!(v0["local"], 1, "{v0}");

    wait_for("tunnel roles", Duration::from_secs(20), || {
        match (tunnel_role(&runs[0], "vpn1"), tunnel_role(&runs[1], "vpn1")) {
            (Some(a), Some(b)) if a == "sync-primary" && b == "standby" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let metrics = keep[1]
        .0
        .run("curl", &["-s", "http://127.0.0.1:9703/metrics"])
        .unwrap_or_default();
    assert!(
        metrics.contains("hasyncd_tunnels{role=\"standby\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("hasyncd_standby_child_sas 1"), "{metrics}");
}
