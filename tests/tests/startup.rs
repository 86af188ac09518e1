//! Fatal startup problems: each daemon exits non-zero with one line saying what and where.

use std::time::Duration;

use haven_tests::daemons::{unique_loopback, Daemon, TempDir, DAEMONS};

const CONFIG: &str = include_str!("../../ops/examples/haven.conf");

fn expect_fatal(daemon: &str, args: &[&str], needle: &str) {
    let (code, stderr) = Daemon::spawn(daemon, args).wait_exit(Duration::from_secs(10));
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
        expect_fatal(
            d,
            &[
                "--config",
                "/nonexistent/haven.conf",
                "--run-dir",
                run.to_str().unwrap(),
            ],
            "/nonexistent/haven.conf",
        );
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
        &[
            "--config",
            conf.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
        ],
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
    expect_fatal(
        "espd",
        &[
            "--config",
            conf.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
        ],
        "run-dir",
    );
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
    expect_fatal(
        "dpdmon",
        &[
            "--config",
            conf.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "--metrics-listen",
            &addr,
        ],
        &addr,
    );
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
    let args = |a: &str| -> Vec<String> {
        vec![
            "--config".into(),
            conf.to_str().unwrap().into(),
            "--run-dir".into(),
            run.to_str().unwrap().into(),
            "--metrics-listen".into(),
            a.into(),
        ]
    };
    let first_args = args(&a1);
    let first = Daemon::spawn(
        "hasyncd",
        &first_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // Wait until the first one answers on its control socket.
    let sock = run.join("ctl").join("hasyncd.sock");
    haven_tests::daemons::wait_for("first hasyncd up", Duration::from_secs(10), || {
        if sock.exists() {
            Ok(())
        } else {
            Err("no control socket yet".into())
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let second_args = args(&a2);
    expect_fatal(
        "hasyncd",
        &second_args.iter().map(String::as_str).collect::<Vec<_>>(),
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
    let mut d = Daemon::spawn(
        "ikemgr",
        &[
            "--config",
            conf.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "--metrics-listen",
            &addr,
            "--log-level",
            "debug",
        ],
    );
    let sock = run.join("ctl").join("ikemgr.sock");
    haven_tests::daemons::wait_for("ikemgr up", Duration::from_secs(10), || {
        if sock.exists() {
            Ok(())
        } else {
            Err("no control socket yet".into())
        }
    });
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
