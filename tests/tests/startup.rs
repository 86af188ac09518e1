//! Fatal startup problems: each daemon exits non-zero with one line saying what and where.

use std::time::Duration;

use std::path::Path;

use haven_tests::daemons::{
    as_strs, daemon_args, unique_loopback, wait_ctl_socket, Daemon, TempDir, DAEMONS,
};

const CONFIG: &str = include_str!("../../ops/examples/haven.conf");

fn expect_fatal(daemon: &str, args: &[String], needle: &str) {
    let (code, stderr) = Daemon::spawn(daemon, &as_strs(args)).wait_exit(Duration::from_secs(10));
    assert_eq!(
        code,
        Some(1),
        "{daemon} {args:?} should exit 1, stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("fatal")).collect();
    assert_eq!(
        lines.len(),
        1,
        "{daemon}: want one fatal line, got: {stderr}"
    );
    assert!(
        lines[0].starts_with(&format!("{daemon}: fatal: ")) && lines[0].contains(needle),
        "{daemon}: fatal line lacks {needle:?}: {stderr}"
    );
}

#[test]
fn unreadable_config_is_fatal_with_its_path() {
    let dir = TempDir::new("start");
    let run = dir.path().join("run");
    for d in DAEMONS {
        let args = daemon_args(Path::new("/nonexistent/haven.conf"), &run, None, &[]);
        expect_fatal(d, &args, "/nonexistent/haven.conf");
    }
}

#[test]
fn invalid_config_is_fatal_with_line_and_column() {
    let dir = TempDir::new("start");
    let conf = dir.path().join("bad.conf");
    std::fs::write(&conf, "config vpn ipsec phase1-interface\n    edit \"v\"\n        set dpd banana\n        set ike-version 2\n        set type dynamic\n        set interface \"port2\"\n        set psksecret \"k\"\n    next\nend\n").unwrap();
    let run = dir.path().join("run");
    expect_fatal(
        "ikemgr",
        &daemon_args(&conf, &run, None, &[]),
        "bad.conf:3:",
    );
}

#[test]
fn unwritable_run_dir_is_fatal() {
    let dir = TempDir::new("start");
    let conf = dir.path().join("haven.conf");
    std::fs::write(&conf, CONFIG).unwrap();
    // A regular file where the run-dir should be.
    let run = dir.path().join("not-a-dir");
    std::fs::write(&run, b"").unwrap();
    expect_fatal("espd", &daemon_args(&conf, &run, None, &[]), "run-dir");
}

#[test]
fn taken_metrics_port_is_fatal() {
    let dir = TempDir::new("start");
    let conf = dir.path().join("haven.conf");
    std::fs::write(&conf, CONFIG).unwrap();
    let run = dir.path().join("run");
    let ip = unique_loopback();
    let holder = std::net::TcpListener::bind(format!("{ip}:0")).unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    expect_fatal("dpdmon", &daemon_args(&conf, &run, Some(&addr), &[]), &addr);
}

#[test]
fn second_instance_on_same_run_dir_is_refused() {
    let dir = TempDir::new("start");
    let conf = dir.path().join("haven.conf");
    std::fs::write(&conf, CONFIG).unwrap();
    let run = dir.path().join("run");
    let ip = unique_loopback();
    let a1 = format!("{ip}:9701");
    let a2 = format!("{ip}:9711");
    let first = Daemon::spawn(
        "hasyncd",
        &as_strs(&daemon_args(&conf, &run, Some(&a1), &[])),
    );
    // Wait until the first one answers on its control socket.
    wait_ctl_socket(&run, "hasyncd", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    expect_fatal(
        "hasyncd",
        &daemon_args(&conf, &run, Some(&a2), &[]),
        "already running",
    );
    drop(first);
}

#[test]
fn daemon_outlives_a_closed_stderr_and_stops_on_sigterm() {
    let dir = TempDir::new("start");
    let conf = dir.path().join("haven.conf");
    std::fs::write(&conf, CONFIG).unwrap();
    let run = dir.path().join("run");
    let addr = format!("{}:9701", unique_loopback());
    let args = daemon_args(&conf, &run, Some(&addr), &["--log-level", "debug"]);
    let mut d = Daemon::spawn("ikemgr", &as_strs(&args));
    wait_ctl_socket(&run, "ikemgr", Duration::from_secs(10));
    // Whoever read its log is gone: the next log lines go to a closed pipe.
    drop(d.child.stderr.take());
    drop(d.child.stdout.take());
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let (code, _) = d.wait_exit(Duration::from_secs(10));
    assert_eq!(
        code,
        Some(0),
        "ikemgr must log to a closed stderr without dying and stop on SIGTERM"
    );
}
