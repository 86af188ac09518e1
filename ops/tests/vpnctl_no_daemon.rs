//! vpnctl with no daemon running (an empty run-dir): every command of the tree is listed
//! below with the exit code it must give and the daemon it needs; a command that needs a
//! daemon exits 3 and says how to check and start it under systemd and supervisord; usage
//! errors exit 2; the views that make sense without a daemon print JSON with `--json`.
//! A command added to vpnctl without an entry here fails the test (the tree is read from
//! `vpnctl … --help`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vpnctl(run_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vpnctl"))
        .arg("--run-dir")
        .arg(run_dir)
        .args(["--timeout-ms", "500"])
        .args(args)
        .output()
        .expect("vpnctl")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Subcommand names listed under `Commands:` in `vpnctl PATH --help` (without `help`).
fn subcommands(path: &[String]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_vpnctl"))
        .args(path)
        .arg("--help")
        .output()
        .expect("vpnctl --help");
    assert!(out.status.success(), "{path:?} --help: {}", text(&out));
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut in_cmds = false;
    let mut v = Vec::new();
    for l in help.lines() {
        if l.starts_with("Commands:") {
            in_cmds = true;
            continue;
        }
        if in_cmds {
            if !l.starts_with("  ") {
                break;
            }
            let name = l.split_whitespace().next().unwrap_or("");
            // Continuation lines of a wrapped description are indented further.
            if l.starts_with("  ") && !l.starts_with("   ") && name != "help" {
                v.push(name.to_string());
            }
        }
    }
    v
}

fn leaves(path: Vec<String>, out: &mut BTreeSet<String>) {
    let subs = subcommands(&path);
    if subs.is_empty() {
        out.insert(path.join(" "));
    }
    for s in subs {
        let mut p = path.clone();
        p.push(s);
        leaves(p, out);
    }
}

/// (command, its arguments, exit code with no daemon, the daemon it needs)
const TABLE: &[(&str, &[&str], i32, Option<&str>)] = &[
    ("status", &[], 3, None),
    ("config check", &["/nonexistent/haven.conf"], 1, None),
    ("config reload", &[], 3, None),
    ("debug attach", &["espd"], 3, Some("espd")),
    ("diagnose sys ha status", &[], 3, Some("hasyncd")),
    ("diagnose sys ha standalone-peers", &[], 3, Some("hasyncd")),
    ("diagnose sys ha checksum show", &[], 3, Some("hasyncd")),
    ("diagnose sys ha checksum cluster", &[], 3, Some("hasyncd")),
    ("diagnose debug application", &["ike", "-1"], 0, None),
    ("diagnose debug enable", &[], 3, Some("ikemgr")),
    ("diagnose debug disable", &[], 0, None),
    ("diagnose debug reset", &[], 0, None),
    ("diagnose vpn tunnel list", &[], 3, Some("espd")),
    ("diagnose vpn tunnel flush", &[], 3, Some("espd")),
    ("diagnose vpn tunnel up", &["vpn1"], 3, Some("ikemgr")),
    ("diagnose vpn tunnel down", &["vpn1"], 3, Some("ikemgr")),
    ("diagnose vpn ike gateway list", &[], 3, Some("ikemgr")),
    ("diagnose vpn ike gateway clear", &[], 3, Some("ikemgr")),
    (
        "diagnose vpn ike export-keys",
        &["--wireshark", "WSDIR"],
        3,
        Some("ikemgr"),
    ),
    ("diagnose vpn ike lifecycle", &[], 3, Some("ikemgr")),
    ("show snapshot", &["espd"], 3, Some("espd")),
    ("show replicas", &["hasyncd"], 3, Some("hasyncd")),
    ("log-level", &["dpdmon", "debug"], 3, Some("dpdmon")),
    (
        "get",
        &["vpn", "ipsec", "tunnel", "summary"],
        3,
        Some("ikemgr"),
    ),
    ("completions", &["bash"], 0, None),
    (
        "execute",
        &["vpn", "ipsec", "tunnel", "up", "vpn1"],
        3,
        Some("ikemgr"),
    ),
];

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_command_gives_its_exit_code_and_says_what_to_do_without_daemons() {
    let dir = TempDir(std::env::temp_dir().join(format!("vpnctl-nodaemon-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let run = dir.0.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let ws = dir.0.join("ws").to_string_lossy().into_owned();

    let mut tree = BTreeSet::new();
    leaves(Vec::new(), &mut tree);
    let listed: BTreeSet<String> = TABLE.iter().map(|t| t.0.to_string()).collect();
    assert_eq!(
        tree, listed,
        "the command tree and this test's table differ"
    );

    // `enable` before any `application`: a usage error saying what to run first.
    let o = vpnctl(&run, &["diagnose", "debug", "enable"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("diagnose debug application"),
        "{}",
        text(&o)
    );

    for (cmd, args, code, daemon) in TABLE {
        let mut all: Vec<&str> = cmd.split(' ').collect();
        all.extend(
            args.iter()
                .map(|a| if *a == "WSDIR" { ws.as_str() } else { a }),
        );
        let o = vpnctl(&run, &all);
        assert_eq!(o.status.code(), Some(*code), "vpnctl {all:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "vpnctl {all:?}: {}", text(&o));
        if let Some(d) = daemon {
            for want in [
                format!("{d} is not running"),
                format!("{}/ctl/{d}.sock", run.display()),
                format!("systemctl status haven-{d}"),
                "ops/haven-supervise status".to_string(),
                format!("--run-dir {}", run.display()),
            ] {
                assert!(
                    err.contains(&want),
                    "vpnctl {all:?} should say {want:?}: {}",
                    text(&o)
                );
            }
        }
    }

    // status and config reload name every daemon and how to start them.
    let o = vpnctl(&run, &["status"]);
    let out = text(&o);
    for d in ["ikemgr", "dpdmon", "hasyncd", "espd"] {
        assert!(out.contains(&format!("{d:<8} down")), "{out}");
    }
    assert!(
        out.contains("systemctl start haven.target") && out.contains("ops/haven-supervise start"),
        "{out}"
    );
    let o = vpnctl(&run, &["config", "reload"]);
    let out = text(&o);
    for d in ["ikemgr", "dpdmon", "hasyncd", "espd"] {
        assert!(
            out.contains(&format!("{d}: not reloaded: {d} is not running")),
            "{out}"
        );
        assert!(
            out.contains(&format!("systemctl status haven-{d}")),
            "{out}"
        );
    }

    // --json where it makes sense without a daemon.
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let o = vpnctl(&run, &all);
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("vpnctl {all:?}: {e}: {}", text(&o)))
    };
    let v = json(&["status"]);
    let rows = v.as_array().expect("status rows");
    assert_eq!(rows.len(), 4, "{v}");
    for r in rows {
        assert_eq!(r["state"], "down", "{v}");
        assert!(
            r["hint"]
                .as_str()
                .is_some_and(|h| h.contains("systemctl status haven-")),
            "{v}"
        );
    }
    let v = json(&["config", "reload"]);
    assert!(
        v.as_array()
            .is_some_and(|a| a.len() == 4 && a.iter().all(|r| r["reloaded"] == false)),
        "{v}"
    );
    let v = json(&["diagnose", "debug", "application", "esp", "debug"]);
    assert_eq!(v["selection"]["esp"], "debug", "{v}");
    let v = json(&["diagnose", "debug", "reset"]);
    assert_eq!(v["selection"], serde_json::json!({}), "{v}");
    let v = json(&["config", "check", "/nonexistent/haven.conf"]);
    assert!(v.is_object(), "{v}");

    // Usage errors exit 2 and name what is expected.
    for (args, want) in [
        (&["bogus"][..], "unrecognized subcommand"),
        (
            &["log-level", "foo", "debug"][..],
            "expected ikemgr, dpdmon, hasyncd, espd",
        ),
        (&["get", "bogus"][..], "usage: get vpn ipsec tunnel summary"),
        (&["execute", "bogus"][..], "usage: execute vpn ipsec tunnel"),
        (&["completions", "fish"][..], "vpnctl completes bash"),
        (
            &["diagnose", "debug", "application", "ike", "loud"][..],
            "loud",
        ),
    ] {
        let o = vpnctl(&run, args);
        assert_eq!(o.status.code(), Some(2), "vpnctl {args:?}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(want),
            "vpnctl {args:?}: {}",
            text(&o)
        );
    }

    // The exit codes are in the help.
    let o = Command::new(env!("CARGO_BIN_EXE_vpnctl"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("Exit codes: 0 success") && help.contains("3 a daemon"),
        "{help}"
    );
}
