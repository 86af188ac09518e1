//! The four daemons under supervisord, on the real ZeroMQ bus: each is killed with SIGKILL
//! in turn, supervisord restarts it, and every other daemon's replica of its state
//! converges again (Clone-pattern recovery, DESIGN.md §3.3). Metrics pass promtool.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bus_schema::{ctl_call, Body, CtlReply, CtlRequest, DaemonKind, StateStore};
use haven_tests::daemons::{http_get, vpnctl, vpnctl_json, wait_for, Supervised, DAEMONS};
use serde_json::Value;

const CONFIG: &str = include_str!("../../ops/examples/haven.conf");

/// Who follows whom: each daemon's `FOLLOWS`. [`converged`] fails when a daemon reports a
/// replica this list does not name, so the list cannot silently fall behind.
const FOLLOWS: [(&str, &str); 10] = [
    ("ikemgr", "hasyncd"),
    ("ikemgr", "dpdmon"),
    ("ikemgr", "espd"),
    ("dpdmon", "ikemgr"),
    ("dpdmon", "hasyncd"),
    ("dpdmon", "espd"),
    ("hasyncd", "ikemgr"),
    ("hasyncd", "espd"),
    ("espd", "ikemgr"),
    ("espd", "hasyncd"),
];

fn status(run_dir: &Path) -> Result<BTreeMap<String, Value>, String> {
    let v = vpnctl_json(run_dir, &["status"])?;
    let mut m = BTreeMap::new();
    for row in v.as_array().ok_or("status is not an array")? {
        let name = row["daemon"].as_str().unwrap_or("").to_string();
        if row["state"] != "up" {
            return Err(format!("{name} is {}", row["state"]));
        }
        m.insert(name, row.clone());
    }
    Ok(m)
}

fn ctl(run_dir: &Path, daemon: &str, req: CtlRequest) -> Result<CtlReply, String> {
    let kind = DaemonKind::from_name(daemon).ok_or_else(|| format!("no daemon {daemon}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(ctl_call(run_dir, kind, &req, Duration::from_secs(2)))
        .map_err(|e| format!("{daemon}: {e}"))
}

/// The owner's published state as a store, rebuilt from its snapshot.
fn owner_store(run_dir: &Path, daemon: &str) -> Result<(u128, StateStore), String> {
    let CtlReply::Snapshot(snap) = ctl(run_dir, daemon, CtlRequest::Snapshot)? else {
        return Err(format!("{daemon}: not a snapshot"));
    };
    let mut store = StateStore::default();
    for item in &snap.items {
        store.apply(item);
    }
    Ok((snap.boot, store))
}

/// Every follower's replica of every followed daemon matches that daemon's own state.
fn converged(run_dir: &Path) -> Result<(), String> {
    for follower in DAEMONS {
        let CtlReply::Replicas(reps) = ctl(run_dir, follower, CtlRequest::Replicas)? else {
            return Err(format!("{follower}: not a replica list"));
        };
        for r in &reps {
            if !FOLLOWS.contains(&(follower, r.src.name())) {
                panic!(
                    "{follower} follows {} but FOLLOWS does not say so",
                    r.src.name()
                );
            }
        }
    }
    for (follower, src) in FOLLOWS {
        let (boot, store) = owner_store(run_dir, src)?;
        let CtlReply::Replicas(reps) = ctl(run_dir, follower, CtlRequest::Replicas)? else {
            return Err(format!("{follower}: not a replica list"));
        };
        let src_kind = DaemonKind::from_name(src).unwrap();
        let rep = reps
            .iter()
            .find(|r| r.src == src_kind)
            .ok_or_else(|| format!("{follower} has no replica of {src}: {reps:?}"))?;
        if !rep.synced {
            return Err(format!("{follower}'s replica of {src} not synced: {rep:?}"));
        }
        if rep.boot != Some(boot) {
            return Err(format!(
                "{follower} follows {src} boot {:?}, {src} is at {boot:032x}",
                rep.boot
            ));
        }
        if rep.digest != store.digest() {
            return Err(format!(
                "{follower}'s replica of {src} differs: {rep:?} vs {} items digest {}",
                store.len(),
                store.digest()
            ));
        }
    }
    // Derived state: every daemon keeps a record for each of ikemgr's tunnels.
    let (_, ike) = owner_store(run_dir, "ikemgr")?;
    let tunnels: Vec<String> = ike
        .items()
        .filter_map(|b| match b {
            Body::Tunnel(t) => Some(t.name.clone()),
            _ => None,
        })
        .collect();
    if tunnels.is_empty() {
        return Err("ikemgr publishes no tunnel".into());
    }
    for d in ["dpdmon", "espd", "hasyncd"] {
        let (_, s) = owner_store(run_dir, d)?;
        for t in &tunnels {
            let has = s.items().any(|b| match b {
                Body::Dpd(x) => &x.tunnel == t,
                Body::EspTunnel(x) => &x.tunnel == t,
                Body::TunnelRole { tunnel, .. } => tunnel == t,
                _ => false,
            });
            if !has {
                return Err(format!("{d} has no record for tunnel {t}"));
            }
        }
    }
    Ok(())
}

fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("promtool not found ({e}): run ops/install-deps"))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn kill_each_daemon_in_turn_and_views_converge() {
    let sup = Supervised::start(CONFIG);
    let run = sup.run_dir.clone();
    let limit = Duration::from_secs(30);
    wait_for("all four daemons up", limit, || status(&run));
    wait_for("initial convergence", limit, || converged(&run));

    for victim in DAEMONS {
        let before = status(&run).unwrap();
        let pid = before[victim]["pid"].as_u64().unwrap();
        let boot = before[victim]["boot"].as_str().unwrap().to_string();
        // SAFETY: kill(2) with a pid read from the daemon itself.
        let rc = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9 {victim} ({pid})");
        let after = wait_for(&format!("{victim} restarted by supervisord"), limit, || {
            let s = status(&run)?;
            if s[victim]["boot"] == boot.as_str() {
                return Err(format!("{victim} still has boot {boot}"));
            }
            Ok(s)
        });
        assert_ne!(after[victim]["pid"].as_u64().unwrap(), pid);
        wait_for(
            &format!("convergence after killing {victim}"),
            limit,
            || {
                converged(&run)
                    .map_err(|e| format!("{e}\n--- {victim} log:\n{}", sup.log_tail(victim)))
            },
        );
        if victim == "ikemgr" {
            // dpdmon (not restarted yet) noticed the new boot and fetched a new snapshot.
            let m = http_get(&sup.metrics_addr("dpdmon"), "/metrics").unwrap();
            let value = |name: &str| -> f64 {
                m.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().last())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0)
            };
            assert!(
                value("dpdmon_bus_gaps_total") >= 1.0,
                "no gap counted:\n{m}"
            );
            assert!(
                value("dpdmon_bus_snapshots_applied_total") >= 2.0,
                "no new snapshot:\n{m}"
            );
        }
    }

    for d in DAEMONS {
        let text = http_get(&sup.metrics_addr(d), "/metrics").unwrap();
        for series in [
            format!("{d}_bus_messages_published_total"),
            format!("{d}_uptime_seconds"),
            "process_resident_memory_bytes".to_string(),
        ] {
            assert!(
                text.contains(&series),
                "{d} /metrics lacks {series}:\n{text}"
            );
        }
        if let Err(e) = promtool_check(&text) {
            panic!("promtool check metrics failed for {d}: {e}\n{text}");
        }
    }
}

#[test]
fn reload_applies_valid_config_and_refuses_invalid_one() {
    let sup = Supervised::start(CONFIG);
    let run = sup.run_dir.clone();
    let limit = Duration::from_secs(30);
    wait_for("all four daemons up", limit, || status(&run));
    wait_for("initial convergence", limit, || converged(&run));

    // An invalid file changes nothing, and the reload reports the error with its line.
    std::fs::write(&sup.config, format!("{CONFIG}\nconfig vpn ipsec phase1-interface\n  edit \"x\"\n    set type dynamic\n    set ike-version 2\n    set interface \"port1\"\n    set psksecret \"k\"\n    set dpd banana\n  next\nend\n")).unwrap();
    let out = vpnctl(&run, &["config", "reload"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "reload of an invalid config must fail"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("error:") && text.contains("banana"),
        "reload error does not say what: {text}"
    );
    let (_, ike) = owner_store(&run, "ikemgr").unwrap();
    assert!(!ike
        .items()
        .any(|b| matches!(b, Body::Tunnel(t) if t.name == "x")));

    // A valid addition reaches every daemon through the bus.
    let extra = "config vpn ipsec phase1-interface\n    edit \"hub\"\n        set ike-version 2\n        set type static\n        set interface \"port1\"\n        set remote-gw 203.0.113.9\n        set psksecret \"k\"\n    next\nend\n";
    std::fs::write(&sup.config, format!("{CONFIG}\n{extra}")).unwrap();
    let out = vpnctl(&run, &["config", "reload"]);
    assert!(out.status.success(), "reload failed: {:?}", out);
    wait_for("new tunnel everywhere", limit, || {
        converged(&run)?;
        let (_, d) = owner_store(&run, "dpdmon")?;
        if d.items()
            .any(|b| matches!(b, Body::Dpd(x) if x.tunnel == "hub"))
        {
            Ok(())
        } else {
            Err("dpdmon has no record for hub yet".into())
        }
    });

    // SIGHUP with an invalid file: still nothing changes and the daemon keeps running.
    std::fs::write(
        &sup.config,
        "config vpn ipsec phase1-interface\n edit \"y\"\n  set bogus 1\n",
    )
    .unwrap();
    let st = status(&run).unwrap();
    let pid = st["ikemgr"]["pid"].as_u64().unwrap();
    // SAFETY: kill(2) with a pid read from the daemon itself.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    let st2 = status(&run).unwrap();
    assert_eq!(st2["ikemgr"]["pid"].as_u64().unwrap(), pid);
    let (_, ike) = owner_store(&run, "ikemgr").unwrap();
    assert!(ike
        .items()
        .any(|b| matches!(b, Body::Tunnel(t) if t.name == "hub")));
}
