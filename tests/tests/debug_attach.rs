//! Debug attach: `vpnctl debug attach` and the FortiOS spelling
//! (`diagnose debug application ike -1` + `diagnose debug enable`) stream a daemon's debug
//! lines live; the daemon raises its level only while someone is attached.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use haven_tests::daemons::{
    as_strs, bin, daemon_args, unique_loopback, vpnctl, vpnctl_json, wait_for, Daemon, TempDir,
};

const CONFIG: &str = include_str!("../../ops/examples/haven.conf");

struct Streamer {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Streamer {
    fn start(run: &std::path::Path, args: &[&str]) -> Self {
        let mut child = Command::new(bin("vpnctl"))
            .arg("--run-dir")
            .arg(run)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vpnctl");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Streamer { child, lines: rx }
    }

    /// Waits for a line containing `needle`, re-running `poke` every second.
    fn expect(&self, needle: &str, limit: Duration, mut poke: impl FnMut()) -> String {
        let start = Instant::now();
        let mut seen = Vec::new();
        while start.elapsed() < limit {
            poke();
            let until = Instant::now() + Duration::from_secs(1);
            while Instant::now() < until {
                if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
                    if l.contains(needle) {
                        return l;
                    }
                    seen.push(l);
                }
            }
        }
        panic!("no line with {needle:?} within {limit:?}; saw: {seen:#?}");
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_ikemgr(dir: &TempDir) -> (Daemon, std::path::PathBuf) {
    let conf = dir.path().join("haven.conf");
    std::fs::write(&conf, CONFIG).unwrap();
    let run = dir.path().join("run");
    let addr = format!("{}:9701", unique_loopback());
    let args = daemon_args(&conf, &run, Some(&addr), &["--log-level", "error"]);
    let d = Daemon::spawn("ikemgr", &as_strs(&args));
    let r = run.clone();
    wait_for("ikemgr answering", Duration::from_secs(15), || {
        let v = vpnctl_json(&r, &["status"])?;
        if v[0]["state"] == "up" {
            Ok(())
        } else {
            Err(format!("{v}"))
        }
    });
    (d, run)
}

#[test]
fn attach_streams_lines_in_fortios_style_and_detach_restores_level() {
    let dir = TempDir::new("dbg");
    let (_ikemgr, run) = start_ikemgr(&dir);

    let s = Streamer::start(&run, &["debug", "attach", "ikemgr", "--level", "debug"]);
    // A reload logs at info, below the daemon's own level (error): only the attached
    // session may see it.
    let line = s.expect("configuration reloaded", Duration::from_secs(15), || {
        let _ = vpnctl(&run, &["config", "reload"]);
    });
    assert!(
        line.starts_with("ike 0: "),
        "not in the seeds' style: {line}"
    );
    drop(s);

    // The daemon's own level is unchanged by the session.
    let st = vpnctl_json(&run, &["status"]).unwrap();
    assert_eq!(st[0]["log_level"], "error");
}

#[test]
fn fortios_spelling_selects_application_and_streams() {
    let dir = TempDir::new("dbg");
    let (_ikemgr, run) = start_ikemgr(&dir);
    let out = vpnctl(&run, &["diagnose", "debug", "application", "ike", "-1"]);
    assert!(out.status.success(), "{out:?}");
    let s = Streamer::start(&run, &["diagnose", "debug", "enable"]);
    s.expect("configuration reloaded", Duration::from_secs(15), || {
        let _ = vpnctl(&run, &["config", "reload"]);
    });
    drop(s);
    let out = vpnctl(&run, &["diagnose", "debug", "reset"]);
    assert!(out.status.success());
    let out = vpnctl(&run, &["diagnose", "debug", "enable"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "enable with nothing selected must fail"
    );
}

#[test]
fn vpnctl_says_what_to_do_when_daemon_is_down() {
    let dir = TempDir::new("dbg");
    let run = dir.path().join("run");
    let out = vpnctl(&run, &["debug", "attach", "espd"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("espd is not running") && err.contains("systemctl status haven-espd"),
        "{err}"
    );
    let out = vpnctl(&run, &["status"]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| l.contains(" down ")).count(),
        4,
        "{text}"
    );
}
