//! A cluster member's daemons for the HA suites (`ha_common`, `fgsp_common`,
//! `ha_fgsp_seed001`): the four daemons started in one namespace with one configuration and
//! run-dir, their logs, control-socket views, and the strongSwan-client helpers those
//! suites share (ping through the tunnel, the client's IKE SA, replay failures).
//!
//! The suites keep their own topology and configuration; this module only starts and
//! queries processes.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bus_schema::{ctl_call, CtlReply, CtlRequest, DaemonKind};
use serde_json::Value;

use crate::daemons::{bin, wait_for};
use crate::netns::{Netns, Proc};
use crate::strongswan::{Charon, ChildCfg, Conn, IkeSa, SwanctlConf};

/// The daemons of a member in start order, with each one's `--metrics-listen` port (each
/// member has its own namespace, so the ports are the same on every member).
pub const DAEMONS: [(&str, u16); 4] = [
    ("hasyncd", 9703),
    ("espd", 9704),
    ("ikemgr", 9701),
    ("dpdmon", 9702),
];

/// Starts `daemon` in `ns` with `conf` and `run`, debug logging appended to
/// `dir/<daemon>.log`.
pub fn spawn_daemon(
    ns: &Netns,
    daemon: &str,
    port: u16,
    conf: &Path,
    run: &Path,
    dir: &Path,
) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{daemon}.log")))
        .unwrap();
    let mut cmd: Command = ns.command(bin(daemon));
    cmd.arg("--config")
        .arg(conf)
        .arg("--run-dir")
        .arg(run)
        .args(["--log-level", "debug"])
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    ns.spawn_command(cmd).expect("spawn daemon")
}

/// Starts the four [`DAEMONS`] (see [`spawn_daemon`]), in order.
pub fn spawn_all(ns: &Netns, conf: &Path, run: &Path, dir: &Path) -> Vec<Proc> {
    DAEMONS
        .iter()
        .map(|(d, port)| spawn_daemon(ns, d, *port, conf, run, dir))
        .collect()
}

/// The index in [`DAEMONS`] (and in [`spawn_all`]'s result) and metrics port of `daemon`.
pub fn daemon_index(daemon: &str) -> Option<(usize, u16)> {
    DAEMONS
        .iter()
        .enumerate()
        .find(|(_, (d, _))| *d == daemon)
        .map(|(i, (_, p))| (i, *p))
}

/// `dir/<daemon>.log`, empty when absent.
pub fn read_log(dir: &Path, daemon: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{daemon}.log"))).unwrap_or_default()
}

/// The last `lines` lines of hasyncd's, ikemgr's and espd's logs in `dir`, each under a
/// `--- <name> <daemon> ---` heading.
pub fn log_tails(dir: &Path, name: &str, lines: usize) -> String {
    ["hasyncd", "ikemgr", "espd"]
        .iter()
        .map(|d| {
            let l = read_log(dir, d);
            let tail: Vec<&str> = l.lines().rev().take(lines).collect();
            format!(
                "--- {name} {d} ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Kills every process of `procs` at once (errors ignored: some may be gone already).
pub fn kill_all(procs: &mut [Proc]) {
    for p in procs {
        let _ = p.kill_now();
    }
}

/// A control-socket view of `daemon` in `run`.
pub fn view(run: &Path, daemon: DaemonKind, name: &str) -> Result<Value, String> {
    let req = CtlRequest::View {
        name: name.into(),
        args: vec![],
    };
    match rt().block_on(ctl_call(run, daemon, &req, Duration::from_secs(2))) {
        Ok(CtlReply::View(v)) => Ok(v),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A control-socket command of ikemgr in `run`; its reply view.
pub fn ikemgr_command(run: &Path, name: &str, args: &[&str]) -> Result<Value, String> {
    command(run, DaemonKind::Ikemgr, name, args)
}

/// A control command `name` to `daemon` in `run`.
pub fn command(run: &Path, daemon: DaemonKind, name: &str, args: &[&str]) -> Result<Value, String> {
    let req = CtlRequest::Command {
        name: name.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
    };
    match rt().block_on(ctl_call(run, daemon, &req, Duration::from_secs(2))) {
        Ok(CtlReply::View(v)) => Ok(v),
        Ok(other) => Err(format!("{other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// espd's outbound SAs of `tunnel` in `run`: (spi_out, next sequence number).
pub fn esp_seqs(run: &Path, tunnel: &str) -> Vec<(u32, u64)> {
    let Ok(v) = view(run, DaemonKind::Espd, "tunnel-list") else {
        return Vec::new();
    };
    v["tunnels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["name"] == tunnel)
        .flat_map(|t| t["sas"].as_array().cloned().unwrap_or_default())
        .map(|s| (hex_u32(&s["enc"]["spi"]), s["seqno"].as_u64().unwrap_or(0)))
        .collect()
}

/// hasyncd's standby copies of `tunnel` in `run`: (IKE SA copies, CHILD SA copies).
pub fn copies(run: &Path, tunnel: &str) -> Result<(usize, usize), String> {
    let v = view(run, DaemonKind::Hasyncd, "replicas")?;
    let n = |k: &str| {
        v[k].as_array()
            .map(|a| a.iter().filter(|s| s["tunnel"] == tunnel).count())
            .unwrap_or(0)
    };
    Ok((n("ike_standby"), n("standby")))
}

/// ikemgr's IKE SA of `tunnel` in `run`: (spi_i, spi_r).
pub fn ike_spis(run: &Path, tunnel: &str) -> Option<(u64, u64)> {
    let v = view(run, DaemonKind::Ikemgr, "ike-gateways").ok()?;
    let sa = v.as_array()?.iter().find(|s| s["name"] == tunnel)?;
    Some((hex_u64(&sa["spi_i"]), hex_u64(&sa["spi_r"])))
}

/// A single-threaded tokio runtime for one blocking control-socket call.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A view's hex string as a number (0 when absent or malformed).
pub fn hex_u64(v: &Value) -> u64 {
    u64::from_str_radix(v.as_str().unwrap_or(""), 16).unwrap_or(0)
}

/// A view's hex string as a number (0 when absent or malformed).
pub fn hex_u32(v: &Value) -> u32 {
    u32::from_str_radix(v.as_str().unwrap_or(""), 16).unwrap_or(0)
}

/// Received `icmp_seq` numbers in ping's output.
pub fn received_seqs(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| {
            let i = l.find("icmp_seq=")? + "icmp_seq=".len();
            l[i..].split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// The strongSwan client's established IKE SA of connection `dial`.
pub fn client_sa(c: &Charon) -> Option<IkeSa> {
    c.list_sas()
        .ok()?
        .into_iter()
        .find(|s| s.name == "dial" && s.state == "ESTABLISHED")
}

/// ESP sequence-number (anti-replay) failures strongSwan's libipsec logged.
pub fn replay_failures(c: &Charon) -> usize {
    c.log()
        .matches("ESP sequence number verification failed")
        .count()
}

/// `count` pings in `client` from `from` to `to`, 0.2 s apart; the number answered.
pub fn ping_answered(client: &Netns, from: &str, to: &str, count: u32) -> u32 {
    let out = client
        .exec(
            "ping",
            &[
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                from,
                to,
            ],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    received_seqs(&out).len() as u32
}

/// Starts charon in `client` and brings up a PSK dial-up connection `dial` from `local` to
/// the gateway `remote` (`client_id`/`gw_id`, AES-GCM with ECP-256), CHILD SA `net` from
/// `inner`/32 to `server`/32. `Err` carries the reason and charon's log (charon is then
/// stopped).
#[allow(clippy::too_many_arguments)]
pub fn dial_client(
    client: &Netns,
    local: &str,
    remote: &str,
    psk: &str,
    (client_id, gw_id): (&str, &str),
    inner: &str,
    server: &str,
    wait: Duration,
) -> Result<Charon, String> {
    let mut charon = Charon::start(client).expect("charon");
    charon
        .load(
            &SwanctlConf::new().conn(
                Conn::psk("dial", local, remote, psk.as_bytes())
                    .ids(client_id, gw_id)
                    .proposals(&["aes128gcm16-prfsha256-ecp256"])
                    .child(
                        ChildCfg::new("net", &format!("{inner}/32"), &format!("{server}/32"))
                            .esp_proposals(&["aes128gcm16"]),
                    ),
            ),
        )
        .expect("swanctl load");
    match charon.initiate("net", wait) {
        Ok(_) => Ok(charon),
        Err(e) => Err(format!("initiate: {e}\n{}", charon.log())),
    }
}

/// A continuous ping in `client` from `from` to `to`: `count` echoes `interval` seconds
/// apart, each waited for `deadline` seconds; its standard output is piped for
/// [`finish_ping`].
pub fn start_ping(
    client: &Netns,
    (from, to): (&str, &str),
    count: u64,
    interval: &str,
    deadline: &str,
) -> Proc {
    let mut cmd = client.command("ping");
    cmd.args([
        "-n",
        "-c",
        &count.to_string(),
        "-i",
        interval,
        "-W",
        deadline,
        "-I",
        from,
        to,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    client.spawn_command(cmd).expect("ping")
}

/// Waits (up to 60 s) for a [`start_ping`] to end; (answered `icmp_seq`s sorted without
/// repeats, longest gap between two answered ones, ping's output).
pub fn finish_ping(ping: &mut Proc) -> (Vec<u64>, u64, String) {
    wait_for("ping to finish", Duration::from_secs(60), || {
        match ping.try_wait() {
            Ok(Some(_)) => Ok(()),
            _ => Err("still running".to_string()),
        }
    });
    let mut out = String::new();
    ping.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut seqs = received_seqs(&out);
    seqs.sort_unstable();
    seqs.dedup();
    let max_gap = seqs.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    (seqs, max_gap, out)
}

/// Runs iperf3 TCP from `client` to the iperf3 server at `server` (IPv4 or IPv6 literal;
/// `reverse`: the server sends) for `secs` seconds; returns the bytes the receiver got.
/// Panics with iperf3's report when it fails.
pub fn iperf3_tcp(client: &Netns, server: &str, secs: u32, reverse: bool) -> u64 {
    let t = secs.to_string();
    let mut args = vec!["-c", server, "-t", &t, "-J", "--connect-timeout", "5000"];
    if server.contains(':') {
        args.push("-6");
    }
    if reverse {
        args.push("-R");
    }
    let out = client
        .exec_timeout("iperf3", &args, Duration::from_secs(u64::from(secs) + 60))
        .expect("iperf3 client");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("iperf3 JSON: {e}\n{text}"));
    assert!(v["error"].is_null(), "iperf3 failed: {}", v["error"]);
    v["end"]["sum_received"]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no received bytes in {text}"))
}
