//! hasyncd's FGCP election and FGSP peering over real sockets, in network namespaces.
//!
//! Members sit on one bridge (their `port4`, the `hbdev`). Only hasyncd runs (no ikemgr:
//! no tunnels, so the roles checked here are the members' `ha.member` roles). Timings
//! are printed, never asserted; waits have generous limits.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use haven_tests::daemons::{bin, vpnctl, vpnctl_json, wait_for, TempDir};
use haven_tests::netns::{preflight, veth, Netns, Proc};

struct Member {
    ns: Netns,
    run_dir: PathBuf,
    config: PathBuf,
    proc: Option<Proc>,
}

impl Member {
    fn start(&mut self) {
        let args = [
            "--config",
            self.config.to_str().unwrap(),
            "--run-dir",
            self.run_dir.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:9703",
        ];
        let p = self
            .ns
            .spawn(bin("hasyncd").to_str().unwrap(), &args)
            .expect("spawn hasyncd");
        self.proc = Some(p);
    }

    fn status(&self) -> Result<serde_json::Value, String> {
        vpnctl_json(&self.run_dir, &["diagnose", "sys", "ha", "status"])
    }

    fn role(&self) -> Option<String> {
        self.status().ok()?["role"].as_str().map(str::to_string)
    }

    fn metrics(&self) -> String {
        self.ns
            .run("curl", &["-s", "http://127.0.0.1:9703/metrics"])
            .unwrap_or_default()
    }
}

fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn fgcp_config(priority: u8, password: Option<&str>) -> String {
    let pw = password
        .map(|p| format!("    set password {p}\n"))
        .unwrap_or_default();
    format!(
        "config system ha\n    set group-id 1\n    set group-name \"T1\"\n    set mode a-p\n{pw}    \
         set hbdev \"port4\" 50\n    set priority {priority}\n    set override disable\n    \
         set hb-interval 1\n    set hb-lost-threshold 3\nend\n"
    )
}

/// `n` members on a bridge in a hub namespace, each with `configs[i]`.
fn cluster(label: &str, dir: &Path, configs: &[String]) -> (Netns, Vec<Member>) {
    preflight().expect("preflight");
    let hub = Netns::new(&format!("{label}-hub")).unwrap();
    hub.add_bridge("br0").unwrap();
    let mut members = Vec::new();
    for (i, cfg) in configs.iter().enumerate() {
        let ns = Netns::new(&format!("{label}-m{i}")).unwrap();
        let hub_if = format!("v{i}");
        veth(&ns, "port4", &hub, &hub_if).unwrap();
        hub.enslave(&hub_if, "br0").unwrap();
        hub.link_up(&hub_if).unwrap();
        ns.link_up("port4").unwrap();
        ns.add_addr("port4", &format!("172.31.1.{}/24", i + 1))
            .unwrap();
        let run_dir = dir.join(format!("m{i}"));
        std::fs::create_dir_all(&run_dir).unwrap();
        let config = dir.join(format!("m{i}.conf"));
        std::fs::write(&config, cfg).unwrap();
        members.push(Member {
            ns,
            run_dir,
            config,
            proc: None,
        });
    }
    for m in &mut members {
        m.start();
    }
    (hub, members)
}

/// Waits until exactly one member is primary and all others secondary; returns its index.
fn one_primary(members: &[&Member], limit: Duration) -> usize {
    wait_for("one primary, the rest secondary", limit, || {
        let roles: Vec<Option<String>> = members.iter().map(|m| m.role()).collect();
        let p: Vec<usize> = (0..roles.len())
            .filter(|&i| roles[i].as_deref() == Some("primary"))
            .collect();
        let s = roles
            .iter()
            .filter(|r| r.as_deref() == Some("secondary"))
            .count();
        if p.len() == 1 && s + 1 == roles.len() {
            Ok(p[0])
        } else {
            Err(format!("roles {roles:?}"))
        }
    })
}

#[test]
fn fgcp_three_members_elect_by_priority_and_fail_over() {
    let dir = TempDir::new("hasyncd-fgcp3");
    let configs = [
        fgcp_config(200, Some("s3cret-ha")),
        fgcp_config(100, Some("s3cret-ha")),
        fgcp_config(50, Some("s3cret-ha")),
    ];
    let (_hub, mut m) = cluster("hafgcp", dir.path(), &configs);
    let all: Vec<&Member> = m.iter().collect();
    let p = one_primary(&all, Duration::from_secs(20));
    assert_eq!(p, 0, "highest priority (200) must win with equal ages");
    let st = m[0].status().unwrap();
    assert_eq!(st["members"].as_array().unwrap().len(), 3, "{st}");

    // The text view in seed 001's layout.
    let out = vpnctl(&m[1].run_dir, &["diagnose", "sys", "ha", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Mode=2 Group=1"), "{text}");
    assert!(
        text.contains("HA group member information: is_manage_primary=0."),
        "{text}"
    );
    assert_eq!(
        text.matches("      Primary, serialno_prio=0, usr_priority=200")
            .count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("    Secondary, serialno_prio=").count(),
        2,
        "{text}"
    );

    // Kill the primary's hasyncd: member 1 (priority 100) takes over.
    let t0 = Instant::now();
    m[0].proc.take().unwrap().kill_now().unwrap();
    let rest: Vec<&Member> = m[1..].iter().collect();
    let p = one_primary(&rest, Duration::from_secs(20));
    println!(
        "takeover seen by vpnctl after {:?} (hb 100 ms x 3 lost; polling adds up to 100 ms)",
        t0.elapsed()
    );
    assert_eq!(p, 0, "member 1 (priority 100) must take over");
    let metrics = m[1].metrics();
    assert_eq!(metric(&metrics, "hasyncd_failovers_total"), 1, "{metrics}");
    assert_eq!(metric(&metrics, "hasyncd_role"), 2, "{metrics}");
    assert!(
        metric(&metrics, "hasyncd_sync_messages_received_total") > 0,
        "{metrics}"
    );

    // The old primary comes back. With override disabled age counts first, but only
    // beyond the 300 s `ha-uptime-diff-margin`: all ages are inside it here, so priority
    // decides and member 0 (200) is primary again (FortiOS behaves the same).
    m[0].start();
    let all: Vec<&Member> = m.iter().collect();
    let p = one_primary(&all, Duration::from_secs(20));
    assert_eq!(p, 0, "ages within the margin: priority 200 wins again");
}

#[test]
fn fgcp_without_password_runs_standalone_and_says_why() {
    let dir = TempDir::new("hasyncd-nopw");
    let configs = [fgcp_config(200, None)];
    let (_hub, m) = cluster("hanopw", dir.path(), &configs);
    let st = wait_for("hasyncd answers", Duration::from_secs(20), || m[0].status());
    assert_eq!(st["mode"], "standalone", "{st}");
    let member = vpnctl_json(&m[0].run_dir, &["show", "snapshot", "hasyncd"]).unwrap();
    assert!(member.to_string().contains("\"primary\""), "{member}");
}

/// A datagram that does not come from a key holder, and a replay of a real one, sent to
/// the heartbeat port: both dropped, counted by reason, and the roles do not move.
#[test]
fn forged_and_replayed_datagrams_are_dropped_and_counted() {
    let dir = TempDir::new("hasyncd-hostile");
    let configs = [
        fgcp_config(200, Some("s3cret-ha")),
        fgcp_config(100, Some("s3cret-ha")),
    ];
    let (hub, m) = cluster("hahost", dir.path(), &configs);
    let all: Vec<&Member> = m.iter().collect();
    assert_eq!(one_primary(&all, Duration::from_secs(20)), 0);

    // An attacker on the heartbeat segment.
    let evil = Netns::new("hahost-evil").unwrap();
    veth(&evil, "eth0", &hub, "vx").unwrap();
    hub.enslave("vx", "br0").unwrap();
    hub.link_up("vx").unwrap();
    evil.link_up("eth0").unwrap();
    evil.add_addr("eth0", "172.31.1.99/24").unwrap();
    // Capture one real heartbeat, then send it back (replay) and a forged one (a valid
    // header for group 1, garbage ciphertext), to member 1.
    let script = r#"
import socket, sys
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
r.bind(("0.0.0.0", 703))
r.settimeout(10)
while True:
    d, a = r.recvfrom(70000)
    if a[0] == "172.31.1.1":
        break
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):
    s.sendto(d, ("172.31.1.2", 703))
hdr = bytes([2, 1, 0, 1]) + (7).to_bytes(4, "big") + (1).to_bytes(8, "big") + (5).to_bytes(8, "big") + (1).to_bytes(8, "big")
s.sendto(hdr + b"\x00" * 64, ("172.31.1.2", 703))
s.sendto(b"\x01", ("172.31.1.2", 703))
print("sent")
"#;
    let before = m[1].metrics();
    let out = evil
        .run("python3", &["-c", script])
        .expect("attacker script");
    assert!(out.contains("sent"), "{out}");
    let metrics = wait_for("drops counted", Duration::from_secs(10), || {
        let t = m[1].metrics();
        let replay = metric(
            &t,
            "hasyncd_link_drops_total{link=\"fgcp\",reason=\"replayed\"}",
        );
        let forged = metric(
            &t,
            "hasyncd_link_drops_total{link=\"fgcp\",reason=\"auth_failed\"}",
        ) + metric(
            &t,
            "hasyncd_link_drops_total{link=\"fgcp\",reason=\"stale_epoch\"}",
        );
        let short = metric(
            &t,
            "hasyncd_link_drops_total{link=\"fgcp\",reason=\"truncated\"}",
        );
        // Its own broadcasts come back to its socket: the reader drops them and the
        // count still reaches the metric.
        let reflected = metric(
            &t,
            "hasyncd_link_drops_total{link=\"fgcp\",reason=\"reflected\"}",
        );
        if replay >= 3 && forged >= 1 && short >= 1 && reflected >= 1 {
            Ok(t)
        } else {
            Err(format!(
                "replayed={replay} forged={forged} truncated={short} reflected={reflected}\n{t}"
            ))
        }
    });
    println!("before:\n{before}\nafter:\n{metrics}");
    assert_eq!(metric(&metrics, "hasyncd_failovers_total"), 0);
    assert_eq!(m[0].role().as_deref(), Some("primary"));
    assert_eq!(m[1].role().as_deref(), Some("secondary"));
    assert_eq!(
        m[1].status().unwrap()["members"].as_array().unwrap().len(),
        2
    );
}

/// Liveness comes only from authenticated heartbeats: once the primary is dead, a stream
/// of heartbeats under its name (a captured one replayed, and copies with a newer counter
/// in the clear header over the old ciphertext) does not keep it alive; the secondary
/// takes over as if the segment were silent.
#[test]
fn forged_heartbeats_do_not_keep_a_dead_primary_alive() {
    let dir = TempDir::new("hasyncd-forgedhb");
    let configs = [
        fgcp_config(200, Some("s3cret-ha")),
        fgcp_config(100, Some("s3cret-ha")),
    ];
    let (hub, mut m) = cluster("hafhb", dir.path(), &configs);
    let all: Vec<&Member> = m.iter().collect();
    assert_eq!(one_primary(&all, Duration::from_secs(20)), 0);

    let evil = Netns::new("hafhb-evil").unwrap();
    veth(&evil, "eth0", &hub, "vx").unwrap();
    hub.enslave("vx", "br0").unwrap();
    hub.link_up("vx").unwrap();
    evil.link_up("eth0").unwrap();
    evil.add_addr("eth0", "172.31.1.99/24").unwrap();
    let marker = dir.path().join("captured");
    // Captures one heartbeat of member 0, says so, then for 60 s sends every 20 ms the
    // replay and a copy with a newer counter to member 1.
    let script = r#"
import socket, sys, time
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
r.bind(("0.0.0.0", 703))
r.settimeout(10)
while True:
    d, a = r.recvfrom(70000)
    if a[0] == "172.31.1.1" and len(d) > 1 and d[1] == 1:
        break
open(sys.argv[1], "w").write("ok")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n = int.from_bytes(d[16:24], "big")
end = time.time() + 60
while time.time() < end:
    n += 1
    s.sendto(d, ("172.31.1.2", 703))
    s.sendto(d[:16] + n.to_bytes(8, "big") + d[24:], ("172.31.1.2", 703))
    time.sleep(0.02)
"#;
    let _forger = evil
        .spawn("python3", &["-c", script, marker.to_str().unwrap()])
        .expect("forger");
    wait_for("a heartbeat captured", Duration::from_secs(15), || {
        if marker.exists() {
            Ok(())
        } else {
            Err("no heartbeat of member 0 seen yet".to_string())
        }
    });
    m[0].proc.take().unwrap().kill_now().unwrap();
    let rest: Vec<&Member> = m[1..].iter().collect();
    assert_eq!(one_primary(&rest, Duration::from_secs(20)), 0);
    let metrics = wait_for("forgeries counted", Duration::from_secs(10), || {
        let t = m[1].metrics();
        let forged = metric(
            &t,
            "hasyncd_link_drops_total{link=\"fgcp\",reason=\"auth_failed\"}",
        );
        let replay = metric(
            &t,
            "hasyncd_link_drops_total{link=\"fgcp\",reason=\"replayed\"}",
        );
        if forged >= 10 && replay >= 10 {
            Ok(t)
        } else {
            Err(format!("auth_failed={forged} replayed={replay}\n{t}"))
        }
    });
    assert_eq!(metric(&metrics, "hasyncd_failovers_total"), 1, "{metrics}");
    let st = m[1].status().unwrap();
    assert_eq!(st["members"].as_array().unwrap().len(), 1, "{st}");
}

/// A reload that raises the secondary's priority re-elects in place: it becomes primary
/// without restarting its HA link (same link epoch).
#[test]
fn priority_reload_reelects_without_restarting_the_link() {
    let dir = TempDir::new("hasyncd-reload");
    let configs = [
        fgcp_config(200, Some("s3cret-ha")),
        fgcp_config(100, Some("s3cret-ha")),
    ];
    let (_hub, m) = cluster("hareload", dir.path(), &configs);
    let all: Vec<&Member> = m.iter().collect();
    assert_eq!(one_primary(&all, Duration::from_secs(20)), 0);
    let epoch = m[1].status().unwrap()["epoch"].as_u64().unwrap();
    std::fs::write(&m[1].config, fgcp_config(250, Some("s3cret-ha"))).unwrap();
    let out = vpnctl(&m[1].run_dir, &["config", "reload"]);
    // Only hasyncd runs here: the others are reported as not running.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hasyncd: reloaded"), "{text}");
    wait_for(
        "m1 primary, m0 secondary",
        Duration::from_secs(20),
        || match (m[0].role(), m[1].role()) {
            (Some(a), Some(b)) if a == "secondary" && b == "primary" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let st = m[1].status().unwrap();
    assert_eq!(st["epoch"].as_u64(), Some(epoch), "link restarted: {st}");
    assert_eq!(m[0].role().as_deref(), Some("secondary"));
}
