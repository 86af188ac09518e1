//! The runtime wiring of a daemon: actix actor around the logic, bus tasks, control socket.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bus_schema::{
    Body, BusPublisher, BusSubscriber, CtlReply, CtlRequest, CtlServer, DaemonKind, DaemonStatus,
    Follower, Owner, ReplicaInfo, Snapshot, StateStore,
};
use clap::{CommandFactory, FromArgMatches, Parser};
use haven_config::Config;
use tokio::sync::mpsc;

use crate::logging::{self, LogHub, LogLevel};
use crate::now_ns;
use crate::telemetry::{BusMetrics, ProcessMetrics};

/// Command line shared by every daemon.
#[derive(Parser, Debug, Clone)]
pub struct DaemonArgs {
    /// Gateway configuration file (FortiOS CLI syntax).
    #[arg(long, default_value = "/etc/haven/haven.conf")]
    pub config: PathBuf,
    /// Directory for the bus and control sockets; created with mode 0700.
    #[arg(long, default_value = "/run/haven")]
    pub run_dir: PathBuf,
    /// Address of the Prometheus /metrics listener (defaults: ikemgr 127.0.0.1:9701,
    /// dpdmon :9702, hasyncd :9703, espd :9704).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Log level on stderr: off, error, warn, info, debug, trace (or a FortiOS number, -1 = all).
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

/// What a daemon publishes: bodies pushed here are stamped and sent on its bus socket.
pub type Outbox = Vec<Body>;

/// A daemon's own behaviour, driven by the shell's actor. Sans-IO: every input arrives
/// as a call, every output is a body pushed to the outbox.
pub trait DaemonLogic: Sized + Unpin + 'static {
    /// Which daemon this is.
    const KIND: DaemonKind;
    /// The daemons whose published state this one follows (Clone pattern).
    const FOLLOWS: &'static [DaemonKind];

    /// Builds the logic from the first valid configuration; `run_dir` is the daemon's
    /// `--run-dir` (for files and sockets of its own beside the bus's).
    fn new(config: &Config, run_dir: &Path) -> Self;
    /// Applies a (re)loaded, already validated configuration.
    fn on_config(&mut self, config: &Config, out: &mut Outbox);
    /// The `--config` path, given once right after [`DaemonLogic::new`] (before the first
    /// [`DaemonLogic::on_config`]): for a daemon that reads or writes the file's text
    /// itself (hasyncd's configuration sync).
    fn set_config_path(&mut self, _path: &Path) {}
    /// A followed daemon's state changed (an update or a snapshot was applied).
    fn on_replica(&mut self, _src: DaemonKind, _store: &StateStore, _out: &mut Outbox) {}
    /// The same, with the copy handed over: a logic that keeps it can tell the next copy's
    /// changes from it ([`StateStore::changes_since`]) instead of reading every record.
    fn on_replica_copy(&mut self, src: DaemonKind, store: StateStore, out: &mut Outbox) {
        self.on_replica(src, &store, out);
        drop_later(store);
    }
    /// A followed daemon published an event (a body that is not state: activity batches,
    /// probe requests and results, lifetime expiries). Heartbeats are not delivered.
    /// Events are best effort: one lost in a bus gap is not replayed by the snapshot.
    fn on_event(&mut self, _src: DaemonKind, _body: &Body, _out: &mut Outbox) {}
    /// Answers a named view for `vpnctl`.
    fn view(&self, name: &str, args: &[String]) -> Result<serde_json::Value, String>;
    /// Carries out a named command from `vpnctl`.
    fn command(
        &mut self,
        name: &str,
        _args: &[String],
        _out: &mut Outbox,
    ) -> Result<serde_json::Value, String> {
        Err(format!("unknown command {name:?}"))
    }
    /// Period of [`DaemonLogic::tick`] in milliseconds.
    const TICK_MS: u64 = 1000;
    /// Called every [`DaemonLogic::TICK_MS`] with the current time, and when the time
    /// given by [`DaemonLogic::poll_timeout`] comes.
    fn tick(&mut self, _now_ns: u64, _out: &mut Outbox) {}
    /// When the logic's next timer is due, in wall-clock ms (`now_ns() / 1_000_000`), or
    /// `None`. The shell reads it after every call into the logic and calls
    /// [`DaemonLogic::tick`] at that time (never before it), so a timer fires on time
    /// instead of on the next `TICK_MS` period.
    fn poll_timeout(&self) -> Option<u64> {
        None
    }
    /// Under a steady stream of updates, hand-overs of a followed store
    /// ([`DaemonLogic::on_replica`]) are spaced at least this many times as long as the last
    /// one took (and never less than the shell's 50 ms): a logic that reads the store whole
    /// then spends at most about 1/(1 + this) of its time there, and its ticks and events
    /// (a heartbeat, a lease request) still run on a loaded machine. 0: 50 ms only (a
    /// datapath that must install new SAs at once).
    const REPLICA_SPACING: u32 = 0;
}

/// Drops `store` on a background thread: freeing a copy of a large store (its tree nodes and
/// shared keys and bodies: tens of ms for 300 000 items) is work the actor, which drives the
/// daemon's timers, need not wait for. Dropped in place if that thread cannot be started.
pub fn drop_later(store: StateStore) {
    static DROPPER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<StateStore>>> =
        std::sync::OnceLock::new();
    let tx = DROPPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<StateStore>();
        std::thread::Builder::new()
            .name("store-drop".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    match tx {
        Some(tx) => {
            // The send fails only once the thread is gone: the store comes back, dropped here.
            let _ = tx.send(store);
        }
        None => drop(store),
    }
}

/// Publishes the difference between two keyed views: a `put` for every new or changed
/// entry and a `del` for every entry that disappeared.
pub fn diff_keyed<T: PartialEq + Clone>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
    put: impl Fn(String, T) -> Body,
    del: impl Fn(String) -> Body,
    out: &mut Outbox,
) {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            out.push(put(k.clone(), v.clone()));
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out.push(del(k.clone()));
        }
    }
}

fn default_metrics_port(kind: DaemonKind) -> u16 {
    match kind {
        DaemonKind::Ikemgr => 9701,
        DaemonKind::Dpdmon => 9702,
        DaemonKind::Hasyncd => 9703,
        DaemonKind::Espd => 9704,
        DaemonKind::Vpnctl => 9700,
    }
}

// ---------------------------------------------------------------------------------------
// The actor: a thin shell that owns the logic.

/// A call into the logic that runs at least this long is logged and counted
/// (`<daemon>_slow_calls_total{call}`): meanwhile the actor runs nothing else (no tick, no bus
/// update, no control request), which is what an operator looks for when a daemon falls
/// behind.
const SLOW_CALL_MS: u128 = 250;

/// Runs one call into `L` (`call` names it) and reports it if it was slow.
fn timed<L: DaemonLogic, R>(call: &'static str, f: impl FnOnce() -> R) -> R {
    timed_cost::<L, R>(call, f).0
}

/// [`timed`], also returning how long the call took.
fn timed_cost<L: DaemonLogic, R>(call: &'static str, f: impl FnOnce() -> R) -> (R, Duration) {
    let started = Instant::now();
    let r = f();
    let took = started.elapsed();
    let ms = took.as_millis();
    if ms >= SLOW_CALL_MS {
        let name = format!("{}_slow_calls_total", L::KIND.name());
        metrics::counter!(name, "call" => call).increment(1);
        tracing::warn!("{call} took {ms} ms (nothing else ran meanwhile)");
    }
    (r, took)
}

struct Core<L: DaemonLogic> {
    logic: L,
    out: mpsc::UnboundedSender<Body>,
    /// The armed wake-up for the logic's `poll_timeout`: its deadline (ms) and handle.
    timer: Option<(u64, SpawnHandle)>,
}

impl<L: DaemonLogic> Core<L> {
    fn flush(&self, outbox: Outbox) {
        for body in outbox {
            // The publisher task lives as long as the system; a send error means we are
            // shutting down and the body has nowhere to go.
            let _ = self.out.send(body);
        }
    }

    /// Publishes what a call into the logic produced, then re-arms the wake-up.
    fn after(&mut self, ctx: &mut Context<Self>, outbox: Outbox) {
        self.flush(outbox);
        self.arm(ctx);
    }

    /// Arms a one-shot wake-up at the logic's `poll_timeout` (replacing an earlier one).
    /// The delay is rounded up to whole ms from a whole-ms `now`, so the tick it runs sees
    /// a time at or after the deadline.
    fn arm(&mut self, ctx: &mut Context<Self>) {
        let want = self.logic.poll_timeout();
        if self.timer.as_ref().map(|t| t.0) == want {
            return;
        }
        if let Some((_, handle)) = self.timer.take() {
            ctx.cancel_future(handle);
        }
        let Some(at_ms) = want else {
            return;
        };
        let now_ms = now_ns() / 1_000_000;
        let delay = Duration::from_millis(at_ms.saturating_sub(now_ms).max(1));
        let handle = ctx.run_later(delay, |act, ctx| {
            act.timer = None;
            let mut out = Vec::new();
            timed::<L, _>("tick", || act.logic.tick(now_ns(), &mut out));
            act.after(ctx, out);
        });
        self.timer = Some((at_ms, handle));
    }
}

impl<L: DaemonLogic> Actor for Core<L> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(Duration::from_millis(L::TICK_MS.max(1)), |act, ctx| {
            let mut out = Vec::new();
            timed::<L, _>("tick", || act.logic.tick(now_ns(), &mut out));
            act.after(ctx, out);
        });
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct ApplyConfig(Arc<Config>);

impl<L: DaemonLogic> Handler<ApplyConfig> for Core<L> {
    type Result = ();
    fn handle(&mut self, msg: ApplyConfig, ctx: &mut Self::Context) {
        let mut out = Vec::new();
        timed::<L, _>("config", || self.logic.on_config(&msg.0, &mut out));
        self.after(ctx, out);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct ReplicaChanged {
    src: DaemonKind,
    /// The latest copy of the follower's store; a later notification replaces an unconsumed
    /// one here instead of queueing another copy (see [`ReplicaSlot`]).
    slot: ReplicaSlot,
    /// Where the actor writes how long its `on_replica` call took (ns): the follower's
    /// spacing ([`DaemonLogic::REPLICA_SPACING`]).
    cost_ns: Arc<AtomicU64>,
}

/// Latest-only hand-over of a followed store from the follow task to the actor: the follow
/// task puts the newest copy and sends a [`ReplicaChanged`] only when the slot was empty, so
/// the actor's mailbox never holds more than one store copy per followed daemon.
type ReplicaSlot = Arc<Mutex<Option<StateStore>>>;

impl<L: DaemonLogic> Handler<ReplicaChanged> for Core<L> {
    type Result = ();
    fn handle(&mut self, msg: ReplicaChanged, ctx: &mut Self::Context) {
        let Some(store) = lock(&msg.slot).take() else {
            return;
        };
        let mut out = Vec::new();
        let ((), took) = timed_cost::<L, _>("replica", || {
            self.logic.on_replica_copy(msg.src, store, &mut out)
        });
        let cost = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        msg.cost_ns.store(cost, Ordering::Relaxed);
        self.after(ctx, out);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct BusEvent {
    src: DaemonKind,
    body: Body,
}

impl<L: DaemonLogic> Handler<BusEvent> for Core<L> {
    type Result = ();
    fn handle(&mut self, msg: BusEvent, ctx: &mut Self::Context) {
        let mut out = Vec::new();
        timed::<L, _>("event", || {
            self.logic.on_event(msg.src, &msg.body, &mut out)
        });
        self.after(ctx, out);
    }
}

#[derive(Message)]
#[rtype(result = "Result<serde_json::Value, String>")]
struct ViewOrCommand {
    command: bool,
    name: String,
    args: Vec<String>,
}

impl<L: DaemonLogic> Handler<ViewOrCommand> for Core<L> {
    type Result = Result<serde_json::Value, String>;
    fn handle(&mut self, msg: ViewOrCommand, ctx: &mut Self::Context) -> Self::Result {
        if msg.command {
            let mut out = Vec::new();
            let r = timed::<L, _>("command", || {
                self.logic.command(&msg.name, &msg.args, &mut out)
            });
            self.after(ctx, out);
            r
        } else {
            self.logic.view(&msg.name, &msg.args)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shared state between the tasks of one daemon.

struct Shared<L: DaemonLogic> {
    kind: DaemonKind,
    run_dir: PathBuf,
    config_path: PathBuf,
    started: Instant,
    owner: Mutex<Owner>,
    replicas: Mutex<BTreeMap<DaemonKind, ReplicaInfo>>,
    hub: Arc<LogHub>,
    bus: BusMetrics,
    core: Addr<Core<L>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoning only follows a panic in another task; the data is still the last
    // consistent value written under the lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<L: DaemonLogic> Shared<L> {
    /// Reloads the configuration: on any error nothing changes.
    fn reload(&self) -> Result<Vec<String>, String> {
        let parsed = load_config(&self.config_path)?;
        let warnings: Vec<String> = parsed.1;
        self.core.do_send(ApplyConfig(Arc::new(parsed.0)));
        tracing::info!(
            "configuration reloaded from {} ({} warnings)",
            self.config_path.display(),
            warnings.len()
        );
        Ok(warnings)
    }

    fn status(&self) -> DaemonStatus {
        let owner = lock(&self.owner);
        DaemonStatus {
            kind: self.kind,
            pid: std::process::id(),
            boot: owner.boot(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            seq: owner.seq(),
            log_level: self.hub.base_level().name().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            config_path: self.config_path.display().to_string(),
        }
    }
}

fn load_config(path: &Path) -> Result<(Config, Vec<String>), String> {
    match haven_config::load(path) {
        Ok(parsed) => Ok((
            parsed.config,
            parsed.warnings.iter().map(|w| w.to_string()).collect(),
        )),
        Err(e) => {
            // One line: the first error (it names file, line and column), and how many more.
            let more = e.errors.len().saturating_sub(1);
            let first = e
                .first()
                .map(|x| x.to_string())
                .unwrap_or_else(|| format!("{}: invalid configuration", path.display()));
            Err(if more > 0 {
                format!(
                    "{first} (and {more} more errors: vpnctl config check {})",
                    path.display()
                )
            } else {
                first
            })
        }
    }
}

fn prepare_run_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("run-dir {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("run-dir {}: cannot set mode 0700: {e}", dir.display()))?;
    for sub in ["bus", "ctl"] {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).map_err(|e| format!("run-dir {}: {e}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("run-dir {}: cannot set mode 0700: {e}", p.display()))?;
    }
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| format!("run-dir {} is not writable: {e}", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Takes `<run-dir>/ctl/<daemon>.lock` (an exclusive advisory lock) and writes our pid in
/// it. A second instance on the same run-dir finds it held and is told whose it is.
fn lock_instance(dir: &Path, kind: DaemonKind) -> Result<std::fs::File, String> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = dir.join("ctl").join(format!("{}.lock", kind.name()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("instance lock {}: {e}", path.display()))?;
    use std::os::fd::AsRawFd as _;
    // SAFETY: flock(2) on a descriptor we own and keep open; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::WouldBlock {
            return Err(format!("instance lock {}: {err}", path.display()));
        }
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        return Err(format!(
            "another {} (pid {}) is already running on run-dir {}",
            kind.name(),
            pid.trim(),
            dir.display()
        ));
    }
    let written = f
        .set_len(0)
        .and_then(|()| f.rewind())
        .and_then(|()| writeln!(f, "{}", std::process::id()))
        .and_then(|()| f.flush());
    written.map_err(|e| format!("instance lock {}: {e}", path.display()))?;
    Ok(f)
}

fn fatal(kind: DaemonKind, msg: impl std::fmt::Display) -> ExitCode {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{}: fatal: {}", kind.name(), msg);
    ExitCode::from(1)
}

/// Runs a daemon until SIGTERM/SIGINT. Returns the process exit code: 0 on a clean stop,
/// 1 with a one-line reason on stderr for a fatal startup problem.
pub fn run<L: DaemonLogic>() -> ExitCode {
    let kind = L::KIND;
    let matches = DaemonArgs::command()
        .name(kind.name())
        .about(format!("Haven {} daemon", kind.name()))
        .get_matches();
    let args = match DaemonArgs::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let level = match LogLevel::parse(&args.log_level) {
        Ok(l) => l,
        Err(e) => return fatal(kind, format!("--log-level: {e}")),
    };
    let (config, warnings) = match load_config(&args.config) {
        Ok(c) => c,
        Err(e) => return fatal(kind, e),
    };
    if let Err(e) = prepare_run_dir(&args.run_dir) {
        return fatal(kind, e);
    }
    // Refuse to run twice on one run-dir. Held until the process ends (the kernel drops
    // the lock on any exit, kill -9 included).
    let _instance = match lock_instance(&args.run_dir, kind) {
        Ok(f) => f,
        Err(e) => return fatal(kind, e),
    };
    let hub = LogHub::new(kind.debug_app(), level);
    logging::install(hub.clone());
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let metrics_addr = args
        .metrics_listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], default_metrics_port(kind))));

    let system = actix::System::new();
    let result: Result<(), String> =
        system.block_on(async move { start::<L>(args, config, hub, metrics_addr).await });
    if let Err(e) = result {
        return fatal(kind, e);
    }
    if let Err(e) = system.run() {
        return fatal(kind, format!("runtime: {e}"));
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

async fn start<L: DaemonLogic>(
    args: DaemonArgs,
    config: Config,
    hub: Arc<LogHub>,
    metrics_addr: SocketAddr,
) -> Result<(), String> {
    let kind = L::KIND;
    crate::telemetry::install_exporter(metrics_addr)?;
    let bus = BusMetrics::new(kind.name());
    let mut procm = ProcessMetrics::new(kind.name());

    let publisher = BusPublisher::bind(&args.run_dir, kind)
        .await
        .map_err(|e| format!("bus socket in {}: {e}", args.run_dir.display()))?;
    let ctl = CtlServer::bind(&args.run_dir, kind)
        .await
        .map_err(|e| format!("control socket in {}: {e}", args.run_dir.display()))?;

    let boot = bus_schema::new_boot_id().map_err(|e| format!("boot id: {e}"))?;
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let mut logic = L::new(&config, &args.run_dir);
    logic.set_config_path(&args.config);
    let core = Core {
        logic,
        out: out_tx,
        timer: None,
    }
    .start();
    core.do_send(ApplyConfig(Arc::new(config)));

    let shared = Arc::new(Shared::<L> {
        kind,
        run_dir: args.run_dir.clone(),
        config_path: args.config.clone(),
        started: Instant::now(),
        owner: Mutex::new(Owner::new(kind, boot)),
        replicas: Mutex::new(BTreeMap::new()),
        hub: hub.clone(),
        bus,
        core,
    });

    actix_rt::spawn(publish_task(shared.clone(), publisher, out_rx));
    actix_rt::spawn(ctl_task(shared.clone(), ctl));
    if !L::FOLLOWS.is_empty() {
        // The followed buses are read on a thread of their own: a logic call that takes
        // long (a whole store read on a loaded machine: 250-800 ms seen in the soak) would
        // otherwise stop the reading too, and the backlog would sit in the owner's
        // outbound queue (a soak's ikemgr grew 36 -> 74 MiB in ten minutes while espd read
        // its bus 50 000 messages behind). The logic still gets the latest store only.
        let follower = actix::Arbiter::new();
        if !follower.spawn(follow_task(shared.clone())) {
            return Err("bus follower thread did not start".into());
        }
    }
    {
        let hub = hub.clone();
        actix_rt::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_secs(1));
            loop {
                iv.tick().await;
                procm.refresh(&hub);
            }
        });
    }
    actix_rt::spawn(signal_task(shared.clone()));
    tracing::info!(
        "started pid={} run-dir={} metrics={} boot={:032x}",
        std::process::id(),
        args.run_dir.display(),
        metrics_addr,
        boot
    );
    Ok(())
}

async fn signal_task<L: DaemonLogic>(shared: Arc<Shared<L>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if let Err(e) = shared.reload() {
                    tracing::error!("reload refused, configuration unchanged: {e}");
                }
            }
        }
    }
    tracing::info!("stopping on signal");
    for p in [
        bus_schema::pub_endpoint(&shared.run_dir, shared.kind),
        bus_schema::ctl_endpoint(&shared.run_dir, shared.kind),
    ] {
        if let Some(path) = p.strip_prefix("ipc://") {
            let _ = std::fs::remove_file(path);
        }
    }
    System::current().stop();
}

async fn publish_task<L: DaemonLogic>(
    shared: Arc<Shared<L>>,
    mut publisher: BusPublisher,
    mut rx: mpsc::UnboundedReceiver<Body>,
) {
    let mut hb = tokio::time::interval(Duration::from_secs(1));
    loop {
        let body = tokio::select! {
            b = rx.recv() => match b { Some(b) => b, None => return },
            _ = hb.tick() => Body::Heartbeat { uptime_ms: shared.started.elapsed().as_millis() as u64 },
        };
        // Stamp under the lock (so snapshots are consistent with seq), send after it.
        let env = lock(&shared.owner).stamp(body, now_ns());
        match publisher.send(&env).await {
            Ok(()) => shared.bus.published.increment(1),
            Err(e) => {
                shared.bus.send_errors.increment(1);
                tracing::warn!("bus publish failed: {e}");
            }
        }
    }
}

/// Debug sessions attached over the control socket, with their keepalive deadline.
struct AttachState<P> {
    sessions: HashMap<u64, (P, Instant)>,
}

const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);

async fn ctl_task<L: DaemonLogic>(shared: Arc<Shared<L>>, mut ctl: CtlServer) {
    let (line_tx, mut line_rx) = mpsc::channel::<(u64, CtlReply)>(1024);
    let mut attach = AttachState {
        sessions: HashMap::new(),
    };
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            req = ctl.recv() => {
                let (peer, req) = match req {
                    Ok(x) => x,
                    Err(e) => {
                        shared.bus.ctl_errors.increment(1);
                        tracing::warn!("control socket receive failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                shared.bus.ctl_requests.increment(1);
                let reply = match req {
                    Err(e) => {
                        shared.bus.decode_errors.increment(1);
                        shared.bus.ctl_errors.increment(1);
                        CtlReply::Error { message: format!("malformed control request: {e}") }
                    }
                    Ok(CtlRequest::Attach { level }) => match LogLevel::parse(&level) {
                        Ok(level) => {
                            let (id, mut rx) = shared.hub.attach(level, 4096);
                            attach.sessions.retain(|_, (p, _)| p != &peer);
                            attach.sessions.insert(id, (peer.clone(), Instant::now() + ATTACH_TIMEOUT));
                            let tx = line_tx.clone();
                            actix_rt::spawn(async move {
                                while let Some(l) = rx.recv().await {
                                    let r = CtlReply::DebugLine { ts_ns: l.ts_ns, level: l.level.name().to_string(), line: l.line };
                                    if tx.send((id, r)).await.is_err() { break; }
                                }
                            });
                            tracing::info!("debug session attached at level {}", level.name());
                            CtlReply::Ok
                        }
                        Err(e) => CtlReply::Error { message: e },
                    },
                    Ok(CtlRequest::AttachKeepalive) => {
                        let mut found = false;
                        for (p, deadline) in attach.sessions.values_mut() {
                            if p == &peer { *deadline = Instant::now() + ATTACH_TIMEOUT; found = true; }
                        }
                        if found { CtlReply::Ok } else { CtlReply::Error { message: "not attached".into() } }
                    }
                    Ok(CtlRequest::Detach) => {
                        let ids: Vec<u64> = attach.sessions.iter().filter(|(_, (p, _))| p == &peer).map(|(id, _)| *id).collect();
                        for id in ids { attach.sessions.remove(&id); shared.hub.detach(id); }
                        CtlReply::Ok
                    }
                    Ok(other) => handle_request(&shared, other).await,
                };
                if matches!(reply, CtlReply::Error { .. }) {
                    shared.bus.ctl_errors.increment(1);
                }
                if let Err(e) = ctl.send(&peer, &reply).await {
                    shared.bus.send_errors.increment(1);
                    tracing::warn!("control reply failed: {e}");
                }
            }
            Some((id, line)) = line_rx.recv() => {
                if let Some((peer, _)) = attach.sessions.get(&id) {
                    let peer = peer.clone();
                    if ctl.send(&peer, &line).await.is_err() {
                        attach.sessions.remove(&id);
                        shared.hub.detach(id);
                    }
                }
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                let expired: Vec<u64> = attach.sessions.iter().filter(|(_, (_, d))| *d < now).map(|(id, _)| *id).collect();
                for id in expired {
                    attach.sessions.remove(&id);
                    shared.hub.detach(id);
                    tracing::info!("debug session detached (keepalive timeout)");
                }
            }
        }
    }
}

async fn handle_request<L: DaemonLogic>(shared: &Arc<Shared<L>>, req: CtlRequest) -> CtlReply {
    match req {
        CtlRequest::Snapshot => {
            shared.bus.snapshots_served.increment(1);
            CtlReply::Snapshot(lock(&shared.owner).snapshot())
        }
        CtlRequest::Status => CtlReply::Status(shared.status()),
        CtlRequest::Replicas => {
            CtlReply::Replicas(lock(&shared.replicas).values().cloned().collect())
        }
        CtlRequest::View { name, args } => {
            match shared
                .core
                .send(ViewOrCommand {
                    command: false,
                    name,
                    args,
                })
                .await
            {
                Ok(Ok(v)) => CtlReply::View(v),
                Ok(Err(message)) => CtlReply::Error { message },
                Err(e) => CtlReply::Error {
                    message: format!("internal: {e}"),
                },
            }
        }
        CtlRequest::Command { name, args } => {
            match shared
                .core
                .send(ViewOrCommand {
                    command: true,
                    name,
                    args,
                })
                .await
            {
                Ok(Ok(v)) => CtlReply::View(v),
                Ok(Err(message)) => CtlReply::Error { message },
                Err(e) => CtlReply::Error {
                    message: format!("internal: {e}"),
                },
            }
        }
        CtlRequest::SetLogLevel { level } => match LogLevel::parse(&level) {
            Ok(l) => {
                shared.hub.set_base_level(l);
                CtlReply::Ok
            }
            Err(message) => CtlReply::Error { message },
        },
        CtlRequest::ReloadConfig => match shared.reload() {
            Ok(warnings) => CtlReply::Reloaded { warnings },
            Err(message) => {
                tracing::error!("reload refused, configuration unchanged: {message}");
                CtlReply::Error { message }
            }
        },
        CtlRequest::Attach { .. } | CtlRequest::AttachKeepalive | CtlRequest::Detach => {
            CtlReply::Error {
                message: "internal: attach handled by the control task".into(),
            }
        }
    }
}

/// How long a burst of applied updates may go without a [`DaemonLogic::on_replica`] call:
/// the store is handed to the logic (a copy, and the logic reads it whole) at most once per
/// this interval while updates keep coming, and at once when the bus goes quiet or an event
/// must be delivered after the state it follows. Without it a bulk load of n records costs
/// n copies of a growing store: O(n²).
const REPLICA_COALESCE: Duration = Duration::from_millis(50);

/// The bus counts as quiet (pending replica changes are handed over) after this long
/// without a message, unless the last hand-over was less than [`REPLICA_COALESCE`] ago:
/// under a steady stream of updates with short gaps (1 000 tunnels rekeyed every 30 s is
/// about 300 updates a second) a hand-over per gap made the store copies and the logic's
/// full reads fall behind the bus, and the owner's outbound queue grew without bound.
const REPLICA_QUIET: Duration = Duration::from_millis(2);

/// A snapshot fetch waits as long as the owner is alive: it is abandoned (and counted) only
/// when nothing was heard from the owner on the bus for this long (10 heartbeats: an owner
/// encoding a large snapshot on its single runtime thread skips heartbeats meanwhile) ...
const SNAPSHOT_OWNER_SILENCE: Duration = Duration::from_secs(10);

/// ... or when it has run for this long in all.
const SNAPSHOT_FETCH_LIMIT: Duration = Duration::from_secs(120);

/// Why a snapshot fetch failed.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("{0}")]
    Bus(#[from] bus_schema::BusError),
    #[error("owner silent on the bus for {0:?} while the snapshot was awaited")]
    OwnerSilent(Duration),
    #[error("no snapshot after {0:?}")]
    Limit(Duration),
    #[error("unexpected reply {0}")]
    Unexpected(String),
}

/// Nanoseconds on a monotonic clock (since this process first asked): when an owner was
/// last heard and how long it has been quiet are measured on it, so a step of the wall
/// clock (NTP, a VM resumed) neither fakes nor hides a silence.
fn mono_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    // Starts at 1 s so that 0 stays "never heard".
    (START.get_or_init(Instant::now).elapsed() + Duration::from_secs(1)).as_nanos() as u64
}

/// Fetches a snapshot from `src`'s control socket. Large snapshots take long to build, encode
/// and transfer, so there is no fixed deadline: the wait goes on while `heard_ns` (the time
/// the owner was last heard on the bus, kept by the follow task) stays within
/// `silence` of now, up to `limit` in all.
async fn fetch_snapshot(
    run_dir: &Path,
    src: DaemonKind,
    heard_ns: &AtomicU64,
    silence: Duration,
    limit: Duration,
) -> Result<Snapshot, FetchError> {
    let started = Instant::now();
    let mut client = bus_schema::CtlClient::connect(run_dir, src).await?;
    client.send(&CtlRequest::Snapshot).await?;
    // The owner is alive as of the request.
    heard_ns.fetch_max(mono_ns(), Ordering::Relaxed);
    let slice = (silence / 4).max(Duration::from_millis(10));
    loop {
        match client.recv(slice).await {
            Ok(CtlReply::Snapshot(s)) => return Ok(s),
            Ok(other) => return Err(FetchError::Unexpected(format!("{other:?}"))),
            Err(bus_schema::BusError::Timeout(_)) => {
                let quiet = || mono_ns().saturating_sub(heard_ns.load(Ordering::Relaxed));
                if quiet() > silence.as_nanos() as u64 {
                    // This process may have been off the CPU for longer than `silence`
                    // (a loaded machine): the owner's bus messages that arrived meanwhile
                    // wait behind this task. Let the tasks whose timers and sockets are
                    // ready run first (the follower records what it hears), then judge.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    if quiet() > silence.as_nanos() as u64 {
                        return Err(FetchError::OwnerSilent(silence));
                    }
                }
                if started.elapsed() >= limit {
                    return Err(FetchError::Limit(limit));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Per followed daemon: the Clone-pattern follower and the shell's bookkeeping around it.
struct Followed {
    follower: Follower,
    /// When the owner was last heard on the bus ([`mono_ns`]), read by a running snapshot fetch.
    heard_ns: Arc<AtomicU64>,
    /// A snapshot fetch is running; no second one is started meanwhile.
    fetching: Arc<AtomicBool>,
    /// Hand-over of the store to the actor.
    slot: ReplicaSlot,
    /// How long the logic's last `on_replica` call for this daemon took (ns): a cheap
    /// read of a small store (espd's, for hasyncd) does not shorten the spacing of a
    /// costly one (ikemgr's).
    cost_ns: Arc<AtomicU64>,
    /// An applied change not yet handed to the logic, since this instant.
    dirty_since: Option<Instant>,
    /// The last hand-over to the logic.
    last_flush: Option<Instant>,
}

impl Followed {
    /// When a pending change is due for hand-over: `spacing` (at least
    /// [`REPLICA_COALESCE`], see [`replica_spacing`]) after the first pending change at the
    /// latest, earlier once the bus is quiet ([`REPLICA_QUIET`] after `last_msg`), but not
    /// within `spacing` of the last hand-over.
    fn due(&self, last_msg: Instant, spacing: Duration) -> Option<Instant> {
        let d = self.dirty_since?;
        let early = (d + spacing).min(last_msg + REPLICA_QUIET);
        Some(match self.last_flush {
            Some(f) => early.max(f + spacing).min(d + spacing),
            None => early,
        })
    }

    /// The spacing of this daemon's hand-overs ([`replica_spacing`]).
    fn spacing<L: DaemonLogic>(&self) -> Duration {
        replica_spacing(self.cost_ns.load(Ordering::Relaxed), L::REPLICA_SPACING)
    }

    /// Hands the store to the logic if a change is pending and the follower is synced.
    fn flush<L: DaemonLogic>(&mut self, src: DaemonKind, shared: &Shared<L>) {
        if self.dirty_since.take().is_none() || !self.follower.synced() {
            return;
        }
        shared.bus.handovers.increment(1);
        let core = &shared.core;
        self.last_flush = Some(Instant::now());
        let store = self.follower.store().clone();
        let was_empty = lock(&self.slot).replace(store).is_none();
        if was_empty {
            core.do_send(ReplicaChanged {
                src,
                slot: self.slot.clone(),
                cost_ns: self.cost_ns.clone(),
            });
        }
    }
}

/// The longest spacing of hand-overs, whatever the last call cost: the logic sees the
/// followed state at least this often under a stream of updates.
const REPLICA_SPACING_MAX: Duration = Duration::from_secs(2);

/// The spacing of hand-overs: [`REPLICA_COALESCE`], or `factor` times the last
/// `on_replica` call (`cost_ns`) if that is longer ([`DaemonLogic::REPLICA_SPACING`]), at
/// most [`REPLICA_SPACING_MAX`].
fn replica_spacing(cost_ns: u64, factor: u32) -> Duration {
    let scaled = Duration::from_nanos(cost_ns.saturating_mul(u64::from(factor)));
    scaled.clamp(REPLICA_COALESCE, REPLICA_SPACING_MAX)
}

async fn follow_task<L: DaemonLogic>(shared: Arc<Shared<L>>) {
    let mut sub = loop {
        match BusSubscriber::connect(&shared.run_dir, L::FOLLOWS).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!("bus subscribe failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let mut followed: BTreeMap<DaemonKind, Followed> = L::FOLLOWS
        .iter()
        .map(|k| {
            (
                *k,
                Followed {
                    follower: Follower::new(*k),
                    heard_ns: Arc::new(AtomicU64::new(0)),
                    fetching: Arc::new(AtomicBool::new(false)),
                    slot: Arc::new(Mutex::new(None)),
                    cost_ns: Arc::new(AtomicU64::new(0)),
                    dirty_since: None,
                    last_flush: None,
                },
            )
        })
        .collect();
    let (snap_tx, mut snap_rx) = mpsc::unbounded_channel::<(DaemonKind, Snapshot)>();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_msg = Instant::now();
    loop {
        let next_due = followed
            .values()
            .filter_map(|f| f.due(last_msg, f.spacing::<L>()))
            .min();
        let flush_at = next_due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            msg = sub.recv() => match msg {
                Ok(env) => {
                    last_msg = Instant::now();
                    shared.bus.received.increment(1);
                    let src = env.src;
                    let stateful = env.body.state_op().is_some();
                    // Events go to the logic as they arrive (the store keeps only state).
                    let event = (!stateful && !matches!(env.body, Body::Heartbeat { .. }))
                        .then(|| env.body.clone());
                    if let Some(fd) = followed.get_mut(&src) {
                        fd.heard_ns.store(mono_ns(), Ordering::Relaxed);
                        let f = &mut fd.follower;
                        let gaps = |f: &Follower| f.stats().gaps + f.stats().new_boots;
                        let before = gaps(f);
                        let outcome = f.handle_update(env, now_ns());
                        if gaps(f) > before {
                            shared.bus.gaps.increment(gaps(f) - before);
                            tracing::info!("bus {}: {:?}, fetching snapshot", src.name(), outcome);
                        }
                        if stateful && matches!(outcome, bus_schema::FollowOutcome::Applied) {
                            fd.dirty_since.get_or_insert(last_msg);
                        }
                        let fresh = !matches!(
                            outcome,
                            bus_schema::FollowOutcome::Stale | bus_schema::FollowOutcome::WrongSource
                        );
                        if let (Some(body), true) = (event, fresh) {
                            // The logic sees the state an event follows before the event.
                            for (k, other) in followed.iter_mut() {
                                other.flush(*k, &shared);
                            }
                            shared.core.do_send(BusEvent { src, body });
                        }
                    }
                }
                Err(e) => {
                    shared.bus.decode_errors.increment(1);
                    tracing::debug!("bus frame dropped: {e}");
                }
            },
            Some((src, snap)) = snap_rx.recv() => {
                if let Some(fd) = followed.get_mut(&src) {
                    fd.follower.handle_snapshot(snap, now_ns());
                    shared.bus.snapshots_applied.increment(1);
                    tracing::info!("bus {}: snapshot applied, {} items", src.name(), fd.follower.store().len());
                    fd.dirty_since = Some(Instant::now());
                    fd.flush(src, &shared);
                }
            }
            _ = tokio::time::sleep_until(flush_at.into()), if next_due.is_some() => {}
            _ = tick.tick() => {
                let now = now_ns();
                for (src, fd) in followed.iter_mut() {
                    // While a fetch runs, its answer serves the request: no second fetch.
                    if fd.follower.poll_snapshot_request(now)
                        && !fd.fetching.swap(true, Ordering::AcqRel)
                    {
                        let tx = snap_tx.clone();
                        let run_dir = shared.run_dir.clone();
                        let src = *src;
                        let heard = fd.heard_ns.clone();
                        let fetching = fd.fetching.clone();
                        let timeouts = shared.bus.snapshot_timeouts.clone();
                        actix_rt::spawn(async move {
                            let started = Instant::now();
                            match fetch_snapshot(&run_dir, src, &heard, SNAPSHOT_OWNER_SILENCE, SNAPSHOT_FETCH_LIMIT).await {
                                Ok(s) => {
                                    tracing::debug!("snapshot from {}: {} items in {:?}", src.name(), s.items.len(), started.elapsed());
                                    let _ = tx.send((src, s));
                                }
                                Err(e @ (FetchError::OwnerSilent(_) | FetchError::Limit(_))) => {
                                    timeouts.increment(1);
                                    tracing::warn!("snapshot from {}: {e}", src.name());
                                }
                                Err(e) => tracing::debug!("snapshot from {}: {e}", src.name()),
                            }
                            fetching.store(false, Ordering::Release);
                        });
                    }
                }
            }
        }
        let now = Instant::now();
        for (src, fd) in followed.iter_mut() {
            if fd
                .due(last_msg, fd.spacing::<L>())
                .is_some_and(|due| now >= due)
            {
                fd.flush(*src, &shared);
            }
        }
        let now = now_ns();
        let mut reps = lock(&shared.replicas);
        for (src, fd) in &followed {
            reps.insert(*src, fd.follower.replica_info(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pending change goes to the logic 2 ms after the bus went quiet, unless the last
    /// hand-over was less than 50 ms ago; never later than 50 ms after the change.
    #[test]
    fn replica_hand_overs_are_spaced_under_a_steady_stream() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let ms = Duration::from_millis;
        let mut f = Followed {
            follower: Follower::new(DaemonKind::Ikemgr),
            heard_ns: Arc::new(AtomicU64::new(0)),
            fetching: Arc::new(AtomicBool::new(false)),
            slot: Arc::new(Mutex::new(None)),
            cost_ns: Arc::new(AtomicU64::new(0)),
            dirty_since: None,
            last_flush: None,
        };
        let sp = replica_spacing(0, 0);
        assert_eq!(sp, ms(50));
        assert_eq!(f.due(t0, sp), None, "nothing pending");
        f.dirty_since = Some(t0);
        assert_eq!(
            f.due(t0, sp),
            Some(t0 + ms(2)),
            "quiet bus, no earlier hand-over"
        );
        assert_eq!(
            f.due(t0 + ms(30), sp),
            Some(t0 + ms(32)),
            "updates kept coming"
        );
        assert_eq!(
            f.due(t0 + ms(60), sp),
            Some(t0 + ms(50)),
            "at most 50 ms after the change"
        );
        f.last_flush = Some(t0 - ms(10));
        assert_eq!(
            f.due(t0, sp),
            Some(t0 + ms(40)),
            "50 ms after the last hand-over"
        );
        f.last_flush = Some(t0 - ms(200));
        assert_eq!(f.due(t0, sp), Some(t0 + ms(2)));
    }

    /// A logic whose last `on_replica` took 100 ms, with a spacing of 3, gets the store
    /// 300 ms after the last hand-over at the earliest (and 300 ms after a change at the
    /// latest); a cheap one, or one without a spacing, every 50 ms.
    #[test]
    fn slow_replica_reads_space_the_hand_overs() {
        let ms = Duration::from_millis;
        let cost = 100_000_000;
        assert_eq!(replica_spacing(cost, 0), ms(50));
        assert_eq!(replica_spacing(1_000_000, 3), ms(50));
        assert_eq!(replica_spacing(cost, 3), ms(300));
        assert_eq!(replica_spacing(u64::MAX, 3), REPLICA_SPACING_MAX);
        let t0 = Instant::now() + Duration::from_secs(1);
        let f = Followed {
            follower: Follower::new(DaemonKind::Ikemgr),
            heard_ns: Arc::new(AtomicU64::new(0)),
            fetching: Arc::new(AtomicBool::new(false)),
            slot: Arc::new(Mutex::new(None)),
            cost_ns: Arc::new(AtomicU64::new(0)),
            dirty_since: Some(t0),
            last_flush: Some(t0 - ms(100)),
        };
        assert_eq!(f.due(t0, replica_spacing(cost, 3)), Some(t0 + ms(200)));
        assert_eq!(f.due(t0, replica_spacing(cost, 0)), Some(t0 + ms(2)));
    }

    /// A logic with one timer, armed by the configuration `DELAY_MS` ahead, whose period
    /// tick is far away: only the `poll_timeout` wake-up can run it.
    struct OneTimer {
        deadline_ms: Option<u64>,
        /// (now at the tick, deadline it consumed)
        fired: Arc<Mutex<Vec<(u64, u64)>>>,
    }

    const DELAY_MS: u64 = 150;

    impl DaemonLogic for OneTimer {
        const KIND: DaemonKind = DaemonKind::Dpdmon;
        const FOLLOWS: &'static [DaemonKind] = &[];
        const TICK_MS: u64 = 3_600_000;

        fn new(_config: &Config, _run_dir: &Path) -> Self {
            OneTimer {
                deadline_ms: None,
                fired: Arc::default(),
            }
        }
        fn on_config(&mut self, _config: &Config, _out: &mut Outbox) {
            self.deadline_ms = Some(now_ns() / 1_000_000 + DELAY_MS);
        }
        fn view(&self, _name: &str, _args: &[String]) -> Result<serde_json::Value, String> {
            Err("none".into())
        }
        fn tick(&mut self, now_ns: u64, out: &mut Outbox) {
            let now = now_ns / 1_000_000;
            if let Some(d) = self.deadline_ms.filter(|d| *d <= now) {
                self.deadline_ms = None;
                lock(&self.fired).push((now, d));
                out.push(Body::Heartbeat { uptime_ms: now });
            }
        }
        fn poll_timeout(&self) -> Option<u64> {
            self.deadline_ms
        }
    }

    /// The actor ticks the logic at its `poll_timeout`, not before, and once per timer.
    #[test]
    fn poll_timeout_wakes_the_logic_on_time() {
        let fired = Arc::new(Mutex::new(Vec::new()));
        let published = actix::System::new().block_on({
            let fired = fired.clone();
            async move {
                let (tx, mut rx) = mpsc::unbounded_channel();
                let core = Core {
                    logic: OneTimer {
                        deadline_ms: None,
                        fired,
                    },
                    out: tx,
                    timer: None,
                }
                .start();
                core.do_send(ApplyConfig(Arc::new(Config::default())));
                tokio::time::sleep(Duration::from_millis(DELAY_MS * 4)).await;
                let mut n = 0;
                while rx.try_recv().is_ok() {
                    n += 1;
                }
                n
            }
        });
        let fired = lock(&fired).clone();
        assert_eq!(fired.len(), 1, "{fired:?}");
        let (now, deadline) = fired[0];
        assert!(now >= deadline, "woken early: {fired:?}");
        assert_eq!(published, 1);
    }

    fn temp_run_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("haven-shell-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn big_snapshot(n: usize) -> Snapshot {
        let mut o = Owner::new(DaemonKind::Ikemgr, 7);
        for i in 0..n {
            o.stamp(
                Body::TunnelRole {
                    tunnel: format!("vpn{i:06}"),
                    role: "sync-primary".into(),
                },
                0,
            );
        }
        o.snapshot()
    }

    /// A large snapshot that takes longer than several silence windows to arrive is still
    /// fetched while the owner is heard on the bus; the same owner silent fails with
    /// `OwnerSilent`.
    #[test]
    fn snapshot_fetch_waits_while_the_owner_lives_and_stops_when_it_falls_silent() {
        const N: usize = 100_000;
        const SILENCE: Duration = Duration::from_millis(300);
        let dir = temp_run_dir("fetch");
        let (alive, silent) = actix::System::new().block_on({
            let dir = dir.clone();
            async move {
                // The owner, on a thread of its own as in its own process: it answers the
                // first request after 4 silence windows and never answers the second.
                let (bound_tx, bound_rx) = std::sync::mpsc::channel();
                let owner_dir = dir.clone();
                std::thread::spawn(move || {
                    actix::System::new().block_on(async move {
                        let mut server = CtlServer::bind(&owner_dir, DaemonKind::Ikemgr)
                            .await
                            .unwrap();
                        let snap = big_snapshot(N);
                        bound_tx.send(()).unwrap();
                        let (peer, req) = server.recv().await.unwrap();
                        assert!(matches!(req, Ok(CtlRequest::Snapshot)));
                        tokio::time::sleep(SILENCE * 4).await;
                        server.send(&peer, &CtlReply::Snapshot(snap)).await.unwrap();
                        let _ = server.recv().await;
                        // Silent from here on; the thread ends with the test process.
                        std::future::pending::<()>().await;
                    })
                });
                bound_rx.recv().unwrap();
                let heard = Arc::new(AtomicU64::new(0));
                let beat = {
                    let heard = heard.clone();
                    actix_rt::spawn(async move {
                        loop {
                            heard.store(mono_ns(), Ordering::Relaxed);
                            tokio::time::sleep(SILENCE / 3).await;
                        }
                    })
                };
                let alive = fetch_snapshot(
                    &dir,
                    DaemonKind::Ikemgr,
                    &heard,
                    SILENCE,
                    SNAPSHOT_FETCH_LIMIT,
                )
                .await;
                beat.abort();
                let silent = fetch_snapshot(
                    &dir,
                    DaemonKind::Ikemgr,
                    &heard,
                    SILENCE,
                    SNAPSHOT_FETCH_LIMIT,
                )
                .await;
                (alive, silent)
            }
        });
        let _ = std::fs::remove_dir_all(&dir);
        let snap = alive.expect("large snapshot from a live owner");
        assert_eq!(snap.items.len(), N);
        assert_eq!(snap.seq, N as u64);
        assert!(
            matches!(silent, Err(FetchError::OwnerSilent(_))),
            "{silent:?}"
        );
    }
}
