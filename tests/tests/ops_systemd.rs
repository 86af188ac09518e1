//! The systemd units in `ops/systemd/`:
//! - `ops/systemd/verify` (systemd-analyze verify in a scratch root, failing on any
//!   diagnostic, plus the restart/target/run-dir properties) passes, and fails on a copy with
//!   a misspelt key;
//! - each daemon runs with only the capabilities its unit grants (`CapabilityBoundingSet=`,
//!   applied here with `setpriv --bounding-set … --nnp` to root, as systemd does) and still
//!   gets its privileged resources: espd its TUN device and raw ESP socket, ikemgr UDP 500,
//!   hasyncd its heartbeat socket bound to the hbdev (dpdmon's CAP_NET_RAW is for tunnel
//!   monitors, not configured here). espd with no capability at all is refused its datapath
//!   (so the check can fail).
//!   The units under a real systemd (syscall filter, address families, read-only system,
//!   device policy, restarts, the target): `ops_systemd_boot.rs`.

mod espd_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use haven_tests::daemons::{bin, vpnctl_json, wait_for, workspace_root, DAEMONS};
use haven_tests::netns::{veth, Netns, Proc, ScratchDir};

fn units_dir() -> PathBuf {
    workspace_root().join("ops/systemd")
}

fn run_verify(dir: &Path) -> (bool, String) {
    let out = Command::new(units_dir().join("verify"))
        .arg(dir)
        .output()
        .expect("run ops/systemd/verify");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn units_pass_systemd_analyze_verify_and_a_broken_copy_does_not() {
    let (ok, text) = run_verify(&units_dir());
    assert!(ok, "ops/systemd/verify failed:\n{text}");

    let copy = ScratchDir::new("units-broken").expect("scratch");
    for e in std::fs::read_dir(units_dir()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, copy.path().join(p.file_name().unwrap())).unwrap();
    }
    let espd = copy.path().join("haven-espd.service");
    let text = std::fs::read_to_string(&espd).unwrap();
    std::fs::write(&espd, text.replace("ProtectHome=yes", "ProtectHoem=yes")).unwrap();
    let (ok, text) = run_verify(copy.path());
    assert!(!ok, "a misspelt key passed:\n{text}");
    assert!(text.contains("ProtectHoem"), "{text}");
}

/// `+cap_a,+cap_b` for setpriv from a unit's `CapabilityBoundingSet=` line.
fn unit_caps(daemon: &str) -> String {
    let unit = std::fs::read_to_string(units_dir().join(format!("haven-{daemon}.service")))
        .expect("unit file");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap_or_else(|| panic!("haven-{daemon}.service has no CapabilityBoundingSet"));
    line.split_whitespace()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            format!(",+{}", c.strip_prefix("cap_").unwrap_or(&c))
        })
        .collect()
}

/// Starts `daemon` in `ns` as root restricted to `caps` (setpriv syntax after `-all`).
fn spawn_restricted(ns: &Netns, dir: &Path, conf: &Path, daemon: &str, caps: &str) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{daemon}.log"))).unwrap();
    let mut cmd = ns.command("setpriv");
    cmd.arg(format!("--bounding-set=-all{caps}"))
        .arg(format!("--inh-caps=-all{caps}"))
        .arg("--nnp")
        .arg("--")
        .arg(bin(daemon))
        .arg("--config")
        .arg(conf)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .args(["--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    ns.spawn_command(cmd).expect("setpriv")
}

fn metric(ns: &Netns, port: u16, name: &str) -> Result<f64, String> {
    let out = ns
        .exec(
            "curl",
            &[
                "-sS",
                "--max-time",
                "3",
                &format!("http://127.0.0.1:{port}/metrics"),
            ],
        )
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .ok_or_else(|| format!("{name} not in /metrics:\n{text}"))
}

const CONFIG_EXTRA: &str = r#"
config system ha
    set group-id 9
    set group-name "capstest"
    set mode a-p
    set password "caps-test-secret"
    set hbdev "ha0" 50
end
config vpn ipsec phase1-interface
    edit "hub"
        set ike-version 2
        set type static
        set interface "out0"
        set remote-gw 172.31.5.2
        set psksecret "caps-test-psk"
    next
end
"#;

#[test]
fn each_daemon_runs_with_only_its_units_capabilities() {
    let ns = Netns::new("caps").expect("netns");
    veth(&ns, "out0", &ns, "peer0").expect("veth out0");
    veth(&ns, "ha0", &ns, "ha1").expect("veth ha0");
    ns.add_addr("out0", "172.31.5.1/24").unwrap();
    ns.add_addr("ha0", "10.77.0.1/24").unwrap();
    let dir = ScratchDir::new("caps").expect("scratch");
    let conf = dir.path().join("haven.conf");
    let mk = espd_common::config(
        "172.31.5.1",
        "172.31.5.2",
        0x3001,
        0x3002,
        "10.77.1.0/24",
        "10.77.2.0/24",
        false,
    );
    std::fs::write(&conf, mk + CONFIG_EXTRA).unwrap();
    let _procs: Vec<Proc> = DAEMONS
        .iter()
        .map(|d| spawn_restricted(&ns, dir.path(), &conf, d, &unit_caps(d)))
        .collect();
    let log =
        |d: &str| std::fs::read_to_string(dir.path().join(format!("{d}.log"))).unwrap_or_default();
    let run = dir.path().join("run");
    wait_for("four daemons up", Duration::from_secs(30), || {
        let v = vpnctl_json(&run, &["status"])?;
        match v.as_array() {
            Some(rows) if rows.iter().all(|r| r["state"] == "up") => Ok(()),
            _ => Err(format!("{v}")),
        }
    });
    wait_for(
        "espd datapath with its TUN device",
        Duration::from_secs(20),
        || {
            let up = metric(&ns, 9704, "espd_datapath_up")?;
            let tun = metric(&ns, 9704, "espd_tun_devices")?;
            if up == 1.0 && tun >= 1.0 {
                Ok(())
            } else {
                Err(format!("datapath_up={up} tun={tun}\n{}", log("espd")))
            }
        },
    );
    wait_for("ikemgr on UDP 500", Duration::from_secs(20), || {
        let l = log("ikemgr");
        if l.contains("listening on UDP 500") {
            Ok(())
        } else {
            Err(l)
        }
    });
    wait_for(
        "hasyncd heartbeat socket on ha0",
        Duration::from_secs(20),
        || {
            let l = log("hasyncd");
            if l.contains("FGCP link up on ha0") {
                Ok(())
            } else {
                Err(l)
            }
        },
    );
    for d in DAEMONS {
        let l = log(d);
        assert!(
            !l.contains("Operation not permitted") && !l.contains("Permission denied"),
            "{d} was refused something with its unit's capabilities:\n{l}"
        );
    }
    drop(_procs);

    // Negative control: espd without any capability gets no datapath.
    let dir2 = ScratchDir::new("caps-none").expect("scratch");
    let _espd = spawn_restricted(&ns, dir2.path(), &conf, "espd", "");
    let log2 = || std::fs::read_to_string(dir2.path().join("espd.log")).unwrap_or_default();
    wait_for(
        "espd without capabilities refused",
        Duration::from_secs(20),
        || match metric(&ns, 9704, "espd_datapath_up") {
            Ok(v) if v == 0.0 && !log2().is_empty() => Ok(()),
            other => Err(format!("{other:?}\n{}", log2())),
        },
    );
}
