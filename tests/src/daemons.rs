//! Running Haven's own daemons in tests: under supervisord (as in production) or directly,
//! each instance in its own temporary run-dir with its own metrics address, torn down on
//! drop even when the test fails.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The four daemons, in the order of their default metrics ports (9701..9704).
pub const DAEMONS: [&str; 4] = ["ikemgr", "dpdmon", "hasyncd", "espd"];

/// The workspace root (where `ops/` and the example config live).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where the built daemon binaries are: `$HAVEN_BIN` if set, else the cargo profile
/// directory this test binary was built into (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("HAVEN_BIN") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("target/<profile> directory")
}

/// Path of one built binary; panics with a clear message if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("haven-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback address unique to this test process and instance, so that parallel tests
/// can all bind the default metrics ports (127.0.0.0/8 is all loopback).
pub fn unique_loopback() -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id();
    format!(
        "127.{}.{}.{}",
        100 + (pid % 100),
        (pid / 100) % 250,
        1 + n % 250
    )
}

/// Runs `vpnctl` with the given run-dir and arguments.
pub fn vpnctl(run_dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("vpnctl"))
        .arg("--run-dir")
        .arg(run_dir)
        .args(args)
        .output()
        .expect("run vpnctl")
}

/// `vpnctl diagnose vpn tunnel list name <tunnel>`'s `role=` for the tunnel, if listed.
pub fn listed_role(run_dir: &Path, tunnel: &str) -> Option<String> {
    let out = vpnctl(
        run_dir,
        &["diagnose", "vpn", "tunnel", "list", "name", tunnel],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains(&format!("name={tunnel} ")) {
        return None;
    }
    let i = text.find(" role=")? + " role=".len();
    text[i..].split_whitespace().next().map(str::to_string)
}

/// Runs `vpnctl --json …` and parses its standard output.
pub fn vpnctl_json(run_dir: &Path, args: &[&str]) -> Result<serde_json::Value, String> {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = vpnctl(run_dir, &full);
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&stdout).map_err(|e| {
        format!(
            "vpnctl {:?}: exit {:?}, bad JSON ({e}): {stdout} {}",
            args,
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Polls `f` until it returns `Some`, or panics with `what` and the last error after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) => {
                if start.elapsed() > limit {
                    panic!("timed out after {limit:?} waiting for {what}: {e}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads `ops/bus-tap`'s stderr until it said `{"attached": d}` for each of `daemons` (from
/// then on the tap sees everything they publish), or panics after `limit`. The stderr is
/// drained on a thread for as long as the tap runs.
pub fn bus_tap_attached(stderr: std::process::ChildStderr, daemons: &[&str], limit: Duration) {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut missing: Vec<String> = daemons
        .iter()
        .map(|d| format!(r#"{{"attached": "{d}"}}"#))
        .collect();
    let mut seen = Vec::new();
    let deadline = Instant::now() + limit;
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                missing.retain(|m| line.trim() != m);
                seen.push(line);
            }
            Err(_) => panic!(
                "bus-tap not attached after {limit:?}: still {missing:?}; its stderr: {seen:?}"
            ),
        }
    }
}

/// Plain HTTP GET on loopback (enough for /metrics).
pub fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let (head, body) = buf
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header end in reply from {addr}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!(
            "GET {addr}{path}: {}",
            head.lines().next().unwrap_or("")
        ));
    }
    Ok(body.to_string())
}

/// Four daemons under supervisord, as `ops/haven-supervise` runs them in production.
pub struct Supervised {
    pub dir: TempDir,
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
    pub config: PathBuf,
    pub metrics_ip: String,
    supervisord: Option<Child>,
}

impl Supervised {
    /// Starts supervisord in the foreground (`-n`) with the project's supervisord.conf.
    pub fn start(config_text: &str) -> Self {
        let dir = TempDir::new("sup");
        let run_dir = dir.path().join("run");
        let log_dir = dir.path().join("log");
        std::fs::create_dir_all(&run_dir).unwrap();
        std::fs::create_dir_all(&log_dir).unwrap();
        let config = dir.path().join("haven.conf");
        std::fs::write(&config, config_text).unwrap();
        let metrics_ip = unique_loopback();
        for d in DAEMONS {
            bin(d);
        }
        let child = Command::new("supervisord")
            .arg("-n")
            .arg("-c")
            .arg(workspace_root().join("ops/supervisord.conf"))
            .env("HAVEN_BIN", bin_dir())
            .env("HAVEN_CONFIG", &config)
            .env("HAVEN_RUN_DIR", &run_dir)
            .env("HAVEN_LOG_DIR", &log_dir)
            .env("HAVEN_METRICS_IP", &metrics_ip)
            .env("HAVEN_LOG_LEVEL", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("supervisord not found: run ops/install-deps");
        Supervised {
            dir,
            run_dir,
            log_dir,
            config,
            metrics_ip,
            supervisord: Some(child),
        }
    }

    pub fn metrics_addr(&self, daemon: &str) -> String {
        let i = DAEMONS.iter().position(|d| *d == daemon).unwrap_or(0);
        format!("{}:{}", self.metrics_ip, 9701 + i)
    }

    pub fn supervisorctl(&self, args: &[&str]) -> Output {
        Command::new("supervisorctl")
            .arg("-c")
            .arg(workspace_root().join("ops/supervisord.conf"))
            .env("HAVEN_BIN", bin_dir())
            .env("HAVEN_CONFIG", &self.config)
            .env("HAVEN_RUN_DIR", &self.run_dir)
            .env("HAVEN_LOG_DIR", &self.log_dir)
            .env("HAVEN_METRICS_IP", &self.metrics_ip)
            .env("HAVEN_LOG_LEVEL", "debug")
            .args(args)
            .output()
            .expect("run supervisorctl")
    }

    /// The tail of one daemon's log, for failure messages.
    pub fn log_tail(&self, daemon: &str) -> String {
        let text =
            std::fs::read_to_string(self.log_dir.join(format!("{daemon}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(mut child) = self.supervisord.take() {
            // SIGTERM makes supervisord stop its programs and exit.
            // SAFETY: kill(2) on a pid we spawned and have not reaped.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        // Any daemon that survived (it should not) is killed by its run-dir in argv.
        let _ = Command::new("pkill")
            .arg("-9")
            .arg("-f")
            .arg(self.run_dir.to_string_lossy().as_ref())
            .status();
    }
}

/// One daemon started directly (no supervisor), killed on drop.
pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    pub fn spawn(name: &str, args: &[&str]) -> Self {
        let child = Command::new(bin(name))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn daemon");
        Daemon { child }
    }

    /// Waits for the daemon to exit and returns its status and stderr.
    pub fn wait_exit(mut self, limit: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (st.code(), err);
            }
            if Instant::now() > deadline {
                return (None, String::new());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command line every daemon takes: `--config C --run-dir R`, then
/// `--metrics-listen M` when given, then `extra` as is.
pub fn daemon_args(
    config: &Path,
    run_dir: &Path,
    metrics: Option<&str>,
    extra: &[&str],
) -> Vec<String> {
    let mut v = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--run-dir".to_string(),
        run_dir.display().to_string(),
    ];
    if let Some(m) = metrics {
        v.push("--metrics-listen".to_string());
        v.push(m.to_string());
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Borrowed view of an argument vector, for [`Daemon::spawn`].
pub fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Waits until `daemon`'s control socket exists under `run_dir`.
pub fn wait_ctl_socket(run_dir: &Path, daemon: &str, limit: Duration) {
    let sock = run_dir.join("ctl").join(format!("{daemon}.sock"));
    wait_for(&format!("{daemon} control socket"), limit, || {
        if sock.exists() {
            Ok(())
        } else {
            Err(format!("no {} yet", sock.display()))
        }
    });
}
