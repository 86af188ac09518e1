//! The units of `ops/systemd/` under a real systemd: the machine's `/lib/systemd/systemd`
//! boots as PID 1 of its own PID, mount and cgroup namespaces inside gwb's network namespace
//! (`ops/systemd/sandbox`: private /etc overlay, /run, /tmp, /var, /dev; the machine's own
//! services hidden; the boot units that act on the whole machine masked), with the four
//! units, `haven.target` and this build's binaries installed where the units expect them.
//!
//! ```text
//! client 10.99.1.2 - gwa (charon) 172.31.0.1 ==== 172.31.0.20 (local-gw) gwb (systemd: Haven) - 10.99.2.2 server
//!                                                  gwb ha0 <-> ha1 (FGCP heartbeat device)
//! ```
//!
//! `vpn1` is a static IKEv2 phase1 from gwb's `local-gw` (hasyncd adds it and announces it by
//! ARP: AF_PACKET), with a tunnel monitor (dpdmon's raw ICMP socket bound to the TUN device)
//! and DPD; ikemgr adds its routes with `ip`, espd its TUN device, raw ESP and UDP 4500
//! sockets. Everything runs with the units' capability sets, syscall filters, address
//! families and file system protections. The test:
//! - `systemctl enable --now haven.target` starts the four units; `vpnctl status` (inside)
//!   shows them up; none was restarted and none logged a refused operation;
//! - the tunnel comes up with strongSwan, the monitor answers, the client pings the server
//!   through it, the local-gw was announced by ARP;
//! - each daemon, SIGKILLed in turn, is restarted by systemd (`NRestarts`, a new `MainPID`,
//!   back on the bus), and the ping crosses the tunnel again afterwards;
//! - `systemctl reload haven-ikemgr` makes the same process reload /etc/haven/haven.conf;
//!   `systemctl restart haven.target` restarts all four;
//! - with a configuration that does not load, dpdmon is restarted until the start limit and
//!   then left `failed` ("Start request repeated too quickly"); `reset-failed` + `start`
//!   after the fix;
//! - `systemctl stop haven.target` stops all four and leaves no daemon process.
//!
//! Without `/lib/systemd/systemd` the test says so and returns (it is skipped); anything
//! else missing (strongSwan, a cgroup2 mount, overlayfs) fails it. Every namespace, process
//! and cgroup is removed on drop, also when the test fails.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use haven_tests::daemons::{bin_dir, wait_for, workspace_root, DAEMONS};
use haven_tests::netns::{self, output_timeout, Netns, Proc, ScratchDir, SiteToSite};
use haven_tests::strongswan::{self, Charon, ChildCfg, Conn, SwanctlConf};
use serde_json::Value;

const SYSTEMD: &str = "/lib/systemd/systemd";
const PSK: &str = "haven-systemd-strongswan-psk-0123456789";
const GW_ID: &str = "gwb.haven.test";
const PEER_ID: &str = "gwa.haven.test";
/// gwb's local-gw on out0: hasyncd holds it as the (single) FGCP primary.
const LOCAL_GW: &str = "172.31.0.20";
const WAIT: Duration = Duration::from_secs(60);

fn gateway_config() -> String {
    format!(
        "config system ha
    set group-id 7
    set group-name \"sdtest\"
    set mode a-p
    set password \"haven-systemd-ha\"
    set hbdev \"ha0\" 50
    set priority 200
end
config vpn ipsec phase1-interface
    edit \"vpn1\"
        set type static
        set remote-gw {}
        set local-gw {LOCAL_GW}
        set interface \"out0\"
        set ike-version 2
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set localid \"{GW_ID}\"
        set nattraversal forced
        set dpd on-idle
        set dpd-retrycount 3
        set dpd-retryinterval 2
        set psksecret \"{PSK}\"
        set tunnel-monitor enable
        set tunnel-monitor-destination-ip {}
        set tunnel-monitor-source-ip {}
        set tunnel-monitor-interval 1
        set tunnel-monitor-threshold 5
    next
end
config vpn ipsec phase2-interface
    edit \"vpn1\"
        set phase1name \"vpn1\"
        set proposal aes128gcm
        set pfs disable
        set src-subnet {}
        set dst-subnet {}
    next
end
",
        SiteToSite::GWA_OUTER,
        SiteToSite::GWA_INNER,
        SiteToSite::GWB_INNER,
        SiteToSite::LAN_B,
        SiteToSite::LAN_A
    )
}

fn peer_conf() -> SwanctlConf {
    SwanctlConf::new().conn(
        Conn::psk("gw", SiteToSite::GWA_OUTER, LOCAL_GW, PSK.as_bytes())
            .ids(PEER_ID, GW_ID)
            .proposals(&["aes128gcm16-prfsha256-ecp256"])
            .child(
                ChildCfg::new("net", SiteToSite::LAN_A, SiteToSite::LAN_B)
                    .esp_proposals(&["aes128gcm16"]),
            ),
    )
}

/// A cgroup v2 directory made by `ops/systemd/sandbox`; removed (innermost first) on drop
/// once the processes in it are gone.
struct CgroupDir(PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        for _ in 0..200 {
            if !self.0.exists() {
                return;
            }
            let _ = Command::new("find")
                .arg(&self.0)
                .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                .output();
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("ops_systemd_boot: could not remove {}", self.0.display());
    }
}

fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            if right.split_whitespace().next()? == "cgroup2" {
                left.split_whitespace().nth(4).map(PathBuf::from)
            } else {
                None
            }
        })
        .expect("no cgroup2 file system mounted: the sandbox needs one")
}

/// A systemd booted by `ops/systemd/sandbox` in `ns`. Fields drop in order: systemd and its
/// PID namespace first (SIGKILL through `unshare --kill-child`), then the cgroup, then files.
struct Sandbox {
    _unshare: Proc,
    _cgroup: CgroupDir,
    state: ScratchDir,
    /// systemd's pid as the machine sees it.
    pid1: u32,
}

impl Sandbox {
    fn boot(ns: &Netns, config: &str) -> Sandbox {
        let state = ScratchDir::new("sd-state").expect("scratch");
        let conf = state.path().join("haven.conf");
        std::fs::write(&conf, config).expect("config");
        let cg_name = format!("{}{}-{}", netns::PREFIX, std::process::id(), ns.label());
        // A leftover of an earlier process with this pid (killed before its guards ran).
        drop(CgroupDir(cgroup2_mount().join(&cg_name)));
        let cgroup = CgroupDir(cgroup2_mount().join(&cg_name));
        let log = std::fs::File::create(state.path().join("sandbox.log")).expect("log");
        let mut cmd = Command::new(workspace_root().join("ops/systemd/sandbox"));
        cmd.arg(ns.name())
            .arg(state.path())
            .arg(bin_dir())
            .arg(&conf)
            .arg(&cg_name)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let mut unshare = ns.spawn_command(cmd).expect("ops/systemd/sandbox");
        let ready = state.path().join("ready");
        let sandbox_log =
            || std::fs::read_to_string(state.path().join("sandbox.log")).unwrap_or_default();
        wait_for("the sandbox's mounts", Duration::from_secs(30), || {
            if ready.exists() {
                Ok(())
            } else if !unshare.is_running() {
                panic!("ops/systemd/sandbox ended:\n{}", sandbox_log());
            } else {
                Err(sandbox_log())
            }
        });
        let id = unshare.id();
        let pid1 = wait_for("systemd's pid", Duration::from_secs(10), || {
            std::fs::read_to_string(format!("/proc/{id}/task/{id}/children"))
                .map_err(|e| e.to_string())?
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| "no child yet".to_string())
        });
        let sb = Sandbox {
            _unshare: unshare,
            _cgroup: cgroup,
            state,
            pid1,
        };
        wait_for("systemd booted basic.target", WAIT, || {
            let o = sb.run(&["systemctl", "is-system-running"]);
            let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
            match s.as_str() {
                "running" => Ok(()),
                "degraded" => panic!(
                    "systemd booted degraded:\n{}",
                    sb.text(&["systemctl", "--failed", "--no-pager"])
                ),
                _ => Err(format!("{s} {}", String::from_utf8_lossy(&o.stderr))),
            }
        });
        sb
    }

    /// Runs `args` inside systemd's mount, PID and network namespaces.
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.pid1.to_string(), "-m", "-p", "-n", "--"])
            .args(args);
        output_timeout(&mut cmd, Duration::from_secs(30)).expect("nsenter")
    }

    /// stdout and stderr of [`Sandbox::run`].
    fn text(&self, args: &[&str]) -> String {
        let o = self.run(args);
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// Like [`Sandbox::run`], panicking on a non-zero exit.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "{args:?}: {:?}\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// One property of a unit (`systemctl show -p NAME --value`).
    fn prop(&self, unit: &str, name: &str) -> String {
        self.ok(&["systemctl", "show", "-p", name, "--value", unit])
            .trim()
            .to_string()
    }

    fn journal(&self, daemon: &str) -> String {
        self.text(&[
            "journalctl",
            "--no-pager",
            "-o",
            "short-monotonic",
            "-u",
            &format!("haven-{daemon}.service"),
        ])
    }

    fn journals(&self) -> String {
        DAEMONS
            .iter()
            .map(|d| format!("--- {d}:\n{}", tail(&self.journal(d), 25)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn vpnctl_json(&self, args: &[&str]) -> Result<Value, String> {
        let mut all = vec!["vpnctl", "--json"];
        all.extend_from_slice(args);
        let o = self.run(&all);
        serde_json::from_slice(&o.stdout).map_err(|e| {
            format!(
                "vpnctl {args:?}: {e}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
    }

    /// All four daemons on the bus (`vpnctl status` inside).
    fn all_up(&self) -> Result<(), String> {
        let v = self.vpnctl_json(&["status"])?;
        match v.as_array() {
            Some(rows) if rows.len() == 4 && rows.iter().all(|r| r["state"] == "up") => Ok(()),
            _ => Err(format!("{v}")),
        }
    }

    fn tunnel(&self) -> Value {
        self.vpnctl_json(&["diagnose", "vpn", "tunnel", "list"])
            .ok()
            .and_then(|v| {
                v["tunnels"]
                    .as_array()
                    .and_then(|l| l.iter().find(|t| t["name"] == "vpn1").cloned())
            })
            .unwrap_or_default()
    }

    /// Panics with the journal of the first daemon that logged a refused operation.
    fn assert_nothing_refused(&self) {
        for d in DAEMONS {
            let j = self.journal(d);
            for w in REFUSED {
                assert!(
                    !j.contains(w),
                    "haven-{d} was refused something ({w}):\n{j}"
                );
            }
        }
    }

    fn tunnel_up(&self) -> Result<(), String> {
        self.assert_nothing_refused();
        let t = self.tunnel();
        let sas = t["sas"].as_array().map_or(0, Vec::len);
        if sas > 0 && t["monitor"]["state"] == "up" {
            Ok(())
        } else {
            Err(format!("{t}\n{}", self.journals()))
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Words a daemon logs when the sandboxing refused it something.
const REFUSED: [&str; 4] = [
    "Operation not permitted",
    "Permission denied",
    "Address family not supported",
    "Read-only file system",
];

fn ping_through(line: &SiteToSite, sb: &Sandbox, what: &str) {
    wait_for(what, WAIT, || {
        line.client
            .ping(SiteToSite::SERVER, 2)
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}\n{}", sb.tunnel(), sb.journals()))
    });
}

#[test]
fn the_units_run_restart_and_stop_under_a_real_systemd() {
    if !std::path::Path::new(SYSTEMD).exists() {
        eprintln!("SKIPPED: {SYSTEMD} is absent; the units cannot be booted under systemd here");
        return;
    }
    if let Err(e) = strongswan::preflight() {
        panic!("cannot run the strongSwan peer on this machine: {e}");
    }
    let line = SiteToSite::new("sdb").expect("topology");
    netns::veth(&line.gwb, "ha0", &line.gwb, "ha1").expect("veth ha0");
    line.gwb.add_addr("ha0", "10.78.0.1/24").expect("ha0");
    let mut peer = Charon::start(&line.gwa).expect("charon in gwa");
    peer.load(&peer_conf()).expect("load gwa");

    let sb = Sandbox::boot(&line.gwb, &gateway_config());
    // /etc/default/haven is read by every unit (EnvironmentFile=).
    sb.ok(&[
        "sh",
        "-c",
        "echo HAVEN_LOG_LEVEL=debug > /etc/default/haven",
    ]);
    sb.ok(&["systemctl", "enable", "--now", "haven.target"]);
    // Enabled = started at boot with multi-user.target.
    assert_eq!(
        sb.ok(&["systemctl", "is-enabled", "haven.target"]).trim(),
        "enabled"
    );
    let wants = sb.prop("multi-user.target", "Wants");
    assert!(
        wants.split_whitespace().any(|u| u == "haven.target"),
        "{wants}"
    );
    for d in DAEMONS {
        let u = format!("haven-{d}.service");
        wait_for(&format!("{u} active"), WAIT, || {
            let s = sb.prop(&u, "ActiveState");
            (s == "active")
                .then_some(())
                .ok_or_else(|| format!("{s}\n{}", sb.journal(d)))
        });
    }
    wait_for("four daemons on the bus", WAIT, || sb.all_up());

    // The tunnel: ikemgr from the local-gw hasyncd holds, espd's TUN and sockets, dpdmon's
    // monitor, ikemgr's route; then traffic.
    wait_for("vpn1 up and its monitor answered", WAIT * 2, || {
        sb.tunnel_up()
    });
    let addrs = line.gwb.ip(&["-4", "addr", "show", "dev", "out0"]).unwrap();
    assert!(addrs.contains(&format!("{LOCAL_GW}/32")), "{addrs}");
    let routes = line.gwb.ip(&["route", "show", SiteToSite::LAN_A]).unwrap();
    assert!(routes.contains("dev vpn1"), "ikemgr's route: {routes}");
    ping_through(&line, &sb, "client pings the server through vpn1");
    let ha = sb.journal("hasyncd");
    assert!(
        ha.contains(&format!("gratuitous ARP for {LOCAL_GW} on out0"))
            && !ha.contains(&format!("gratuitous ARP for {LOCAL_GW} on out0:")),
        "hasyncd's ARP announcement of the local-gw:\n{ha}"
    );
    sb.assert_nothing_refused();
    for d in DAEMONS {
        let j = sb.journal(d);
        assert_eq!(
            sb.prop(&format!("haven-{d}.service"), "NRestarts"),
            "0",
            "haven-{d} restarted before any kill:\n{j}"
        );
    }
    for d in DAEMONS {
        let rating = sb.text(&[
            "systemd-analyze",
            "security",
            "--no-pager",
            &format!("haven-{d}.service"),
        ]);
        println!("{}", rating.lines().last().unwrap_or_default());
    }

    // SIGKILL each daemon in turn: systemd starts it again (Restart=always, RestartSec=1).
    for d in DAEMONS {
        let u = format!("haven-{d}.service");
        let before = sb.prop(&u, "MainPID");
        sb.ok(&["kill", "-KILL", &before]);
        let after = wait_for(&format!("{u} restarted"), WAIT, || {
            let n = sb.prop(&u, "NRestarts");
            let pid = sb.prop(&u, "MainPID");
            let state = sb.prop(&u, "ActiveState");
            if n == "1" && state == "active" && pid != before && pid != "0" {
                Ok(pid)
            } else {
                Err(format!(
                    "NRestarts={n} MainPID={pid} {state}\n{}",
                    sb.journal(d)
                ))
            }
        });
        // RestartSec=1: the gap between the exit and the new start (printed, not asserted).
        let us = |p: &str| sb.prop(&u, p).parse::<u64>().unwrap_or(0);
        let gap_ms = us("ActiveEnterTimestampMonotonic")
            .saturating_sub(us("ActiveExitTimestampMonotonic"))
            / 1000;
        println!("{u}: SIGKILLed pid {before}, restarted as {after} {gap_ms} ms after its exit");
        wait_for(&format!("{d} back on the bus"), WAIT, || sb.all_up());
    }
    wait_for("vpn1 up again after the restarts", WAIT * 2, || {
        sb.tunnel_up()
    });
    ping_through(&line, &sb, "the ping crosses vpn1 after the restarts");

    // reload = SIGHUP: the same process reads its configuration again.
    let pid = sb.prop("haven-ikemgr.service", "MainPID");
    sb.ok(&["systemctl", "reload", "haven-ikemgr.service"]);
    wait_for("ikemgr reloaded its configuration", WAIT, || {
        let j = sb.journal("ikemgr");
        j.contains("configuration reloaded from /etc/haven/haven.conf")
            .then_some(())
            .ok_or_else(|| tail(&j, 20))
    });
    assert_eq!(sb.prop("haven-ikemgr.service", "MainPID"), pid);
    assert_eq!(sb.prop("haven-ikemgr.service", "ActiveState"), "active");
    sb.ok(&["vpnctl", "status"]);

    // `systemctl restart haven.target` restarts all four.
    let pids: Vec<String> = DAEMONS
        .iter()
        .map(|d| sb.prop(&format!("haven-{d}.service"), "MainPID"))
        .collect();
    sb.ok(&["systemctl", "restart", "haven.target"]);
    for (d, old) in DAEMONS.iter().zip(&pids) {
        let u = format!("haven-{d}.service");
        wait_for(&format!("{u} restarted with the target"), WAIT, || {
            let pid = sb.prop(&u, "MainPID");
            let state = sb.prop(&u, "ActiveState");
            (state == "active" && &pid != old && pid != "0")
                .then_some(())
                .ok_or_else(|| format!("{state} MainPID={pid} (was {old})"))
        });
    }
    wait_for(
        "four daemons on the bus after the target's restart",
        WAIT,
        || sb.all_up(),
    );

    // A configuration that does not load: the unit restarts dpdmon until the start limit
    // (20 starts a minute), then leaves it failed instead of looping; the operator fixes the
    // file and clears the failure.
    sb.ok(&["cp", "/etc/haven/haven.conf", "/etc/haven/haven.conf.good"]);
    sb.ok(&["sh", "-c", "echo 'config bogus' > /etc/haven/haven.conf"]);
    sb.ok(&["systemctl", "restart", "haven-dpdmon.service"]);
    wait_for("haven-dpdmon given up", Duration::from_secs(120), || {
        let a = sb.prop("haven-dpdmon.service", "ActiveState");
        let j = sb.journal("dpdmon");
        if a == "failed" && j.contains("Start request repeated too quickly") {
            Ok(())
        } else {
            Err(format!("{a}\n{}", tail(&j, 5)))
        }
    });
    let j = sb.journal("dpdmon");
    assert!(
        j.contains("unknown block"),
        "dpdmon says why:\n{}",
        tail(&j, 10)
    );
    println!(
        "haven-dpdmon with a broken configuration: {} restarts, then failed ({})",
        sb.prop("haven-dpdmon.service", "NRestarts"),
        sb.prop("haven-dpdmon.service", "Result")
    );
    sb.ok(&["mv", "/etc/haven/haven.conf.good", "/etc/haven/haven.conf"]);
    sb.ok(&["systemctl", "reset-failed", "haven-dpdmon.service"]);
    sb.ok(&["systemctl", "start", "haven-dpdmon.service"]);
    wait_for("dpdmon back after the fix", WAIT, || sb.all_up());

    // Stop the target: all four stop, no daemon process is left.
    sb.ok(&["systemctl", "stop", "haven.target"]);
    for d in DAEMONS {
        let s = sb.prop(&format!("haven-{d}.service"), "ActiveState");
        assert_eq!(s, "inactive", "haven-{d} after stop:\n{}", sb.journal(d));
    }
    let ps = sb.ok(&["ps", "-e", "-o", "comm="]);
    for d in DAEMONS {
        assert!(!ps.lines().any(|l| l.trim() == d), "{d} still runs:\n{ps}");
    }
    let st = sb.run(&["vpnctl", "status"]);
    assert_eq!(
        st.status.code(),
        Some(3),
        "vpnctl status with no daemon: {st:?}"
    );
    let st = sb.run(&["vpnctl", "diagnose", "vpn", "tunnel", "list"]);
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(
        st.status.code() == Some(3) && err.contains("systemctl status haven-espd"),
        "vpnctl with espd stopped: {st:?}"
    );
    println!("sandbox files: {}", sb.state.path().display());
}
