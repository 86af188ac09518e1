//! `vpnctl`: the operator's view of a Haven gateway.
//!
//! Talks to each daemon's control socket in the run-dir (`<run-dir>/ctl/<daemon>.sock`).
//! Every view prints a FortiOS-style text form by default and JSON with `--json`.
//! Exit codes: 0 success, 1 the request failed or a check found errors, 2 usage error,
//! 3 a daemon needed for the answer is not running (the message says how to check and start
//! it under systemd or supervisord). `status` exits 3 when any daemon is down; `config
//! reload` exits 1 when a daemon refused the file, else 3 when one was not running.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bus_schema::{ctl_call, Body, CtlClient, CtlReply, CtlRequest, DaemonKind};
use clap::{CommandFactory, Parser, Subcommand, ValueHint};

mod completions;
mod wireshark;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "vpnctl",
    version,
    about = "Operate a Haven IPsec gateway",
    after_help = "Exit codes: 0 success; 1 the request failed (or a check found errors); 2 usage \
                  error; 3 a daemon needed for the answer is not running (the message says how to \
                  check and start it)."
)]
struct Cli {
    /// Run-dir of the daemons (their bus and control sockets).
    #[arg(long, global = true, default_value = "/run/haven", value_hint = ValueHint::DirPath)]
    run_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for a daemon's answer, in milliseconds.
    #[arg(long, global = true, default_value_t = 2000)]
    timeout_ms: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// One line per daemon: up/down, pid, boot id, uptime, bus sequence.
    Status,
    /// Check or reload the configuration.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Live debug output of one daemon.
    Debug {
        #[command(subcommand)]
        cmd: DebugCmd,
    },
    /// FortiOS-style diagnose commands.
    Diagnose {
        #[command(subcommand)]
        cmd: DiagnoseCmd,
    },
    /// Raw state: a daemon's published snapshot, or its replicas of the daemons it follows.
    Show {
        #[command(subcommand)]
        cmd: ShowCmd,
    },
    /// Set a daemon's log level at run time.
    LogLevel {
        /// ikemgr, dpdmon, hasyncd, espd (or ike, dpd, ha, esp).
        daemon: String,
        /// off|error|warn|info|debug|trace, or a FortiOS number (-1 = all).
        #[arg(allow_hyphen_values = true)]
        level: String,
    },
    /// FortiOS-style `get` commands: `get vpn ipsec tunnel summary` (ikemgr).
    Get {
        /// `vpn ipsec tunnel summary`.
        words: Vec<String>,
    },
    /// Print a shell completion script: `vpnctl completions bash > /usr/share/bash-completion/completions/vpnctl`.
    Completions {
        /// bash (zsh: load it after `autoload -U bashcompinit && bashcompinit`).
        shell: String,
    },
    /// FortiOS-style `execute` commands: `execute vpn ipsec tunnel up|down|rekey
    /// <phase2> [<phase1>]`, `execute vpn ipsec ike rekey <tunnel or phase1>` (ikemgr),
    /// `execute ha synchronize start` (hasyncd: a secondary takes the primary's configuration).
    Execute {
        /// `vpn ipsec tunnel up|down|rekey <phase2> [<phase1>]`, `vpn ipsec ike rekey <name>`
        /// or `ha synchronize start`.
        words: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Validate a configuration file without starting anything: warnings exit 0, errors exit 1.
    Check {
        /// The configuration file (FortiOS CLI dialect).
        #[arg(value_hint = ValueHint::FilePath)]
        file: PathBuf,
    },
    /// Ask every running daemon to reload its configuration (a file that fails validation changes nothing).
    Reload,
}

#[derive(Subcommand, Debug)]
enum DebugCmd {
    /// Stream a daemon's debug lines until interrupted; its level is raised only while attached.
    Attach {
        /// ikemgr, dpdmon, hasyncd, espd (or ike, dpd, ha, esp).
        daemon: String,
        /// Debug level while attached: error|warn|info|debug|trace, or a FortiOS number (-1 = all).
        #[arg(long, default_value = "debug", allow_hyphen_values = true)]
        level: String,
    },
}

/// `diagnose sys …` (hasyncd).
#[derive(Subcommand, Debug)]
enum DiagSysCmd {
    /// HA views: `ha status`, `ha standalone-peers`.
    Ha {
        #[command(subcommand)]
        cmd: DiagSysHaCmd,
    },
}

#[derive(Subcommand, Debug)]
enum DiagSysHaCmd {
    /// FGCP cluster members and roles (seed 001 layout).
    Status,
    /// FGSP peers (seed 000 layout).
    StandalonePeers,
    /// Configuration checksums (FGCP config sync): `show` (this member), `cluster` (every
    /// member).
    Checksum {
        #[command(subcommand)]
        cmd: DiagSysHaChecksumCmd,
    },
}

#[derive(Subcommand, Debug)]
enum DiagSysHaChecksumCmd {
    /// This member's checksums: running configuration (debugzone) and file (checksum).
    Show,
    /// Every FGCP member's checksums.
    Cluster,
}

#[derive(Subcommand, Debug)]
enum DiagnoseCmd {
    /// HA views (hasyncd).
    Sys {
        #[command(subcommand)]
        cmd: DiagSysCmd,
    },
    /// FortiOS debug selection: `application <app> <level>`, then `enable` to stream.
    Debug {
        #[command(subcommand)]
        cmd: DiagDebugCmd,
    },
    /// VPN datapath views (espd).
    Vpn {
        #[command(subcommand)]
        cmd: DiagVpnCmd,
    },
}

#[derive(Subcommand, Debug)]
enum DiagVpnCmd {
    /// `tunnel list [name N]` or `tunnel flush [name N]`.
    Tunnel {
        #[command(subcommand)]
        cmd: DiagTunnelCmd,
    },
    /// IKE views (ikemgr): `ike gateway list [name N]`, `ike gateway clear [name N]`.
    Ike {
        #[command(subcommand)]
        cmd: DiagIkeCmd,
    },
}

#[derive(Subcommand, Debug)]
enum DiagIkeCmd {
    /// IKE SAs (gateways) of ikemgr.
    Gateway {
        #[command(subcommand)]
        cmd: DiagIkeGatewayCmd,
    },
    /// Write the live SAs' keys for Wireshark: `DIR/esp_sa` and `DIR/ikev2_decryption_table`
    /// (use DIR as WIRESHARK_CONFIG_DIR, or copy them into a profile). They hold keys: keep them secret.
    ExportKeys {
        /// Directory to write the files into (created if missing, mode 0700).
        #[arg(long, value_hint = ValueHint::DirPath)]
        wireshark: PathBuf,
    },
    /// Static tunnels' lifecycle: state (up, negotiating, held, standby, passive, idle),
    /// dpd-action, current peer, failed attempts and the wait before the next one.
    Lifecycle,
}

#[derive(Subcommand, Debug)]
enum DiagIkeGatewayCmd {
    /// Every IKE SA with its CHILD SAs (SPIs, algorithms, selectors; never keys).
    List {
        /// `name N` selects one tunnel instance or phase1.
        args: Vec<String>,
    },
    /// Delete every IKE SA (or those of `name N`), telling the peer.
    Clear {
        /// `name N` selects one tunnel instance or phase1.
        args: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum DiagTunnelCmd {
    /// Tunnels with their SAs and counters, in FortiOS layout (keys are never shown).
    List {
        /// `name N` selects one tunnel.
        args: Vec<String>,
    },
    /// Remove the SAs of every tunnel (or of `name N`) from the datapath; ikemgr is told.
    Flush {
        /// `name N` selects one tunnel.
        args: Vec<String>,
    },
    /// Bring one selector up: `<phase2> [<phase1>]` (as `execute vpn ipsec tunnel up`).
    Up {
        /// `<phase2> [<phase1>]`.
        args: Vec<String>,
    },
    /// Take one selector down: `<phase2> [<phase1>]` (as `execute vpn ipsec tunnel down`).
    Down {
        /// `<phase2> [<phase1>]`.
        args: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum DiagDebugCmd {
    /// Select an application and level, e.g. `application ike -1`.
    Application {
        /// ike, dpd, ha or esp.
        app: String,
        /// A FortiOS number (-1 = all) or error|warn|info|debug|trace.
        #[arg(allow_hyphen_values = true)]
        level: String,
    },
    /// Stream the selected applications' debug output until interrupted.
    Enable,
    /// Forget the selected applications.
    Disable,
    /// Forget the selected applications.
    Reset,
}

#[derive(Subcommand, Debug)]
enum ShowCmd {
    /// The state a daemon publishes, as its snapshot.
    Snapshot {
        /// ikemgr, dpdmon, hasyncd, espd (or ike, dpd, ha, esp).
        daemon: String,
        /// Include SA key material (redacted by default).
        #[arg(long)]
        show_keys: bool,
    },
    /// What a daemon knows of the daemons it follows (boot, seq, synced, digest).
    Replicas {
        /// ikemgr, dpdmon, hasyncd, espd (or ike, dpd, ha, esp).
        daemon: String,
    },
}

fn main() -> ExitCode {
    // Output piped into a reader that stops early (`vpnctl ... | head`) ends vpnctl quietly
    // by SIGPIPE, as other command-line tools do, instead of a panic in `println!`.
    // SAFETY: first statement, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vpnctl: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vpnctl: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

fn daemon_arg(s: &str) -> Result<DaemonKind, Failure> {
    let k = DaemonKind::from_name(s).or_else(|| {
        DaemonKind::DAEMONS
            .iter()
            .copied()
            .find(|k| k.debug_app() == s)
    });
    match k {
        Some(k) if k != DaemonKind::Vpnctl => Ok(k),
        _ => Err(fail(
            2,
            format!("unknown daemon {s:?}: expected ikemgr, dpdmon, hasyncd, espd (or ike, dpd, ha, esp)"),
        )),
    }
}

/// What to do about a daemon that does not answer: where to look under either supervisor,
/// and how to start it by hand.
fn start_hint(kind: DaemonKind, run_dir: &Path) -> String {
    let name = kind.name();
    format!(
        "check it with `systemctl status haven-{name}` (systemd) or `ops/haven-supervise status` \
         (supervisord), or start it with `{name} --config FILE --run-dir {}`",
        run_dir.display()
    )
}

async fn call(cli: &Cli, kind: DaemonKind, req: CtlRequest) -> Result<CtlReply, Failure> {
    match ctl_call(
        &cli.run_dir,
        kind,
        &req,
        Duration::from_millis(cli.timeout_ms),
    )
    .await
    {
        Ok(CtlReply::Error { message }) => Err(fail(1, format!("{}: {message}", kind.name()))),
        Ok(r) => Ok(r),
        Err(e @ bus_schema::BusError::NotRunning { .. }) => {
            Err(fail(3, format!("{e}: {}", start_hint(kind, &cli.run_dir))))
        }
        Err(e) => Err(fail(
            3,
            format!(
                "{} is not answering on {} ({e}); is it running? {}",
                kind.name(),
                bus_schema::ctl_endpoint(&cli.run_dir, kind),
                start_hint(kind, &cli.run_dir)
            ),
        )),
    }
}

/// Replaces SA key material in a JSON view by a marker.
fn redact_keys(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "keys_in" || k == "keys_out" || k == "keys" {
                    *x = Value::String("<redacted>".into());
                } else {
                    redact_keys(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact_keys),
        _ => {}
    }
}

fn print_json(v: &Value) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("vpnctl: cannot print JSON: {e}"),
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match &cli.cmd {
        Cmd::Status => status(&cli).await,
        Cmd::Config { cmd } => match cmd {
            ConfigCmd::Check { file } => config_check(&cli, file),
            ConfigCmd::Reload => config_reload(&cli).await,
        },
        Cmd::Debug {
            cmd: DebugCmd::Attach { daemon, level },
        } => {
            let kind = daemon_arg(daemon)?;
            stream_debug(&cli, vec![(kind, level.clone())]).await
        }
        Cmd::Diagnose {
            cmd: DiagnoseCmd::Debug { cmd },
        } => diagnose_debug(&cli, cmd).await,
        Cmd::Diagnose {
            cmd: DiagnoseCmd::Vpn {
                cmd: DiagVpnCmd::Tunnel { cmd },
            },
        } => diagnose_vpn_tunnel(&cli, cmd).await,
        Cmd::Diagnose {
            cmd:
                DiagnoseCmd::Vpn {
                    cmd:
                        DiagVpnCmd::Ike {
                            cmd: DiagIkeCmd::Gateway { cmd },
                        },
                },
        } => diagnose_vpn_ike_gateway(&cli, cmd).await,
        Cmd::Diagnose {
            cmd:
                DiagnoseCmd::Vpn {
                    cmd: DiagVpnCmd::Ike {
                        cmd: DiagIkeCmd::ExportKeys { wireshark },
                    },
                },
        } => export_keys(&cli, wireshark).await,
        Cmd::Diagnose {
            cmd:
                DiagnoseCmd::Vpn {
                    cmd:
                        DiagVpnCmd::Ike {
                            cmd: DiagIkeCmd::Lifecycle,
                        },
                },
        } => diagnose_vpn_ike_lifecycle(&cli).await,
        Cmd::Completions { shell } => match shell.as_str() {
            "bash" => {
                println!("{}", completions::bash(Cli::command()));
                Ok(ExitCode::SUCCESS)
            }
            other => Err(fail(
                2,
                format!("no completion for shell {other:?}: vpnctl completes bash (and zsh through bashcompinit)"),
            )),
        },
        Cmd::Get { words } => get_cmd(&cli, words).await,
        Cmd::Execute { words } => execute_cmd(&cli, words).await,
        Cmd::Diagnose {
            cmd: DiagnoseCmd::Sys {
                cmd: DiagSysCmd::Ha { cmd },
            },
        } => diagnose_sys_ha(&cli, cmd).await,
        Cmd::Show { cmd } => {
            let v = match cmd {
                ShowCmd::Snapshot { daemon, show_keys } => {
                    match call(&cli, daemon_arg(daemon)?, CtlRequest::Snapshot).await? {
                        CtlReply::Snapshot(s) => {
                            let mut items = serde_json::to_value(&s.items)
                                .map_err(|e| fail(1, format!("cannot render snapshot: {e}")))?;
                            if !show_keys {
                                redact_keys(&mut items);
                            }
                            json!({
                                "src": s.src.name(), "boot": format!("{:032x}", s.boot), "seq": s.seq,
                                "items": items,
                            })
                        }
                        other => return Err(fail(1, format!("unexpected reply {other:?}"))),
                    }
                }
                ShowCmd::Replicas { daemon } => {
                    match call(&cli, daemon_arg(daemon)?, CtlRequest::Replicas).await? {
                        CtlReply::Replicas(reps) => Value::Array(
                            reps.iter()
                                .map(|r| {
                                    json!({
                                        "src": r.src.name(),
                                        "boot": r.boot.map(|b| format!("{b:032x}")),
                                        "seq": r.seq, "synced": r.synced, "items": r.items,
                                        "digest": format!("{:016x}", r.digest),
                                    })
                                })
                                .collect(),
                        ),
                        other => return Err(fail(1, format!("unexpected reply {other:?}"))),
                    }
                }
            };
            print_json(&v);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::LogLevel { daemon, level } => {
            let kind = daemon_arg(daemon)?;
            call(
                &cli,
                kind,
                CtlRequest::SetLogLevel {
                    level: level.clone(),
                },
            )
            .await?;
            if !cli.json {
                println!("{}: log level set to {level}", kind.name());
            } else {
                print_json(&json!({"daemon": kind.name(), "level": level}));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn status(cli: &Cli) -> Result<ExitCode, Failure> {
    let mut rows = Vec::new();
    for kind in DaemonKind::DAEMONS {
        let r = ctl_call(
            &cli.run_dir,
            kind,
            &CtlRequest::Status,
            Duration::from_millis(cli.timeout_ms.min(1000)),
        )
        .await;
        rows.push(match r {
            Ok(CtlReply::Status(s)) => json!({
                "daemon": kind.name(), "state": "up", "pid": s.pid,
                "boot": format!("{:032x}", s.boot), "uptime_ms": s.uptime_ms,
                "seq": s.seq, "log_level": s.log_level, "version": s.version,
                "config": s.config_path,
            }),
            Ok(other) => json!({"daemon": kind.name(), "state": "error",
                                "error": format!("unexpected reply {other:?}")}),
            Err(e) => json!({"daemon": kind.name(), "state": "down", "error": e.to_string(),
                             "hint": start_hint(kind, &cli.run_dir)}),
        });
    }
    let all_up = rows.iter().all(|r| r["state"] == "up");
    if !all_up && !cli.json {
        eprintln!(
            "vpnctl: start the daemons with `systemctl start haven.target` (systemd) or \
             `ops/haven-supervise start` (supervisord); see why one stopped with \
             `journalctl -u haven-DAEMON` or its log file (run-dir {})",
            cli.run_dir.display()
        );
    }
    if cli.json {
        print_json(&Value::Array(rows));
    } else {
        for r in &rows {
            if r["state"] == "up" {
                let up = r["uptime_ms"].as_u64().unwrap_or(0) / 1000;
                println!(
                    "{:<8} up    pid={:<7} boot={} uptime={}s seq={}",
                    r["daemon"].as_str().unwrap_or(""),
                    r["pid"],
                    &r["boot"].as_str().unwrap_or("")
                        [..16.min(r["boot"].as_str().unwrap_or("").len())],
                    up,
                    r["seq"]
                );
            } else {
                println!(
                    "{:<8} {:<5} {}",
                    r["daemon"].as_str().unwrap_or(""),
                    r["state"].as_str().unwrap_or(""),
                    r["error"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(if all_up {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn config_check(cli: &Cli, file: &Path) -> Result<ExitCode, Failure> {
    let report = haven_config::CheckReport::run(file);
    if cli.json {
        let v = serde_json::to_value(&report)
            .map_err(|e| fail(1, format!("cannot render report: {e}")))?;
        print_json(&v);
    } else if report.ok {
        print!("{}", report.to_text());
    } else {
        eprint!("{}", report.to_text());
    }
    Ok(ExitCode::from(report.exit_code() as u8))
}

async fn config_reload(cli: &Cli) -> Result<ExitCode, Failure> {
    // 1 if a daemon refused or answered oddly; else 3 if one was not running.
    let mut failed = 0u8;
    let mut out = Vec::new();
    for kind in DaemonKind::DAEMONS {
        match call(cli, kind, CtlRequest::ReloadConfig).await {
            Ok(CtlReply::Reloaded { warnings }) => {
                out.push(json!({"daemon": kind.name(), "reloaded": true, "warnings": warnings}))
            }
            Ok(other) => {
                failed = 1;
                out.push(json!({"daemon": kind.name(), "reloaded": false, "error": format!("unexpected reply {other:?}")}))
            }
            Err(e) => {
                if failed != 1 {
                    failed = e.code;
                }
                out.push(json!({"daemon": kind.name(), "reloaded": false, "error": e.message}))
            }
        }
    }
    if cli.json {
        print_json(&Value::Array(out));
    } else {
        for r in &out {
            if r["reloaded"] == true {
                println!(
                    "{}: reloaded ({} warnings)",
                    r["daemon"].as_str().unwrap_or(""),
                    r["warnings"].as_array().map(|a| a.len()).unwrap_or(0)
                );
            } else {
                println!(
                    "{}: not reloaded: {}",
                    r["daemon"].as_str().unwrap_or(""),
                    r["error"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(ExitCode::from(failed))
}

fn debug_selection_path(run_dir: &Path) -> PathBuf {
    run_dir.join("vpnctl-debug.json")
}

async fn diagnose_debug(cli: &Cli, cmd: &DiagDebugCmd) -> Result<ExitCode, Failure> {
    let path = debug_selection_path(&cli.run_dir);
    let mut sel: serde_json::Map<String, Value> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    match cmd {
        DiagDebugCmd::Application { app, level } => {
            let kind = daemon_arg(app)?;
            if let Err(e) = haven_level_check(level) {
                return Err(fail(2, e));
            }
            sel.insert(kind.debug_app().to_string(), Value::String(level.clone()));
            let sel = Value::Object(sel);
            std::fs::write(&path, sel.to_string()).map_err(|e| {
                fail(
                    1,
                    format!("cannot save selection in {}: {e}", path.display()),
                )
            })?;
            if cli.json {
                print_json(&json!({ "selection": sel }));
            }
            Ok(ExitCode::SUCCESS)
        }
        DiagDebugCmd::Disable | DiagDebugCmd::Reset => {
            let _ = std::fs::remove_file(&path);
            if cli.json {
                print_json(&json!({ "selection": {} }));
            }
            Ok(ExitCode::SUCCESS)
        }
        DiagDebugCmd::Enable => {
            if sel.is_empty() {
                return Err(fail(
                    2,
                    "no application selected: run `vpnctl diagnose debug application ike -1` first",
                ));
            }
            let mut targets = Vec::new();
            for (app, level) in sel {
                let kind = daemon_arg(&app)?;
                targets.push((kind, level.as_str().unwrap_or("debug").to_string()));
            }
            stream_debug(cli, targets).await
        }
    }
}

fn haven_level_check(level: &str) -> Result<(), String> {
    let l = level.trim().to_ascii_lowercase();
    let named = [
        "off", "none", "error", "err", "warn", "warning", "info", "debug", "trace", "all",
    ];
    if named.contains(&l.as_str()) || l.parse::<i32>().is_ok() {
        Ok(())
    } else {
        Err(format!("invalid debug level {level:?}: expected a number (-1 for all) or error|warn|info|debug|trace"))
    }
}

/// Attaches to each target daemon and prints its debug lines until SIGINT/SIGTERM.
/// Re-attaches when a daemon restarts, so a session survives `kill -9` of the daemon.
async fn stream_debug(cli: &Cli, targets: Vec<(DaemonKind, String)>) -> Result<ExitCode, Failure> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(DaemonKind, CtlReply)>(1024);
    // Fail early, with the usual message, when a daemon is not running at all.
    for (kind, _) in &targets {
        call(cli, *kind, CtlRequest::Status).await?;
    }
    for (kind, level) in targets {
        let tx = tx.clone();
        let run_dir = cli.run_dir.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(mut client) = CtlClient::connect(&run_dir, kind).await {
                    if client
                        .send(&CtlRequest::Attach {
                            level: level.clone(),
                        })
                        .await
                        .is_ok()
                    {
                        let mut last_ka = tokio::time::Instant::now();
                        let mut silent = 0;
                        loop {
                            if last_ka.elapsed() > Duration::from_secs(2) {
                                if client.send(&CtlRequest::AttachKeepalive).await.is_err() {
                                    break;
                                }
                                last_ka = tokio::time::Instant::now();
                            }
                            match client.recv(Duration::from_millis(500)).await {
                                Ok(CtlReply::Error { message }) => {
                                    // Keepalive refused: the daemon restarted; attach again.
                                    let _ = tx.send((kind, CtlReply::Error { message })).await;
                                    break;
                                }
                                Ok(r) => {
                                    silent = 0;
                                    if tx.send((kind, r)).await.is_err() {
                                        return;
                                    }
                                }
                                Err(_) => {
                                    silent += 1;
                                    if silent > 10 {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    drop(tx);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| fail(1, format!("signal handler: {e}")))?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            m = rx.recv() => match m {
                Some((kind, CtlReply::DebugLine { ts_ns, level, line })) => {
                    if cli.json {
                        println!("{}", json!({"daemon": kind.name(), "ts_ns": ts_ns, "level": level, "line": line}));
                    } else {
                        println!("{line}");
                    }
                }
                Some((kind, CtlReply::Error { message })) => {
                    eprintln!("vpnctl: {}: {message}; re-attaching", kind.name());
                }
                Some(_) => {}
                None => break,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `diagnose vpn tunnel list|flush [name N]`: espd's `tunnel-list` view (role and DPD state
/// added from hasyncd and dpdmon when they answer) or its `tunnel-flush` command.
async fn diagnose_vpn_tunnel(cli: &Cli, cmd: &DiagTunnelCmd) -> Result<ExitCode, Failure> {
    let (list, args) = match cmd {
        DiagTunnelCmd::List { args } => (true, args.clone()),
        DiagTunnelCmd::Flush { args } => (false, args.clone()),
        DiagTunnelCmd::Up { args } | DiagTunnelCmd::Down { args } => {
            let verb = if matches!(cmd, DiagTunnelCmd::Up { .. }) {
                "up"
            } else {
                "down"
            };
            let words: Vec<String> = ["vpn", "ipsec", "tunnel", verb]
                .iter()
                .map(|s| s.to_string())
                .chain(args.iter().cloned())
                .collect();
            return execute_cmd(cli, &words).await;
        }
    };
    let name = match args.as_slice() {
        [] => None,
        [k, n] if k == "name" => Some(n.clone()),
        _ => return Err(fail(2, "usage: diagnose vpn tunnel list|flush [name N]")),
    };
    let req_args: Vec<String> = name
        .iter()
        .flat_map(|n| ["name".to_string(), n.clone()])
        .collect();
    if !list {
        let req = CtlRequest::Command {
            name: "tunnel-flush".into(),
            args: req_args,
        };
        let v = match call(cli, DaemonKind::Espd, req).await? {
            CtlReply::View(v) => v,
            other => return Err(fail(1, format!("unexpected reply {other:?}"))),
        };
        if cli.json {
            print_json(&v);
        } else {
            let n = v["flushed"].as_array().map(|a| a.len()).unwrap_or(0);
            println!("flushed {n} SA(s)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let req = CtlRequest::View {
        name: "tunnel-list".into(),
        args: req_args,
    };
    let mut v = match call(cli, DaemonKind::Espd, req).await? {
        CtlReply::View(v) => v,
        other => return Err(fail(1, format!("unexpected reply {other:?}"))),
    };
    // Role (hasyncd) and DPD state (dpdmon) of each tunnel, when those daemons answer.
    let mut extra: std::collections::BTreeMap<String, (Option<String>, Option<Value>)> =
        Default::default();
    // Tunnel monitors (dpdmon's `dpd.monitor`).
    let mut monitors: std::collections::BTreeMap<String, Value> = Default::default();
    for kind in [DaemonKind::Hasyncd, DaemonKind::Dpdmon] {
        let snap = ctl_call(
            &cli.run_dir,
            kind,
            &CtlRequest::Snapshot,
            Duration::from_millis(cli.timeout_ms.min(500)),
        )
        .await;
        if let Ok(CtlReply::Snapshot(s)) = snap {
            for b in s.items {
                match b {
                    bus_schema::Body::TunnelRole { tunnel, role } => {
                        extra.entry(tunnel).or_default().0 = Some(role)
                    }
                    bus_schema::Body::Dpd(d) => {
                        let t = d.tunnel.clone();
                        extra.entry(t).or_default().1 = serde_json::to_value(&d).ok();
                    }
                    bus_schema::Body::TunnelMonitor(m) => {
                        if let Ok(v) = serde_json::to_value(&m) {
                            monitors.insert(m.tunnel.clone(), v);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    // FGSP: tunnels this member holds as standby copies (hasyncd), which espd does not carry.
    let standby = ctl_call(
        &cli.run_dir,
        DaemonKind::Hasyncd,
        &CtlRequest::View {
            name: "standby-tunnels".into(),
            args: vec![],
        },
        Duration::from_millis(cli.timeout_ms.min(500)),
    )
    .await;
    if let (Ok(CtlReply::View(sv)), Some(ts)) = (standby, v["tunnels"].as_array_mut()) {
        for t in sv["tunnels"].as_array().into_iter().flatten() {
            let n = t["name"].as_str().unwrap_or("");
            let wanted = name.as_deref().is_none_or(|f| f == n);
            if wanted && !ts.iter().any(|x| x["name"] == n) {
                ts.push(t.clone());
            }
        }
    }
    if let Some(ts) = v["tunnels"].as_array_mut() {
        for t in ts.iter_mut() {
            let n = t["name"].as_str().unwrap_or("").to_string();
            if let Some((role, dpd)) = extra.get(&n) {
                if let Some(r) = role {
                    t["role"] = json!(r);
                }
                if let Some(d) = dpd {
                    t["dpd"] = d.clone();
                }
            }
            if let Some(m) = monitors.get(&n) {
                t["monitor"] = m.clone();
            }
        }
    }
    if cli.json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let s = |x: &Value| x.as_str().unwrap_or("").to_string();
    let u = |x: &Value| x.as_u64().unwrap_or(0);
    match &name {
        Some(_) => println!("list ipsec tunnel by names in vd 0"),
        None => println!("list all ipsec tunnel in vd 0"),
    }
    let empty = Vec::new();
    for t in v["tunnels"].as_array().unwrap_or(&empty) {
        println!("------------------------------------------------------");
        println!(
            "name={} ver=2 {}:{}->{}:{} tun_id={} dev={} dst_mtu=1500",
            s(&t["name"]),
            s(&t["local_gw"]),
            u(&t["local_port"]),
            s(&t["remote_gw"]),
            u(&t["remote_port"]),
            s(&t["remote_gw"]),
            s(&t["device"])
        );
        println!(
            "tun=intf/0 encap={} role={} accept_traffic=1",
            s(&t["encap"]),
            t["role"].as_str().unwrap_or("primary")
        );
        println!();
        let sas = t["sas"].as_array().unwrap_or(&empty);
        println!("parent={} proxyid_num={}", s(&t["phase1"]), sas.len());
        let st = &t["stat"];
        println!(
            "stat: rxp={} txp={} rxb={} txb={}",
            u(&st["rxp"]),
            u(&st["txp"]),
            u(&st["rxb"]),
            u(&st["txb"])
        );
        if t["dpd"].is_object() {
            let d = &t["dpd"];
            println!(
                "dpd: mode={} on={} idle={}ms retry={} count={} seqno={}",
                s(&d["mode"]),
                u8::from(d["on"].as_bool().unwrap_or(false)),
                u(&d["idle_ms"]),
                u(&d["retry"]),
                u(&d["count"]),
                u(&d["seqno"])
            );
            // Haven: the probe schedule and the time until a silent peer is declared dead.
            if !s(&d["schedule"]).is_empty() {
                println!(
                    "dpd-schedule: {} dead-after={}ms",
                    s(&d["schedule"]),
                    u(&d["dead_after_ms"])
                );
            }
        }
        // Haven: the tunnel monitor (ICMP through the tunnel; `set tunnel-monitor enable`).
        if t["monitor"].is_object() {
            let m = &t["monitor"];
            println!(
                "monitor: dst={} src={} interval={}ms threshold={} misses={} state={} action={}",
                s(&m["destination"]),
                s(&m["source"]),
                u(&m["interval_ms"]),
                u(&m["threshold"]),
                u(&m["misses"]),
                s(&m["state"]),
                s(&m["action"])
            );
        }
        let natt = if s(&t["encap"]) == "udp" {
            "keepalive"
        } else {
            "none"
        };
        println!(
            "natt: mode={natt} draft=0 interval=0 remote_port={}",
            u(&t["remote_port"])
        );
        for sa in sas {
            println!("proxyid={} proto=0 sa=1", s(&sa["proxyid"]));
            for src in sa["src"].as_array().unwrap_or(&empty) {
                println!("  src: {}", s(src));
            }
            for dst in sa["dst"].as_array().unwrap_or(&empty) {
                println!("  dst: {}", s(dst));
            }
            let life = &sa["life"];
            println!(
                "  SA:  ref=3 options=0 type=00 soft=0 mtu={} expire={}/0B replaywin={}",
                u(&sa["mtu"]),
                u(&sa["expire"]),
                u(&sa["replaywin"])
            );
            println!(
                "       seqno={:x} esn={} replaywin_lastseq={:08x} outbound={}",
                u(&sa["seqno"]),
                u8::from(sa["esn"].as_bool().unwrap_or(false)),
                u(&sa["replaywin_lastseq"]),
                u8::from(sa["outbound"].as_bool().unwrap_or(false))
            );
            println!(
                "  life: type=01 bytes={}/{} timeout={}/{}",
                u(&life["bytes"]),
                u(&life["bytes_hard"]),
                u(&life["timeout"]),
                u(&life["timeout_hard"])
            );
            for dir in ["dec", "enc"] {
                let d = &sa[dir];
                println!(
                    "  {dir}: spi={} esp={} key={}",
                    s(&d["spi"]),
                    s(&d["esp"]),
                    u(&d["key"])
                );
                println!("       ah={} key={}", s(&d["ah"]), u(&d["ah_key"]));
            }
            println!(
                "  dec:pkts/bytes={}/{}, enc:pkts/bytes={}/{}",
                u(&sa["dec_pkts"]),
                u(&sa["dec_bytes"]),
                u(&sa["enc_pkts"]),
                u(&sa["enc_bytes"])
            );
            if let Some(drops) = sa["drops"].as_object().filter(|d| !d.is_empty()) {
                let list: Vec<String> = drops.iter().map(|(k, n)| format!("{k}={n}")).collect();
                println!("  drops: {}", list.join(" "));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `diagnose vpn ike export-keys --wireshark DIR`: ikemgr's CHILD SAs (with keys, from its
/// snapshot) as Wireshark's `esp_sa` table.
async fn export_keys(cli: &Cli, dir: &Path) -> Result<ExitCode, Failure> {
    let snap = match call(cli, DaemonKind::Ikemgr, CtlRequest::Snapshot).await? {
        CtlReply::Snapshot(s) => s,
        other => return Err(fail(1, format!("unexpected reply {other:?}"))),
    };
    let sas: Vec<_> = snap
        .items
        .into_iter()
        .filter_map(|b| match b {
            Body::ChildSa(sa) => Some(sa),
            _ => None,
        })
        .collect();
    let (text, records) = wireshark::esp_sa_file(&sas);
    let path = dir.join("esp_sa");
    write_secret(dir, &path, &text)
        .map_err(|e| fail(1, format!("cannot write {}: {e}", path.display())))?;
    let view = CtlRequest::View {
        name: "ike-keys".into(),
        args: Vec::new(),
    };
    let ike = match call(cli, DaemonKind::Ikemgr, view).await? {
        CtlReply::View(v) => v,
        other => return Err(fail(1, format!("unexpected reply {other:?}"))),
    };
    let (ike_text, ike_records) = wireshark::ikev2_file(&ike);
    let ike_path = dir.join("ikev2_decryption_table");
    write_secret(dir, &ike_path, &ike_text)
        .map_err(|e| fail(1, format!("cannot write {}: {e}", ike_path.display())))?;
    if cli.json {
        print_json(&json!({
            "esp_sa": path, "esp_records": records, "child_sas": sas.len(),
            "ikev2_decryption_table": ike_path, "ike_records": ike_records,
        }));
    } else {
        println!(
            "wrote {} ({records} ESP SA records from {} CHILD SAs)",
            path.display(),
            sas.len()
        );
        println!(
            "wrote {} ({ike_records} IKE SA records)",
            ike_path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Creates `dir` (0700 if new) and writes `path` readable by its owner only.
fn write_secret(dir: &Path, path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// `name N` from the arguments of an ike view; usage error otherwise.
fn ike_name_arg(args: &[String], usage: &str) -> Result<Vec<String>, Failure> {
    match args {
        [] => Ok(Vec::new()),
        [k, n] if k == "name" => Ok(vec!["name".to_string(), n.clone()]),
        _ => Err(fail(2, usage.to_string())),
    }
}

async fn ikemgr_view(cli: &Cli, name: &str, args: Vec<String>) -> Result<Value, Failure> {
    let req = CtlRequest::View {
        name: name.into(),
        args,
    };
    match call(cli, DaemonKind::Ikemgr, req).await? {
        CtlReply::View(v) => Ok(v),
        other => Err(fail(1, format!("unexpected reply {other:?}"))),
    }
}

/// `diagnose vpn ike gateway list|clear [name N]`.
async fn diagnose_vpn_ike_gateway(cli: &Cli, cmd: &DiagIkeGatewayCmd) -> Result<ExitCode, Failure> {
    let usage = "usage: diagnose vpn ike gateway list|clear [name N]";
    match cmd {
        DiagIkeGatewayCmd::Clear { args } => {
            let req = CtlRequest::Command {
                name: "ike-gateway-clear".into(),
                args: ike_name_arg(args, usage)?,
            };
            let v = match call(cli, DaemonKind::Ikemgr, req).await? {
                CtlReply::View(v) => v,
                other => return Err(fail(1, format!("unexpected reply {other:?}"))),
            };
            if cli.json {
                print_json(&v);
            } else {
                println!("cleared {} IKE SA(s)", v["cleared"].as_u64().unwrap_or(0));
            }
        }
        DiagIkeGatewayCmd::List { args } => {
            let v = ikemgr_view(cli, "ike-gateways", ike_name_arg(args, usage)?).await?;
            if cli.json {
                print_json(&v);
            } else {
                print!("{}", render_ike_gateways(&v));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The seeds' layout of `diagnose vpn ike gateway list` (key material is never shown).
fn render_ike_gateways(v: &Value) -> String {
    let s = |x: &Value| {
        x.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| x.to_string())
    };
    let n = |x: &Value| x.as_u64().unwrap_or(0);
    let mut out = String::new();
    for g in v.as_array().into_iter().flatten() {
        let up = g["established"] == true;
        let children = g["children"].as_array().map(|c| c.len()).unwrap_or(0);
        out.push_str(&format!(
            "vd: root/0\nname: {}\nversion: 2\ninterface: {} 0\naddr: {} -> {}\ncreated: {}s ago\n",
            s(&g["name"]),
            s(&g["interface"]),
            s(&g["local"]),
            s(&g["remote"]),
            n(&g["created_secs"])
        ));
        out.push_str(&format!(
            "peer-id: {}\nIKE SA: created 1/1 established {}/1 time 0/0/0 ms\nIPsec SA: created {children}/{children} established {children}/{children} time 0/0/0 ms\n\n",
            s(&g["remote_id"]),
            u8::from(up)
        ));
        out.push_str(&format!(
            "  id/spi: {} {}\n  direction: {}\n  status: {}\n  proposal: {}\n  child: no\n  message-id sent/recv: {}/{}\n  lifetime/rekey: {}/{}\n  DPD sent/recv: 00000000/00000000\n",
            g["serial"],
            s(&g["cookie"]),
            if g["initiator"] == true { "initiator" } else { "responder" },
            if up {
                format!("established {0}-{0}s ago = 0ms", n(&g["created_secs"]))
            } else {
                "connecting".to_string()
            },
            s(&g["proposal"]),
            g["msg_id_tx"],
            g["msg_id_rx"],
            n(&g["lifetime_secs"]),
            n(&g["rekey_in_secs"]),
        ));
        for c in g["children"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  IPsec SA: spi in={} out={} {} {} -> {}\n",
                s(&c["spi_in"]),
                s(&c["spi_out"]),
                s(&c["transform"]),
                c["local_ts"],
                c["remote_ts"]
            ));
        }
        out.push('\n');
    }
    out
}

/// `get vpn ipsec tunnel summary`: one line per tunnel with its peer and SA count.
async fn get_cmd(cli: &Cli, words: &[String]) -> Result<ExitCode, Failure> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    if w != ["vpn", "ipsec", "tunnel", "summary"] {
        return Err(fail(2, "usage: get vpn ipsec tunnel summary"));
    }
    let tunnels = ikemgr_view(cli, "tunnels", Vec::new()).await?;
    let gws = ikemgr_view(cli, "ike-gateways", Vec::new()).await?;
    let mut rows = Vec::new();
    for t in tunnels.as_array().into_iter().flatten() {
        let t = &t["tunnel"];
        let name = t["name"].as_str().unwrap_or("");
        let sa = gws
            .as_array()
            .and_then(|a| a.iter().find(|g| g["name"] == name));
        let peer = sa
            .and_then(|g| g["remote"].as_str().map(str::to_string))
            .or_else(|| t["remote_gw"].as_str().map(|r| format!("{r}:0")))
            .unwrap_or_else(|| "0.0.0.0:0".into());
        // Selectors up: phase2s with at least one CHILD SA (a rekey overlap counts once).
        let mut up_phase2s: Vec<&str> = sa
            .and_then(|g| g["children"].as_array())
            .into_iter()
            .flatten()
            .map(|c| c["phase2"].as_str().unwrap_or(""))
            .collect();
        up_phase2s.sort_unstable();
        up_phase2s.dedup();
        let children = up_phase2s.len();
        let selectors = t["phase2"].as_array().map(|p| p.len()).unwrap_or(0);
        rows.push(serde_json::json!({
            "name": name, "peer": peer, "selectors_up": children.min(selectors.max(1)),
            "selectors": selectors, "state": t["state"],
        }));
    }
    if cli.json {
        print_json(&Value::Array(rows));
    } else {
        for r in &rows {
            println!(
                "'{}' {} selectors(total,up): {}/{} rx(pkt,err): 0/0 tx(pkt,err): 0/0",
                r["name"].as_str().unwrap_or(""),
                r["peer"].as_str().unwrap_or(""),
                r["selectors"],
                r["selectors_up"]
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `execute vpn ipsec tunnel up|down|rekey <phase2> [<phase1>]` and `execute vpn ipsec ike
/// rekey <name>`: ikemgr commands; prints what was started.
async fn execute_cmd(cli: &Cli, words: &[String]) -> Result<ExitCode, Failure> {
    let usage = "usage: execute vpn ipsec tunnel up|down|rekey <phase2> [<phase1>] | \
                 execute vpn ipsec ike rekey <tunnel or phase1> | execute ha synchronize start";
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    if w.as_slice() == ["ha", "synchronize", "start"] {
        return execute_ha_synchronize(cli).await;
    }
    let (name, args) = match w.as_slice() {
        ["vpn", "ipsec", "tunnel", verb @ ("up" | "down" | "rekey"), rest @ ..]
            if (1..=2).contains(&rest.len()) =>
        {
            (format!("tunnel-{verb}"), rest)
        }
        ["vpn", "ipsec", "ike", "rekey", rest @ ..] if rest.len() == 1 => {
            ("ike-rekey".to_string(), rest)
        }
        _ => return Err(fail(2, usage)),
    };
    let req = CtlRequest::Command {
        name: name.clone(),
        args: args.iter().map(|s| s.to_string()).collect(),
    };
    let v = match call(cli, DaemonKind::Ikemgr, req).await? {
        CtlReply::View(v) => v,
        other => return Err(fail(1, format!("unexpected reply {other:?}"))),
    };
    if cli.json {
        print_json(&v);
    } else {
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        println!(
            "{}: {} IKE SA(s) initiated, {} exchange(s) started, {} unchanged",
            args.join(" "),
            n("initiated"),
            n("requested"),
            n("unchanged")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `execute ha synchronize start` (hasyncd command `config-sync`): an FGCP secondary takes
/// its primary's configuration again at the primary's next status (within a second).
async fn execute_ha_synchronize(cli: &Cli) -> Result<ExitCode, Failure> {
    let req = CtlRequest::Command {
        name: "config-sync".into(),
        args: Vec::new(),
    };
    match call(cli, DaemonKind::Hasyncd, req).await? {
        CtlReply::View(v) => {
            if cli.json {
                print_json(&v);
            } else {
                println!(
                    "synchronization from primary member {} requested (vpnctl diagnose sys ha checksum cluster shows the result)",
                    v["primary"]
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        CtlReply::Error { message } => Err(fail(1, message)),
        other => Err(fail(1, format!("unexpected reply {other:?}"))),
    }
}

/// `diagnose sys ha status|standalone-peers`: hasyncd's views, in the seeds' layout.
async fn diagnose_sys_ha(cli: &Cli, cmd: &DiagSysHaCmd) -> Result<ExitCode, Failure> {
    let view = match cmd {
        DiagSysHaCmd::Status => "ha-status",
        DiagSysHaCmd::StandalonePeers => "standalone-peers",
        DiagSysHaCmd::Checksum { .. } => "checksum",
    };
    let req = CtlRequest::View {
        name: view.into(),
        args: Vec::new(),
    };
    let v = match call(cli, DaemonKind::Hasyncd, req).await? {
        CtlReply::View(v) => v,
        other => return Err(fail(1, format!("unexpected reply {other:?}"))),
    };
    if cli.json {
        print_json(&v);
    } else {
        match cmd {
            DiagSysHaCmd::Status => print!("{}", render_ha_status(&v)),
            DiagSysHaCmd::StandalonePeers => print!("{}", render_standalone_peers(&v)),
            DiagSysHaCmd::Checksum {
                cmd: DiagSysHaChecksumCmd::Show,
            } => print!("{}", render_checksum_show(&v)),
            DiagSysHaCmd::Checksum {
                cmd: DiagSysHaChecksumCmd::Cluster,
            } => print!("{}", render_checksum_cluster(&v)),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One member's checksums in FortiOS's `diagnose sys ha checksum show` layout:
/// `debugzone` is the configuration the daemons run, `checksum` the file on disk (they
/// differ when the file was changed and not reloaded). Hex bytes as FortiOS prints them.
fn render_member_checksums(m: &Value, primary: bool) -> String {
    use std::fmt::Write as _;
    let spaced = |h: &Value| -> String {
        let h = h.as_str().unwrap_or("");
        let b: Vec<&str> = (0..h.len() / 2)
            .filter_map(|i| h.get(2 * i..2 * i + 2))
            .collect();
        b.join(" ")
    };
    let p = u8::from(primary);
    let mut s = String::new();
    let _ = writeln!(s, "is_manage_primary()={p}, is_root_primary()={p}");
    for (title, key) in [("debugzone", "running"), ("checksum", "file")] {
        let _ = writeln!(s, "{title}");
        if m[key].is_null() {
            let _ = writeln!(s, "(the configuration file does not load)");
        } else {
            for part in ["global", "root", "all"] {
                let _ = writeln!(s, "{part}: {}", spaced(&m[key][part]));
            }
        }
        s.push('\n');
    }
    s
}

/// `diagnose sys ha checksum show` from hasyncd's `checksum` view.
fn render_checksum_show(v: &Value) -> String {
    let me = json!({ "running": v["running"], "file": v["file"] });
    let mut s = render_member_checksums(&me, v["is_manage_primary"] == true);
    if v["mode"].as_str() != Some("a-p") {
        s.push_str("(no FGCP HA link: nothing to synchronize)\n");
    }
    s
}

/// `diagnose sys ha checksum cluster`: every FGCP member heard, primary first, then a
/// summary of the sync.
fn render_checksum_cluster(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if v["mode"].as_str() != Some("a-p") {
        s.push_str("HA information\nmode=standalone (no FGCP HA link)\n");
        return s;
    }
    let mut members: Vec<&Value> = v["members"].as_array().into_iter().flatten().collect();
    members.sort_by_key(|m| (m["is_primary"] != true, m["member_id"].as_u64()));
    for m in members {
        let name = m["serial"]
            .as_str()
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| format!("member {}", m["member_id"]));
        let _ = writeln!(s, "================== {name} ==================\n");
        s.push_str(&render_member_checksums(m, m["is_primary"] == true));
    }
    let sync = &v["sync"];
    let _ = writeln!(
        s,
        "in_sync={} sync-config={} syncs={} rejected={}",
        match v["in_sync"].as_bool() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown",
        },
        if v["sync_config"] == false {
            "disable"
        } else {
            "enable"
        },
        sync["syncs"].as_u64().unwrap_or(0),
        sync["rejected"].as_u64().unwrap_or(0),
    );
    if let Some(last) = sync["last"].as_str().filter(|l| !l.is_empty()) {
        let _ = writeln!(s, "last: {last}");
    }
    s
}

/// Seed 001's `diagnose sys ha status` layout from hasyncd's `ha-status` view. Counters
/// Haven does not have (sessions, fdb) print as 0; `traffic.*` are HA link packets/bytes.
fn render_ha_status(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if v["mode"].as_str() != Some("a-p") {
        s.push_str("HA information\nmode=standalone (no FGCP HA link)\n");
        return s;
    }
    let u = |k: &str| v["link"][k].as_u64().unwrap_or(0);
    let _ = writeln!(s, "\nHA information\nStatistics");
    let _ = writeln!(
        s,
        "        traffic.local = s:0 p:{} b:{}",
        u("received"),
        u("received_bytes")
    );
    let _ = writeln!(
        s,
        "        traffic.total = s:0 p:{} b:{}",
        u("received") + u("sent"),
        u("received_bytes") + u("sent_bytes")
    );
    let _ = writeln!(
        s,
        "        activity.ha_id_changes = {}",
        v["ha_id_changes"].as_u64().unwrap_or(0)
    );
    let _ = writeln!(s, "        activity.fdb  = c:0 q:0\n");
    let _ = writeln!(
        s,
        "Model=haven, Mode=2 Group={} Debug=0",
        v["group_id"].as_u64().unwrap_or(0)
    );
    let _ = writeln!(
        s,
        "nvcluster=1, ses_pickup={}, delay=0\n",
        u8::from(v["session_pickup"].as_bool().unwrap_or(false))
    );
    let mut members: Vec<&Value> = v["members"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    // Primary first, as FortiOS lists them.
    members.sort_by_key(|m| m["role"].as_str() != Some("primary"));
    let role = |m: &Value| match m["role"].as_str() {
        Some("primary") => "Primary",
        _ => "Secondary",
    };
    let _ = writeln!(s, "[Debug_Zone HA information]");
    let _ = writeln!(
        s,
        "HA group member information: is_manage_primary={}.",
        u8::from(v["role"].as_str() == Some("primary"))
    );
    for (i, m) in members.iter().enumerate() {
        let _ = writeln!(
            s,
            "{}:{:>13}, serialno_prio={i}, usr_priority={}, hostname={}",
            m["serial"].as_str().unwrap_or("?"),
            role(m),
            m["priority"].as_u64().unwrap_or(0),
            m["hostname"].as_str().unwrap_or("")
        );
    }
    let state = if v["role"].as_str() == Some("hello") {
        "hello"
    } else {
        "work"
    };
    let _ = writeln!(s, "\n[Kernel HA information]");
    let _ = writeln!(
        s,
        "vcluster 1, state={state}, hbdev={}, primary_id={}",
        v["hbdev"].as_str().unwrap_or(""),
        v["primary"]
            .as_u64()
            .map_or("-".to_string(), |p| p.to_string())
    );
    for (i, m) in members.iter().enumerate() {
        let _ = writeln!(
            s,
            "{}:{:>13}, ha_prio/o_ha_prio={i}/{i}",
            m["serial"].as_str().unwrap_or("?"),
            role(m)
        );
    }
    s
}

/// Seed 000's `diagnose sys ha standalone-peers` layout from hasyncd's `standalone-peers`
/// view. `session-type` counts sync messages; Haven syncs no packets (`packet-type` 0)
/// and has no kernel device table (the `dev_base` block is left out).
fn render_standalone_peers(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if v["configured"].as_bool() != Some(true) {
        s.push_str("no standalone-cluster (FGSP) link\n");
        return s;
    }
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        s,
        "Group={}, ID={}",
        v["group"].as_u64().unwrap_or(0),
        v["id"].as_u64().unwrap_or(0)
    );
    let _ = writeln!(
        s,
        "Detected-peers={}",
        v["detected_peers"].as_u64().unwrap_or(0)
    );
    let _ = writeln!(s, "Kernel standalone-peers: num={}.", peers.len());
    for (i, p) in peers.iter().enumerate() {
        let _ = writeln!(
            s,
            "peer{i}: vfid=0, peerip:port = {}:{}, standalone_id={}",
            p["peerip"].as_str().unwrap_or("?"),
            p["port"].as_u64().unwrap_or(0),
            p["standalone_id"]
                .as_u64()
                .map_or("-".to_string(), |n| n.to_string())
        );
        let _ = writeln!(
            s,
            "        session-type: send={}, recv={}",
            p["session_send"].as_u64().unwrap_or(0),
            p["session_recv"].as_u64().unwrap_or(0)
        );
        let _ = writeln!(
            s,
            "         packet-type: send={}, recv={}",
            p["packet_send"].as_u64().unwrap_or(0),
            p["packet_recv"].as_u64().unwrap_or(0)
        );
    }
    s
}

/// `diagnose vpn ike lifecycle`: ikemgr's `lifecycle` view, one line per static phase1.
async fn diagnose_vpn_ike_lifecycle(cli: &Cli) -> Result<ExitCode, Failure> {
    let v = ikemgr_view(cli, "lifecycle", Vec::new()).await?;
    if cli.json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    for g in v.as_array().into_iter().flatten() {
        let text = |k: &str| match &g[k] {
            Value::Null => "-".to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!(
            "name={} state={} dpd-action={} peer={} failures={} next-attempt={}s monitor={}",
            text("name"),
            text("state"),
            text("dpd_action"),
            text("peer"),
            text("failures"),
            text("next_attempt_secs"),
            text("monitor"),
        );
    }
    Ok(ExitCode::SUCCESS)
}
