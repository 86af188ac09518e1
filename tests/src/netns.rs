//! Network namespaces for tests: several hosts on one machine, joined by veth pairs and bridges.
//!
//! What it does:
//! - [`Netns::new`] creates a namespace named `hv-<pid>-<n>-<label>` (unique per process and per
//!   call), with `lo` up. Clones share one namespace; when the last clone is dropped, every process
//!   still inside it (`ip netns pids`) is killed with SIGKILL and the namespace is deleted, so its
//!   veths, bridges and routes go with it. This runs during unwinding too, so a failing test
//!   cleans up after itself.
//! - [`Proc`] guards a process spawned in a namespace: dropping it kills and reaps the process.
//! - [`SiteToSite`] builds the usual four-host line (client, two gateways, server) in one call.
//! - [`Netns::nft`] loads nftables rules (drop IKE or ESP, random loss) inside a namespace.
//! - [`ScratchDir`] is a per-test directory under `/tmp` with the same naming; it is removed on
//!   drop, except while the thread is panicking, when it is kept (and its path printed) so the logs
//!   in it can be read.
//! - [`sweep_stale`] removes namespaces and scratch directories left by runs whose process is dead
//!   (SIGKILLed runs, for example). The first [`Netns::new`] of each process calls it.
//!
//! What it does not do: it never touches the host's own interfaces, addresses or routes (all
//! addresses live inside the namespaces made here), it does not emulate delay or reordering (the
//! kernel here has no `netem`), and it shells out to `ip` and `sh` rather than calling
//! `setns` itself, so the crate needs nothing beyond std.
//!
//! Every command runs under a timeout ([`DEFAULT_TIMEOUT`] unless stated), so a hung tool makes a
//! test fail rather than hang.

use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Read};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Once};
use std::thread;
use std::time::{Duration, Instant};

/// Prefix of every namespace and scratch directory this module creates.
pub const PREFIX: &str = "hv-";

/// Timeout for the short configuration commands (`ip`, sysctl writes, `kill`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where scratch directories are made.
const SCRATCH_ROOT: &str = "/tmp";

/// Linux `IFNAMSIZ` is 16 bytes including the terminating NUL.
const IFNAME_MAX: usize = 15;

/// Labels are cut to this length so names stay readable in `ip netns list`.
const LABEL_MAX: usize = 24;

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP_ONCE: Once = Once::new();

/// Errors from building and driving namespaces.
#[derive(Debug)]
pub enum Error {
    /// The machine cannot run these tests: not root, or a tool is missing.
    Environment(String),
    /// A caller passed a value this module refuses (an interface name too long, say).
    Misuse(String),
    /// A command could not be started.
    Spawn { cmd: String, source: io::Error },
    /// A command ran and exited unsuccessfully.
    Failed {
        cmd: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
    /// A command did not finish in time and was killed.
    Timeout {
        cmd: String,
        after: Duration,
        stdout: String,
        stderr: String,
    },
    /// A file-system operation failed.
    Io { what: String, source: io::Error },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Environment(m) => write!(f, "test environment not usable: {m}"),
            Error::Misuse(m) => write!(f, "misuse: {m}"),
            Error::Spawn { cmd, source } => write!(f, "cannot start `{cmd}`: {source}"),
            Error::Failed {
                cmd,
                status,
                stdout,
                stderr,
            } => write!(
                f,
                "`{cmd}` failed ({status}); stderr: {}; stdout: {}",
                stderr.trim(),
                stdout.trim()
            ),
            Error::Timeout {
                cmd,
                after,
                stdout,
                stderr,
            } => write!(
                f,
                "`{cmd}` did not finish within {after:?}; stderr: {}; stdout: {}",
                stderr.trim(),
                stdout.trim()
            ),
            Error::Io { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Spawn { source, .. } | Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks that this process can build namespaces: effective uid 0 and `ip` present.
/// Tests call it first so that a wrong machine fails with one clear message.
pub fn preflight() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|source| Error::Io {
        what: "reading /proc/self/status".into(),
        source,
    })?;
    // "Uid:\treal\teffective\tsaved\tfs"
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u32>().ok());
    match euid {
        Some(0) => {}
        Some(uid) => {
            return Err(Error::Environment(format!(
                "these tests build network namespaces and must run as root (effective uid is {uid})"
            )))
        }
        None => return Err(Error::Environment("cannot read the effective uid".into())),
    }
    require_tool("ip", &["-V"], "iproute2")?;
    Ok(())
}

/// Fails with [`Error::Environment`] unless `program args` starts and exits successfully.
pub fn require_tool(program: &str, args: &[&str], package: &str) -> Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    match output_timeout(&mut cmd, DEFAULT_TIMEOUT) {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(Error::Environment(format!(
            "`{program}` is present but `{}` failed ({}); install the Debian package {package}",
            describe(&cmd),
            out.status
        ))),
        Err(e) => Err(Error::Environment(format!(
            "`{program}` is not usable ({e}); install the Debian package {package}"
        ))),
    }
}

/// A unique name `hv-<pid>-<n>-<label>`, the label reduced to `[a-z0-9-]`.
fn unique_name(label: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let clean: String = label
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(LABEL_MAX)
        .collect();
    format!("{PREFIX}{}-{n}-{clean}", std::process::id())
}

/// The pid encoded in a name made by [`unique_name`] (or by the bench scripts, `hv-<pid>-…`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits = rest.split('-').next()?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Renders a command line for messages.
fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with stdin closed and stdout/stderr captured; kills it after
/// `timeout`. A non-zero exit is not an error here (see [`checked`]).
pub fn output_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let line = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            cmd: line.clone(),
            source,
        })?;
    let out_rx = drain(child.stdout.take());
    let err_rx = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Io {
                    what: format!("waiting for `{line}`"),
                    source,
                });
            }
        }
    };
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Timeout {
                cmd: line,
                after: timeout,
                stdout: collect(&out_rx),
                stderr: collect(&err_rx),
            });
        }
    };
    Ok(Output {
        status,
        stdout: collect(&out_rx).into_bytes(),
        stderr: collect(&err_rx).into_bytes(),
    })
}

/// Reads a pipe to its end on a thread; the bytes arrive on the channel.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

/// The drained bytes, waiting a little for the reader: a background grandchild that inherited
/// the pipe may keep it open, and then what was read so far is lost rather than waited for.
fn collect(rx: &mpsc::Receiver<Vec<u8>>) -> String {
    rx.recv_timeout(Duration::from_secs(2))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Runs `cmd` with a timeout and returns its stdout, or [`Error::Failed`] on a non-zero exit.
pub fn checked(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let out = output_timeout(cmd, timeout)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(Error::Failed {
            cmd: describe(cmd),
            status: out.status,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

fn run<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    checked(&mut cmd, DEFAULT_TIMEOUT)
}

fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > IFNAME_MAX || name.contains(['/', ' ', ':']) {
        return Err(Error::Misuse(format!(
            "interface name {name:?} must be 1..={IFNAME_MAX} bytes without '/', ' ' or ':'"
        )));
    }
    Ok(())
}

/// Packet and byte counters of one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkCounters {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug)]
struct Inner {
    name: String,
    label: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = destroy(&self.name) {
            eprintln!("haven-tests: cleaning up namespace {}: {e}", self.name);
        }
    }
}

/// Kills every process in namespace `name`, then deletes it.
fn destroy(name: &str) -> Result<()> {
    kill_all_in(name)?;
    run("ip", ["netns", "del", name]).map(|_| ())
}

/// SIGKILLs every process in the namespace until none is left (processes may fork while we kill).
fn kill_all_in(name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = pids_in(name)?;
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Environment(format!(
                "processes {pids:?} in namespace {name} survive SIGKILL"
            )));
        }
        // The shell's builtin `kill` (no procps needed); pids go in as positional parameters.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "kill -KILL \"$@\"", "sh"])
            .args(pids.iter().map(u32::to_string));
        // A pid may exit between listing and killing; `kill` then fails for it, which is fine.
        let _ = output_timeout(&mut cmd, DEFAULT_TIMEOUT);
        thread::sleep(Duration::from_millis(20));
    }
}

fn pids_in(name: &str) -> Result<Vec<u32>> {
    let out = run("ip", ["netns", "pids", name])?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// A network namespace owned by this test process. Cheap to clone; the namespace lives until
/// the last clone (including those held by [`Proc`] guards) is dropped.
#[derive(Debug, Clone)]
pub struct Netns {
    inner: Arc<Inner>,
}

impl Netns {
    /// Creates namespace `hv-<pid>-<n>-<label>` with `lo` up. The first call in a process also
    /// runs [`sweep_stale`].
    pub fn new(label: &str) -> Result<Netns> {
        SWEEP_ONCE.call_once(|| {
            if let Err(e) = sweep_stale() {
                eprintln!("haven-tests: sweeping stale namespaces: {e}");
            }
        });
        let name = unique_name(label);
        run("ip", ["netns", "add", name.as_str()])?;
        // From here on, dropping `ns` deletes the namespace, also if a step below fails.
        let ns = Netns {
            inner: Arc::new(Inner {
                name,
                label: label.to_string(),
            }),
        };
        ns.link_up("lo")?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The label given to [`Netns::new`].
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// A command that runs `program` inside this namespace (`ip netns exec NAME program`).
    /// Add arguments, environment and stdio as with any [`Command`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name()]).arg(program);
        cmd
    }

    /// Runs `program args` inside the namespace and returns its output whatever the exit status;
    /// fails only if it cannot start or runs longer than [`DEFAULT_TIMEOUT`].
    pub fn exec<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Result<Output> {
        self.exec_timeout(program, args, DEFAULT_TIMEOUT)
    }

    /// [`Netns::exec`] with a chosen timeout.
    pub fn exec_timeout<S: AsRef<OsStr>>(
        &self,
        program: &str,
        args: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        let mut cmd = self.command(program);
        cmd.args(args);
        output_timeout(&mut cmd, timeout)
    }

    /// Runs `program args` inside the namespace; returns stdout, or [`Error::Failed`] on a
    /// non-zero exit.
    pub fn run<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Result<String> {
        let mut cmd = self.command(program);
        cmd.args(args);
        checked(&mut cmd, DEFAULT_TIMEOUT)
    }

    /// Starts `program args` inside the namespace in the background, stdin and output to
    /// `/dev/null`. The guard kills it on drop.
    pub fn spawn<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Result<Proc> {
        let mut cmd = self.command(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.spawn_command(cmd)
    }

    /// Starts a command made by [`Netns::command`] (stdio as the caller set it). The guard kills
    /// it on drop. `ip netns exec` replaces itself with the program, so the guard's pid is the
    /// program's.
    pub fn spawn_command(&self, mut cmd: Command) -> Result<Proc> {
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            cmd: describe(&cmd),
            source,
        })?;
        Ok(Proc {
            child,
            what: describe(&cmd),
            _ns: self.clone(),
        })
    }

    /// Any `ip` command inside the namespace (`ip -n NAME ARGS`, faster than `ip netns exec`),
    /// e.g. `ip(&["route", "show", "table", "all"])`; returns stdout.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", self.name()]).args(args);
        checked(&mut cmd, DEFAULT_TIMEOUT)
    }

    /// `ip link set IF up`.
    pub fn link_up(&self, ifname: &str) -> Result<()> {
        check_ifname(ifname)?;
        self.ip(&["link", "set", ifname, "up"]).map(|_| ())
    }

    /// `ip addr add CIDR dev IF`, for example `add_addr("veth0", "10.99.1.1/24")`.
    pub fn add_addr(&self, ifname: &str, cidr: &str) -> Result<()> {
        check_ifname(ifname)?;
        self.ip(&["addr", "add", cidr, "dev", ifname]).map(|_| ())
    }

    /// `ip route add DEST via GW` (DEST may be `default`).
    pub fn add_route(&self, dest: &str, via: &str) -> Result<()> {
        self.ip(&["route", "add", dest, "via", via]).map(|_| ())
    }

    /// `ip route add DEST dev IF`.
    pub fn add_route_dev(&self, dest: &str, ifname: &str) -> Result<()> {
        check_ifname(ifname)?;
        self.ip(&["route", "add", dest, "dev", ifname]).map(|_| ())
    }

    /// `ip route add default via GW`.
    pub fn default_route(&self, via: &str) -> Result<()> {
        self.add_route("default", via)
    }

    /// Writes a sysctl inside the namespace, e.g. `sysctl("net.ipv4.ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(Error::Misuse(format!("sysctl key {key:?}")));
        }
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        // The value and path go in as positional parameters, never into the script text.
        self.run(
            "sh",
            &["-c", "printf '%s\\n' \"$1\" > \"$2\"", "sh", value, &path],
        )
        .map(|_| ())
    }

    /// Loads an nftables script inside the namespace (`nft -f -`), e.g.
    /// `"table inet t { chain in { type filter hook input priority 0; udp dport 4500 drop; }; }"`.
    /// `nft("flush ruleset")` removes every rule again.
    pub fn nft(&self, script: &str) -> Result<()> {
        // The script goes in as a positional parameter, never into the shell text.
        self.run(
            "sh",
            &["-c", "printf '%s\\n' \"$1\" | nft -f -", "sh", script],
        )
        .map(|_| ())
    }

    /// Turns IPv4 forwarding on or off.
    pub fn ip_forward(&self, on: bool) -> Result<()> {
        self.sysctl("net.ipv4.ip_forward", if on { "1" } else { "0" })
    }

    /// Creates bridge `name` in this namespace and sets it up.
    pub fn add_bridge(&self, name: &str) -> Result<()> {
        check_ifname(name)?;
        self.ip(&["link", "add", name, "type", "bridge"])?;
        self.link_up(name)
    }

    /// Attaches interface `ifname` to bridge `bridge` (both in this namespace) and sets it up.
    pub fn enslave(&self, ifname: &str, bridge: &str) -> Result<()> {
        check_ifname(ifname)?;
        check_ifname(bridge)?;
        self.ip(&["link", "set", ifname, "master", bridge])?;
        self.link_up(ifname)
    }

    /// The pids of every process in this namespace.
    pub fn pids(&self) -> Result<Vec<u32>> {
        pids_in(self.name())
    }

    /// Reads the counters of `ifname` from sysfs inside the namespace.
    pub fn link_counters(&self, ifname: &str) -> Result<LinkCounters> {
        check_ifname(ifname)?;
        let dir = format!("/sys/class/net/{ifname}/statistics");
        let files =
            ["rx_packets", "tx_packets", "rx_bytes", "tx_bytes"].map(|f| format!("{dir}/{f}"));
        let out = self.run("cat", &files)?;
        let v: Vec<u64> = out
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        match v.as_slice() {
            [rx_packets, tx_packets, rx_bytes, tx_bytes] => Ok(LinkCounters {
                rx_packets: *rx_packets,
                tx_packets: *tx_packets,
                rx_bytes: *rx_bytes,
                tx_bytes: *tx_bytes,
            }),
            _ => Err(Error::Misuse(format!(
                "unexpected counters for {ifname}: {out:?}"
            ))),
        }
    }

    /// `ping -c COUNT` to `dest` from inside the namespace, waiting 2 s per reply at most.
    /// Returns ping's summary; [`Error::Failed`] when no reply at all arrived (ping's own rule).
    pub fn ping(&self, dest: &str, count: u32) -> Result<String> {
        let count = count.max(1).to_string();
        self.run(
            "ping",
            &["-n", "-q", "-c", &count, "-i", "0.2", "-W", "2", dest],
        )
    }
}

/// Creates a veth pair with end `ifa` in `a` and end `ifb` in `b`, both set up. Names only have
/// to be unique inside their own namespace.
pub fn veth(a: &Netns, ifa: &str, b: &Netns, ifb: &str) -> Result<()> {
    check_ifname(ifa)?;
    check_ifname(ifb)?;
    run(
        "ip",
        [
            "link",
            "add",
            ifa,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            ifb,
            "netns",
            b.name(),
        ],
    )?;
    a.link_up(ifa)?;
    b.link_up(ifb)
}

/// Four hosts in a line, the usual shape of a site-to-site VPN test:
///
/// ```text
/// client 10.99.1.2 -c0--in0- 10.99.1.1 gwa 172.31.0.1 -out0--out0- 172.31.0.2 gwb 10.99.2.1 -in0--s0- 10.99.2.2 server
/// ```
///
/// Client and server route everything via their gateway; both gateways forward, but neither
/// knows the far LAN, so client-to-server traffic passes only once a tunnel (or
/// [`SiteToSite::route_clear`]) provides the route.
#[derive(Debug, Clone)]
pub struct SiteToSite {
    pub client: Netns,
    pub gwa: Netns,
    pub gwb: Netns,
    pub server: Netns,
}

impl SiteToSite {
    pub const CLIENT: &'static str = "10.99.1.2";
    pub const GWA_INNER: &'static str = "10.99.1.1";
    pub const GWA_OUTER: &'static str = "172.31.0.1";
    pub const GWB_OUTER: &'static str = "172.31.0.2";
    pub const GWB_INNER: &'static str = "10.99.2.1";
    pub const SERVER: &'static str = "10.99.2.2";
    pub const LAN_A: &'static str = "10.99.1.0/24";
    pub const LAN_B: &'static str = "10.99.2.0/24";

    /// Builds the four namespaces (labels `<label>-client`, …) and their links.
    pub fn new(label: &str) -> Result<SiteToSite> {
        let line = SiteToSite {
            client: Netns::new(&format!("{label}-client"))?,
            gwa: Netns::new(&format!("{label}-gwa"))?,
            gwb: Netns::new(&format!("{label}-gwb"))?,
            server: Netns::new(&format!("{label}-server"))?,
        };
        veth(&line.client, "c0", &line.gwa, "in0")?;
        veth(&line.gwa, "out0", &line.gwb, "out0")?;
        veth(&line.gwb, "in0", &line.server, "s0")?;
        line.client
            .add_addr("c0", &format!("{}/24", Self::CLIENT))?;
        line.gwa
            .add_addr("in0", &format!("{}/24", Self::GWA_INNER))?;
        line.gwa
            .add_addr("out0", &format!("{}/24", Self::GWA_OUTER))?;
        line.gwb
            .add_addr("out0", &format!("{}/24", Self::GWB_OUTER))?;
        line.gwb
            .add_addr("in0", &format!("{}/24", Self::GWB_INNER))?;
        line.server
            .add_addr("s0", &format!("{}/24", Self::SERVER))?;
        line.client.default_route(Self::GWA_INNER)?;
        line.server.default_route(Self::GWB_INNER)?;
        line.gwa.ip_forward(true)?;
        line.gwb.ip_forward(true)?;
        Ok(line)
    }

    /// Routes each LAN to the other in clear through the gateways (a no-IPsec reference path).
    pub fn route_clear(&self) -> Result<()> {
        self.gwa.add_route(Self::LAN_B, Self::GWB_OUTER)?;
        self.gwb.add_route(Self::LAN_A, Self::GWA_OUTER)
    }

    /// The four namespaces, client first.
    pub fn all(&self) -> [&Netns; 4] {
        [&self.client, &self.gwa, &self.gwb, &self.server]
    }
}

/// A process running in a namespace. Dropping the guard SIGKILLs and reaps it. Derefs to the
/// underlying [`Child`].
#[derive(Debug)]
pub struct Proc {
    child: Child,
    what: String,
    /// Keeps the namespace alive at least as long as the process.
    _ns: Netns,
}

impl Proc {
    /// The command line it was started with.
    pub fn describe(&self) -> &str {
        &self.what
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Asks the process to end with SIGTERM (a capture tool then writes out what it still holds)
    /// and reaps it; SIGKILLs it if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
        }
        match self.wait_timeout(grace)? {
            Some(status) => Ok(status),
            None => self.kill_now(),
        }
    }

    /// SIGKILLs the process and reaps it (no error if it had already exited).
    pub fn kill_now(&mut self) -> Result<ExitStatus> {
        let _ = self.child.kill();
        self.child.wait().map_err(|source| Error::Io {
            what: format!("reaping `{}`", self.what),
            source,
        })
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return Ok(Some(s)),
                Ok(None) if Instant::now() >= deadline => return Ok(None),
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(source) => {
                    return Err(Error::Io {
                        what: format!("waiting for `{}`", self.what),
                        source,
                    })
                }
            }
        }
    }
}

impl Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory `/tmp/hv-<pid>-<n>-<label>` for one test's files (configs, logs, sockets).
/// Removed on drop, unless the thread is panicking: then it is kept for post-mortem and its
/// path printed; [`sweep_stale`] removes it once this process is gone.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates the directory (mode as umask allows).
    pub fn new(label: &str) -> Result<ScratchDir> {
        let path = Path::new(SCRATCH_ROOT).join(unique_name(label));
        std::fs::create_dir(&path).map_err(|source| Error::Io {
            what: format!("creating {}", path.display()),
            source,
        })?;
        Ok(ScratchDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("HAVEN_TEST_KEEP").is_some() {
            eprintln!(
                "haven-tests: keeping {} for inspection",
                self.path.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes namespaces and scratch directories named `hv-<pid>-…` whose `<pid>` is no longer
/// running, killing any process still inside those namespaces. Returns what was removed.
/// Names of live processes are never touched, so concurrent test runs are safe; two sweeps
/// racing for the same leftovers are fine too (what the other removed is skipped).
pub fn sweep_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in list_namespaces()? {
        if owner_pid(&name).is_some_and(|pid| !pid_alive(pid)) {
            if let Err(e) = destroy(&name) {
                if list_namespaces()?.contains(&name) {
                    return Err(e);
                }
                continue; // another sweep got there first
            }
            removed.push(name);
        }
    }
    let entries = std::fs::read_dir(SCRATCH_ROOT).map_err(|source| Error::Io {
        what: format!("listing {SCRATCH_ROOT}"),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if owner_pid(&name).is_some_and(|pid| !pid_alive(pid))
            && entry.file_type().is_ok_and(|t| t.is_dir())
        {
            let path = entry.path();
            match std::fs::remove_dir_all(&path) {
                Ok(()) => removed.push(path.display().to_string()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Io {
                        what: format!("removing {}", path.display()),
                        source,
                    })
                }
            }
        }
    }
    Ok(removed)
}

/// Removes the namespaces this process created (`hv-<own pid>-…`, killing every process in
/// them) and its scratch directories. For a signal handler's thread in a long run such as a
/// benchmark: the process is about to exit without unwinding, so the guards' destructors
/// ([`Netns`], [`Proc`], [`ScratchDir`]) will not run. Returns what was removed.
pub fn remove_own() -> Vec<String> {
    let me = std::process::id();
    let mut removed = Vec::new();
    for name in list_namespaces().unwrap_or_default() {
        if owner_pid(&name) == Some(me) {
            match destroy(&name) {
                Ok(()) => removed.push(name),
                Err(e) => eprintln!("haven-tests: removing namespace {name}: {e}"),
            }
        }
    }
    for entry in std::fs::read_dir(SCRATCH_ROOT)
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if owner_pid(&name) == Some(me) && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed.push(entry.path().display().to_string());
        }
    }
    removed
}

/// Names of all namespaces on the machine (`ip netns list` prints "NAME" or "NAME (id: 3)").
pub fn list_namespaces() -> Result<Vec<String>> {
    let list = run("ip", ["netns", "list"])?;
    Ok(list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_pid_and_counter() {
        let a = unique_name("gw A/1");
        let b = unique_name("gw A/1");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("hv-{}-", std::process::id())), "{a}");
        assert!(a.ends_with("-gw-a-1"), "{a}");
        assert_eq!(owner_pid(&a), Some(std::process::id()));
    }

    #[test]
    fn owner_pid_rejects_foreign_names() {
        assert_eq!(owner_pid("hv-123-4-x"), Some(123));
        assert_eq!(owner_pid("hv-123.tmpdir"), None);
        assert_eq!(owner_pid("hv--1-x"), None);
        assert_eq!(owner_pid("hvx-1-x"), None);
        assert_eq!(owner_pid("other-1-x"), None);
        assert_eq!(owner_pid("hv-99999999999999999999-x"), None);
    }

    #[test]
    fn labels_are_bounded() {
        let long = "x".repeat(200);
        let n = unique_name(&long);
        assert!(n.len() <= PREFIX.len() + 10 + 1 + 10 + 1 + LABEL_MAX, "{n}");
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(check_ifname("veth0").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a-name-too-long-x").is_err());
        assert!(check_ifname("a/b").is_err());
    }

    #[test]
    fn timeout_kills_and_reports() {
        let mut cmd = Command::new("sleep");
        cmd.arg("5");
        match output_timeout(&mut cmd, Duration::from_millis(100)) {
            Err(Error::Timeout { cmd, .. }) => assert_eq!(cmd, "sleep 5"),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[test]
    fn checked_reports_failure_with_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo oops >&2; exit 3"]);
        match checked(&mut cmd, DEFAULT_TIMEOUT) {
            Err(Error::Failed { status, stderr, .. }) => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(stderr.trim(), "oops");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}
