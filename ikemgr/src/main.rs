//! ikemgr: Haven's IKEv2 key management daemon.
//!
//! It owns the gateway's tunnel table: one tunnel per configured phase1-interface,
//! published on the bus (`tunnel.state`, `tunnel.removed`) and served as a snapshot, and it
//! follows hasyncd's per-tunnel roles and dpdmon's probes and verdicts.
//!
//! IKEv2 on the wire: [`ike::IkeManager`] (sans-IO) holds every `ike_proto::IkeSa`, builds
//! gateways from the phase1/phase2 configuration, and turns SA events into `sa.child` and
//! `tunnel.state` records (dial-up instances `<phase1>_<n>`); [`io`] owns UDP 500 and the
//! unix sockets shared with espd for UDP 4500, and runs the routes. The logic below drains
//! the manager's bodies every tick (100 ms), forwards dpdmon's probe requests, flushes
//! tunnels dpdmon declares dead, and serves the `ike-gateways` view and the
//! `ike-gateway-clear`, `tunnel-up|down|rekey <phase2> [<phase1>]` and `ike-rekey <name>`
//! commands (`vpnctl diagnose vpn ike gateway clear`, `vpnctl execute vpn ipsec …`).
//!
//! A restarted ikemgr (`kill -9`, a crash) first asks the local hasyncd for the IKE and
//! CHILD SAs its predecessor published ([`fetch_restore`], hasyncd's `ike-restore`) and
//! continues them (`IkeManager::restore_local`) before it publishes anything, so espd keeps
//! its SAs and sequence numbers and the peers notice nothing.
//!
//! Manual-key tunnels (`config vpn ipsec manualkey-interface`) need no IKE: each is
//! published as a tunnel that is up at once (kind static, DPD off) together with its one
//! CHILD SA pair (`sa.child`), keys included, built from the configuration alone. A reload
//! republishes an SA whose settings changed and removes the SAs of deleted tunnels. Key
//! bytes are never logged.

mod ike;
mod io;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_schema::schema::{ChildSaInfo, EspEncap, IkeSaRecord, SaLifetime, SeqMark};
use bus_schema::{ctl_call, CtlReply, CtlRequest};
use bus_schema::{Body, DaemonKind, DpdSettings, StateStore, TunnelInfo, TunnelKind, TunnelState};
use haven_config::{Config, ManualEncap, ManualKey, Phase1, Phase1Type, NAT_T_PORT};
use haven_daemon::{diff_keyed, DaemonLogic, Outbox};
use serde_json::json;

/// A config enum's FortiOS spelling (its serde name).
fn spelling<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn tunnel_of(config: &Config, p: &Phase1) -> TunnelInfo {
    TunnelInfo {
        name: p.name.clone(),
        phase1: p.name.clone(),
        kind: match p.kind {
            Phase1Type::Static | Phase1Type::Ddns => TunnelKind::Static,
            Phase1Type::Dynamic => TunnelKind::Dynamic,
        },
        local_gw: p.local_gw.map(|a| a.to_string()),
        remote_gw: p.remote_gw.first().map(|a| a.to_string()),
        interface: Some(p.interface.clone()).filter(|s| !s.is_empty()),
        state: TunnelState::Down,
        phase2: config
            .phase2_for(&p.name)
            .map(|p2| p2.name.clone())
            .collect(),
        dpd: DpdSettings {
            mode: spelling(&p.dpd),
            retry_count: u32::from(p.dpd_retrycount),
            retry_interval_ms: u64::from(p.dpd_retryinterval_ms),
        },
    }
}

/// Anti-replay window of a manual-key SA with `replay enable`, in packets (RFC 4303
/// §3.4.3 asks for at least 32; a wide window tolerates reordering on fast links).
const MANUAL_REPLAY_WINDOW: u32 = 2048;

/// The tunnel of a manual-key interface: static, up as soon as it is configured (there is
/// nothing to negotiate), DPD off (there is no IKE SA to probe with).
fn manual_tunnel_of(m: &ManualKey) -> TunnelInfo {
    TunnelInfo {
        name: m.name.clone(),
        phase1: m.name.clone(),
        kind: TunnelKind::Static,
        local_gw: m.local_addr().map(|a| a.to_string()),
        remote_gw: Some(m.remote_addr().to_string()),
        interface: Some(m.interface.clone()).filter(|s| !s.is_empty()),
        state: TunnelState::Up,
        phase2: vec![m.name.clone()],
        dpd: DpdSettings {
            mode: "disable".to_string(),
            retry_count: 0,
            retry_interval_ms: 0,
        },
    }
}

/// The CHILD SA pair of a manual-key interface. FortiOS manual keys serve both directions,
/// so the inbound and outbound key blocks are the same (encryption key, salt included, then
/// the integrity key). An unset `local-gw` is published as `0.0.0.0`: the address of the
/// outgoing interface, which only the datapath's routing knows. The SA never expires and
/// sends at once.
fn manual_child_sa_of(m: &ManualKey) -> ChildSaInfo {
    let keys = m.keymat();
    ChildSaInfo {
        tunnel: m.name.clone(),
        phase1: m.name.clone(),
        phase2: m.name.clone(),
        spi_in: m.local_spi,
        spi_out: m.remote_spi,
        // The FortiOS proposal spelling, which is esp-proto's transform name.
        transform: m.proposal.to_string(),
        esn: false,
        keys_in: keys.expose_bytes().to_vec(),
        keys_out: keys.expose_bytes().to_vec(),
        local: m
            .local_addr()
            .unwrap_or(match m.remote_addr() {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
            })
            .to_string(),
        remote: m.remote_addr().to_string(),
        encap: match m.encapsulation {
            ManualEncap::None => EspEncap::None,
            ManualEncap::Udp => EspEncap::Udp {
                local_port: NAT_T_PORT,
                remote_port: NAT_T_PORT,
            },
        },
        local_ts: vec![m.selectors().0],
        remote_ts: vec![m.selectors().1],
        replay_window: if m.replay { MANUAL_REPLAY_WINDOW } else { 0 },
        lifetime: SaLifetime::default(),
        initial_seq: 1,
        outbound: true,
    }
}

/// How often the IO layer is retried when UDP 500 cannot be bound.
const IO_RETRY: Duration = Duration::from_secs(2);
/// How often IKE activity marks are batched for dpdmon.
const ACTIVITY_EVERY: Duration = Duration::from_secs(1);

struct Ikemgr {
    /// The shell's run-dir; ikemgr's IKE hand-off socket lives there too.
    run_dir: PathBuf,
    tunnels: BTreeMap<String, TunnelInfo>,
    /// Published manual-key CHILD SAs by store key (`ChildSaInfo::key_of`).
    child_sas: BTreeMap<String, ChildSaInfo>,
    roles: BTreeMap<String, String>,
    ike: Arc<Mutex<ike::IkeManager>>,
    io: Option<Sender<io::Input>>,
    io_retry_at: Option<Instant>,
    io_error: Option<String>,
    activity_at: Option<Instant>,
    /// Tunnels dpdmon last reported dead (flushed once per verdict).
    dead: BTreeSet<String>,
    /// Tunnels whose tunnel monitor dpdmon last reported down.
    monitor_down: BTreeSet<String>,
    /// Dial-up instances (`vpn1_1`…) as published.
    instances: BTreeMap<String, TunnelInfo>,
    /// What the previous ikemgr published, from hasyncd's local replica, until the first
    /// configuration restores it ([`fetch_restore`]).
    restore: Option<RestoreSet>,
}

/// How long a starting ikemgr waits for hasyncd's local replica.
const RESTORE_WAIT: Duration = Duration::from_secs(2);

/// Asks the local hasyncd for the IKE and CHILD SAs the previous ikemgr of this run-dir
/// published (`ike-restore`, DESIGN.md §3.3). Runs in [`Ikemgr::new`], before this
/// process publishes anything: hasyncd's replica is then still the previous ikemgr's
/// state, and the first snapshot espd, dpdmon and hasyncd fetch from this ikemgr already
/// holds the restored SAs, so none of them sees the SAs go. No hasyncd control socket
/// (no hasyncd on this gateway, or the first start): nothing to restore.
fn fetch_restore(run_dir: &Path) -> Option<RestoreSet> {
    let ep = bus_schema::ctl_endpoint(run_dir, DaemonKind::Hasyncd);
    let sock = ep.strip_prefix("ipc://")?;
    if !Path::new(sock).exists() {
        return None;
    }
    let dir = run_dir.to_path_buf();
    // Called from within the shell's runtime: the request runs on a thread of its own.
    let reply = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let req = CtlRequest::Command {
            name: "ike-restore".into(),
            args: Vec::new(),
        };
        rt.block_on(ctl_call(&dir, DaemonKind::Hasyncd, &req, RESTORE_WAIT))
            .map_err(|e| e.to_string())
    })
    .join()
    .map_err(|_| "request thread panicked".to_string())
    .and_then(|r| r);
    match reply.map(parse_restore) {
        Ok(Ok(set)) => Some(set),
        Ok(Err(e)) | Err(e) => {
            tracing::warn!("ike: no IKE SAs from hasyncd's local replica: {e}");
            None
        }
    }
}

/// What hasyncd's `ike-restore` hands back: IKE SA records, CHILD SA records, and the
/// RFC 6311 sync marks it recorded for those IKE SAs (`ike::ha`).
type RestoreSet = (Vec<IkeSaRecord>, Vec<ChildSaInfo>, Vec<SeqMark>);

/// hasyncd's `ike-restore` reply (`marks` absent from an older hasyncd: none).
fn parse_restore(reply: CtlReply) -> Result<RestoreSet, String> {
    let CtlReply::View(v) = reply else {
        return Err(format!("unexpected reply {reply:?}"));
    };
    let ike = serde_json::from_value(v["ike"].clone()).map_err(|e| format!("IKE SAs: {e}"))?;
    let child =
        serde_json::from_value(v["child"].clone()).map_err(|e| format!("CHILD SAs: {e}"))?;
    let marks = match v.get("marks") {
        Some(m) => serde_json::from_value(m.clone()).map_err(|e| format!("marks: {e}"))?,
        None => Vec::new(),
    };
    Ok((ike, child, marks))
}

impl Ikemgr {
    fn wake(&self) {
        if let Some(tx) = &self.io {
            let _ = tx.send(io::Input::Wake);
        }
    }

    /// Starts the IO layer once a phase1 exists (manual-key-only gateways need no UDP 500).
    fn ensure_io(&mut self, now: Instant) {
        if self.io.is_some() || !io::lock(&self.ike).has_gateways() {
            return;
        }
        if self.io_retry_at.is_some_and(|t| now < t) {
            return;
        }
        let run_dir = self.run_dir.clone();
        match io::start(&run_dir, self.ike.clone()) {
            Ok(tx) => {
                tracing::info!(
                    "ike: listening on UDP 500 and {}/ike4500.sock",
                    run_dir.display()
                );
                self.io = Some(tx);
                self.io_error = None;
            }
            Err(e) => {
                let msg = e.to_string();
                if self.io_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!("ike: cannot open IKE sockets (retrying): {msg}");
                }
                self.io_error = Some(msg);
                self.io_retry_at = Some(now + IO_RETRY);
            }
        }
    }

    /// Publishes the manager's bodies, keeping the dial-up instances it announces for the
    /// `tunnels` view.
    fn drain(&mut self, out: &mut Outbox) {
        let bodies = io::lock(&self.ike).drain_bodies();
        for b in &bodies {
            match b {
                Body::Tunnel(t) if t.kind == TunnelKind::DialupInstance => {
                    self.instances.insert(t.name.clone(), t.clone());
                }
                Body::TunnelRemoved { name } => {
                    self.instances.remove(name);
                }
                _ => {}
            }
        }
        out.extend(bodies);
    }
}

impl DaemonLogic for Ikemgr {
    const KIND: DaemonKind = DaemonKind::Ikemgr;
    const FOLLOWS: &'static [DaemonKind] =
        &[DaemonKind::Hasyncd, DaemonKind::Dpdmon, DaemonKind::Espd];
    const TICK_MS: u64 = 100;

    fn new(_config: &Config, run_dir: &Path) -> Self {
        let restore = fetch_restore(run_dir);
        Ikemgr {
            run_dir: run_dir.to_path_buf(),
            tunnels: BTreeMap::new(),
            child_sas: BTreeMap::new(),
            roles: BTreeMap::new(),
            ike: Arc::new(Mutex::new(ike::IkeManager::new())),
            io: None,
            io_retry_at: None,
            io_error: None,
            activity_at: None,
            dead: BTreeSet::new(),
            monitor_down: BTreeSet::new(),
            instances: BTreeMap::new(),
            restore,
        }
    }

    /// Publishes, in this order: removals of SAs that are gone (before anything else, so
    /// that an inbound SPI moving to another tunnel is never installed twice at once), the
    /// tunnel changes, then new and changed SAs (after their tunnel exists).
    fn on_config(&mut self, config: &Config, out: &mut Outbox) {
        let desired: BTreeMap<String, TunnelInfo> = config
            .phase1
            .iter()
            .map(|p| (p.name.clone(), tunnel_of(config, p)))
            .chain(
                config
                    .manualkey
                    .iter()
                    .map(|m| (m.name.clone(), manual_tunnel_of(m))),
            )
            .collect();
        let desired_sas: BTreeMap<String, ChildSaInfo> = config
            .manualkey
            .iter()
            .map(|m| {
                let sa = manual_child_sa_of(m);
                (ChildSaInfo::key_of(&sa.tunnel, sa.spi_in), sa)
            })
            .collect();
        for sa in self
            .child_sas
            .iter()
            .filter(|(k, _)| !desired_sas.contains_key(*k))
            .map(|(_, sa)| sa)
        {
            tracing::info!(
                tunnel = sa.tunnel.as_str(),
                spi_in = %format_args!("{:08x}", sa.spi_in),
                "manual-key SA removed"
            );
            out.push(Body::ChildSaRemoved {
                tunnel: sa.tunnel.clone(),
                spi_in: sa.spi_in,
            });
        }
        diff_keyed(
            &self.tunnels,
            &desired,
            |_, t| Body::Tunnel(t),
            |name| Body::TunnelRemoved { name },
            out,
        );
        for t in desired.keys().filter(|k| !self.tunnels.contains_key(*k)) {
            tracing::info!(tunnel = t.as_str(), "tunnel configured");
        }
        self.tunnels = desired;
        for (k, sa) in &desired_sas {
            if self.child_sas.get(k) != Some(sa) {
                // Only public fields: never the key bytes.
                tracing::info!(
                    tunnel = sa.tunnel.as_str(),
                    spi_in = %format_args!("{:08x}", sa.spi_in),
                    spi_out = %format_args!("{:08x}", sa.spi_out),
                    transform = sa.transform.as_str(),
                    "manual-key SA installed"
                );
                out.push(Body::ChildSa(sa.clone()));
            }
        }
        self.child_sas = desired_sas;
        let store = load_certs(config);
        let mut ike = io::lock(&self.ike);
        ike.set_cert_store(store);
        ike.set_config(Instant::now(), config);
        if let Some((records, children, marks)) = self.restore.take() {
            let n = ike.restore_local(Instant::now(), &records, &children, &marks);
            if !records.is_empty() {
                tracing::info!(
                    "ike: restarted: {n} of {} IKE SAs continued from hasyncd's local replica",
                    records.len()
                );
            }
        }
        drop(ike);
        self.drain(out);
        self.wake();
    }

    fn on_replica(&mut self, src: DaemonKind, store: &StateStore, out: &mut Outbox) {
        if src == DaemonKind::Hasyncd {
            // FGCP secondary (or hello): standby copies only, no new IKE SAs (ike::ha); the
            // SAs held here are dropped once the role is settled (not in hello).
            let role = store.items().find_map(|b| match b {
                Body::HaMember(m) if m.mode.contains("fgcp") => Some(m.role.clone()),
                _ => None,
            });
            let standby = role.as_deref().is_some_and(|r| r != "primary");
            let settled = role.as_deref() != Some("hello");
            io::lock(&self.ike).set_ha_standby(Instant::now(), standby, settled);
            self.drain(out);
            let roles: BTreeMap<String, String> = store
                .items()
                .filter_map(|b| match b {
                    Body::TunnelRole { tunnel, role } => Some((tunnel.clone(), role.clone())),
                    _ => None,
                })
                .collect();
            // FGSP: a tunnel another member took over is dropped here, silently.
            let released: Vec<&String> = roles
                .iter()
                .filter(|(t, r)| {
                    *r == "standby" && self.roles.get(*t).is_some_and(|o| o != "standby")
                })
                .map(|(t, _)| t)
                .collect();
            if !released.is_empty() {
                let mut m = io::lock(&self.ike);
                for t in released {
                    if m.ha_release(Instant::now(), t) {
                        tracing::info!(
                            "ike 0:{t}: HA: another member carries the tunnel now; dropped here"
                        );
                    }
                }
                drop(m);
                self.drain(out);
                self.wake();
            }
            io::lock(&self.ike).set_ha_reserved(
                roles
                    .iter()
                    .filter(|(_, r)| *r == "standby")
                    .map(|(t, _)| t.clone())
                    .collect(),
            );
            self.roles = roles;
        }
        if src == DaemonKind::Dpdmon {
            let dead: BTreeSet<String> = store
                .items()
                .filter_map(|b| match b {
                    Body::Dpd(d) if d.state == "dead" => Some(d.tunnel.clone()),
                    _ => None,
                })
                .collect();
            let fresh: Vec<String> = dead.difference(&self.dead).cloned().collect();
            self.dead = dead;
            if !fresh.is_empty() {
                let mut m = io::lock(&self.ike);
                for t in &fresh {
                    tracing::debug!("ike 0:{t}: DPD declared the peer dead, flushing the tunnel");
                    m.dead_peer(Instant::now(), t);
                }
                drop(m);
                self.drain(out);
                self.wake();
            }
            // Tunnel monitors: a new `down` withdraws the routes (or fails over); a monitor
            // no longer down (answering again, or stopped) gives them back.
            let down: BTreeSet<String> = store
                .table(bus_schema::table::DPD_MONITOR)
                .filter_map(|b| match b {
                    Body::TunnelMonitor(m) if m.state == "down" => Some(m.tunnel.clone()),
                    _ => None,
                })
                .collect();
            if down != self.monitor_down {
                let now = Instant::now();
                let mut m = io::lock(&self.ike);
                for t in down.difference(&self.monitor_down) {
                    m.monitor_down(now, t);
                }
                for t in self.monitor_down.difference(&down) {
                    m.monitor_up(t);
                }
                drop(m);
                self.monitor_down = down;
                self.drain(out);
                self.wake();
            }
        }
    }

    fn on_event(&mut self, src: DaemonKind, body: &Body, out: &mut Outbox) {
        if let (DaemonKind::Hasyncd, Body::Takeover(t)) = (src, body) {
            if let Err(e) = io::lock(&self.ike).takeover(Instant::now(), t) {
                tracing::error!("ike 0:{}: HA takeover failed: {e}", t.ike.tunnel);
            }
            self.drain(out);
            self.wake();
            return;
        }
        if let (DaemonKind::Hasyncd, Body::SeqLeaseGranted { sas }) = (src, body) {
            // Marks of reserved RFC 6311 syncs among them (ike::ha); espd's leases ignored.
            if sas
                .iter()
                .any(|m| bus_schema::schema::is_ike_mid_mark(m.spi_out))
            {
                io::lock(&self.ike).mid_marks_granted(Instant::now(), sas);
                self.drain(out);
                self.wake();
            }
            return;
        }
        if let (DaemonKind::Dpdmon, Body::ProbeRequest { tunnel, round, .. }) = (src, body) {
            io::lock(&self.ike).probe(Instant::now(), tunnel, *round);
            self.drain(out);
            self.wake();
        }
        if let (DaemonKind::Espd, Body::EspExpire(x)) = (src, body) {
            io::lock(&self.ike).esp_expired(
                Instant::now(),
                &x.tunnel,
                x.spi_in,
                x.hard,
                &x.reason,
                x.packets,
            );
            self.drain(out);
            self.wake();
        }
        if let (DaemonKind::Espd, Body::Acquire(a)) = (src, body) {
            io::lock(&self.ike).acquire(Instant::now(), a);
            self.drain(out);
            self.wake();
        }
    }

    fn tick(&mut self, now_ns: u64, out: &mut Outbox) {
        let now = Instant::now();
        self.ensure_io(now);
        self.drain(out);
        let unknown = io::lock(&self.ike).take_unknown_requests();
        if !unknown.is_empty() {
            out.push(Body::UnknownSaTraffic(
                bus_schema::schema::UnknownSaTraffic {
                    esp_spis: Vec::new(),
                    ike_spis: unknown
                        .into_iter()
                        .map(|(spi_i, spi_r)| bus_schema::schema::IkeSpis { spi_i, spi_r })
                        .collect(),
                },
            ));
        }
        if self.activity_at.is_none_or(|t| now >= t) {
            self.activity_at = Some(now + ACTIVITY_EVERY);
            export_drop_metrics(&io::lock(&self.ike));
            let marks = io::lock(&self.ike).activity(now, now_ns);
            if !marks.is_empty() {
                out.push(Body::IkeActivity { tunnels: marks });
            }
            self.export_metrics(now);
        }
    }

    fn command(
        &mut self,
        name: &str,
        args: &[String],
        out: &mut Outbox,
    ) -> Result<serde_json::Value, String> {
        match name {
            "ike-gateway-clear" => {
                let n = io::lock(&self.ike).clear(Instant::now(), name_arg(args));
                self.drain(out);
                self.wake();
                Ok(json!({ "cleared": n }))
            }
            "tunnel-up" | "tunnel-down" | "tunnel-rekey" => {
                let (phase2, phase1) = match args {
                    [p2] => (p2.as_str(), None),
                    [p2, p1] => (p2.as_str(), Some(p1.as_str())),
                    _ => return Err(format!("usage: {name} <phase2> [<phase1>]")),
                };
                let now = Instant::now();
                let done = {
                    let mut m = io::lock(&self.ike);
                    match name {
                        "tunnel-up" => m.tunnel_up(now, phase2, phase1),
                        "tunnel-down" => m.tunnel_down(now, phase2, phase1),
                        _ => m.tunnel_rekey(now, phase2, phase1),
                    }
                }?;
                self.drain(out);
                self.wake();
                Ok(json!(done))
            }
            "ike-rekey" => match args {
                // ike-rekey <tunnel> child|ike: one rekey of a tunnel's CHILD or IKE SA.
                [t, w] if w == "child" || w == "ike" => {
                    let r = io::lock(&self.ike).rekey_now(Instant::now(), t, w == "ike");
                    self.drain(out);
                    self.wake();
                    r.map(|what| json!({ "started": what }))
                }
                // ike-rekey <tunnel or phase1>: rekey the IKE SAs it names.
                [target] => {
                    let done = io::lock(&self.ike).ike_rekey(Instant::now(), target);
                    self.drain(out);
                    self.wake();
                    Ok(json!(done))
                }
                _ => {
                    Err("usage: ike-rekey <tunnel or phase1> | ike-rekey <tunnel> child|ike".into())
                }
            },
            other => Err(format!(
                "unknown command {other:?}: ikemgr has: ike-gateway-clear, tunnel-up, \
                 tunnel-down, tunnel-rekey, ike-rekey"
            )),
        }
    }

    fn view(&self, name: &str, args: &[String]) -> Result<serde_json::Value, String> {
        match name {
            "tunnels" => Ok(json!(self
                .tunnels
                .values()
                .chain(self.instances.values())
                .map(|t| json!({"tunnel": t, "role": self.roles.get(&t.name)}))
                .collect::<Vec<_>>())),
            // Everything but the keys.
            "manualkey" => Ok(json!(self
                .child_sas
                .values()
                .map(|sa| json!({
                    "tunnel": sa.tunnel,
                    "spi_in": format!("{:08x}", sa.spi_in),
                    "spi_out": format!("{:08x}", sa.spi_out),
                    "transform": sa.transform,
                    "local": sa.local,
                    "remote": sa.remote,
                    "encap": sa.encap,
                    "local_ts": sa.local_ts,
                    "remote_ts": sa.remote_ts,
                    "replay_window": sa.replay_window,
                }))
                .collect::<Vec<_>>())),
            "ike-gateways" => Ok(io::lock(&self.ike).gateway_list(Instant::now(), name_arg(args))),
            // IKE SA keys, for `vpnctl diagnose vpn ike export-keys` (Wireshark) only.
            "ike-keys" => Ok(io::lock(&self.ike).ike_keys(Instant::now())),
            // Static tunnels' lifecycle: up / negotiating / held / standby, backoff, peer.
            "lifecycle" => Ok(io::lock(&self.ike).lifecycle_view(Instant::now())),
            other => Err(format!(
                "unknown view {other:?}: ikemgr has: tunnels, manualkey, ike-gateways, ike-keys, lifecycle"
            )),
        }
    }
}

/// Drop counters and half-open state for Prometheus (ops/ATTACKS.md).
fn export_drop_metrics(ike: &ike::IkeManager) {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    DESCRIBED.call_once(|| {
        metrics::describe_counter!(
            "ikemgr_drops_total",
            "IKE datagrams dropped, by reason (see ops/ATTACKS.md)."
        );
        metrics::describe_gauge!(
            "ikemgr_half_open_sas",
            "IKE SAs that answered IKE_SA_INIT and wait for IKE_AUTH."
        );
        metrics::describe_counter!(
            "ikemgr_cookies_sent_total",
            "COOKIE notifies sent while half-open IKE SAs were over the limit (RFC 7296 2.6)."
        );
        metrics::describe_counter!(
            "ikemgr_cookies_invalid_total",
            "IKE_SA_INIT requests refused for a missing or wrong COOKIE."
        );
        metrics::describe_counter!(
            "ikemgr_send_errors_total",
            "IKE datagrams that could not be sent, by reason: unreachable (no route to the peer), refused (a firewall), other."
        );
        metrics::describe_counter!(
            "ikemgr_acquires_total",
            "espd's esp.acquire (traffic without an SA) handled, by outcome: child, initiate, or why nothing was done."
        );
    });
    for (outcome, n) in ike.acquire_counts() {
        metrics::counter!("ikemgr_acquires_total", "outcome" => *outcome).absolute(*n);
    }
    for (reason, n) in ike.send_errors() {
        metrics::counter!("ikemgr_send_errors_total", "reason" => *reason).absolute(*n);
    }
    for (reason, n) in ike.drops() {
        metrics::counter!("ikemgr_drops_total", "reason" => *reason).absolute(*n);
    }
    let (half_open, cookies, bad_cookies) = ike.cookie_stats();
    metrics::gauge!("ikemgr_half_open_sas").set(half_open as f64);
    metrics::counter!("ikemgr_cookies_sent_total").absolute(cookies);
    metrics::counter!("ikemgr_cookies_invalid_total").absolute(bad_cookies);
}

/// Where certificates live: `$HAVEN_CERT_DIR`, else this.
const CERT_DIR: &str = "/etc/haven/certs";

/// Reads the certificate files of every `authmethod signature` phase1: for `set certificate
/// "N"`, `<dir>/N.crt` (PEM, our certificate then any intermediates) and `<dir>/N.key` (PEM
/// private key); every `<dir>/ca/*.crt` is a trusted CA (FortiOS' CA store). A file that
/// cannot be read is logged; that phase1 then does not negotiate.
fn load_certs(config: &Config) -> ike::CertStore {
    let mut store = ike::CertStore {
        anchor: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok())
            .map(|secs| (Instant::now(), secs)),
        ..Default::default()
    };
    let names: BTreeSet<&String> = config
        .phase1
        .iter()
        .filter(|p| p.authmethod == haven_config::AuthMethod::Signature)
        .flat_map(|p| p.certificate.first())
        .collect();
    if names.is_empty() {
        return store;
    }
    let dir = std::env::var_os("HAVEN_CERT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(CERT_DIR));
    for name in names {
        let (crt, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        match (std::fs::read(&crt), std::fs::read(&key)) {
            (Ok(c), Ok(k)) => {
                store.local.insert(name.clone(), (c, k));
            }
            (c, k) => tracing::error!(
                "ike: certificate {name:?}: cannot read {} / {}: {:?} {:?}",
                crt.display(),
                key.display(),
                c.err(),
                k.err()
            ),
        }
    }
    let ca_dir = dir.join("ca");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&ca_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "crt"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    for f in files {
        match std::fs::read(&f) {
            Ok(pem) => {
                store.ca_pem.extend(pem);
                store.ca_pem.push(b'\n');
            }
            Err(e) => tracing::error!("ike: CA certificate {}: {e}", f.display()),
        }
    }
    if store.ca_pem.is_empty() {
        tracing::error!("ike: no trusted CA certificate in {}", ca_dir.display());
    }
    store
}

/// `name N` (or a bare `N`) from a view's or command's arguments.
fn name_arg(args: &[String]) -> Option<&str> {
    match args {
        [k, v, ..] if k == "name" => Some(v.as_str()),
        [v] => Some(v.as_str()),
        _ => None,
    }
}

impl Ikemgr {
    /// Once a second: tunnels by state (dial-up templates left out: only their instances
    /// carry traffic), IKE SAs by state and installed CHILD SA pairs (manual-key included).
    fn export_metrics(&self, now: Instant) {
        static DESCRIBED: std::sync::Once = std::sync::Once::new();
        DESCRIBED.call_once(|| {
            metrics::describe_gauge!(
                "ikemgr_tunnels",
                "Tunnels (static, manual-key, dial-up instances) by state: up, connecting, down."
            );
            metrics::describe_gauge!(
                "ikemgr_ike_sas",
                "IKE SAs by state: established, connecting."
            );
            metrics::describe_gauge!(
                "ikemgr_child_sas",
                "CHILD SA pairs negotiated or configured."
            );
        });
        let mut by_state = [0u64; 3];
        for t in self.tunnels.values().chain(self.instances.values()) {
            if t.kind == TunnelKind::Dynamic {
                continue;
            }
            by_state[match t.state {
                TunnelState::Up => 0,
                TunnelState::Connecting => 1,
                TunnelState::Down => 2,
            }] += 1;
        }
        for (state, n) in ["up", "connecting", "down"].into_iter().zip(by_state) {
            metrics::gauge!("ikemgr_tunnels", "state" => state).set(n as f64);
        }
        let _ = now;
        let (established, connecting, ike_children) = io::lock(&self.ike).sa_counts();
        let children = ike_children + self.child_sas.len() as u64;
        metrics::gauge!("ikemgr_ike_sas", "state" => "established").set(established as f64);
        metrics::gauge!("ikemgr_ike_sas", "state" => "connecting").set(connecting as f64);
        metrics::gauge!("ikemgr_child_sas").set(children as f64);
    }
}

fn main() -> ExitCode {
    haven_daemon::run::<Ikemgr>()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = r#"
config vpn ipsec phase1-interface
    edit "vpn1"
        set ike-version 2
        set type dynamic
        set interface "port2"
        set dpd on-idle
        set dpd-retryinterval 60
        set psksecret "x"
    next
    edit "hub"
        set ike-version 2
        set type static
        set remote-gw 192.0.2.1
        set interface "port1"
        set psksecret "y"
    next
end
config vpn ipsec phase2-interface
    edit "vpn1"
        set phase1name "vpn1"
    next
end
"#;

    #[test]
    fn publishes_one_tunnel_per_phase1_and_removes_deleted_ones() {
        let cfg = haven_config::parse(CONF).unwrap().config;
        let mut ike = Ikemgr::new(&cfg, Path::new("/nonexistent"));
        let mut out = Vec::new();
        ike.on_config(&cfg, &mut out);
        assert_eq!(out.len(), 2);
        let vpn1 = &ike.tunnels["vpn1"];
        assert_eq!(vpn1.kind, TunnelKind::Dynamic);
        assert_eq!(vpn1.phase2, vec!["vpn1".to_string()]);
        assert_eq!(vpn1.dpd.mode, "on-idle");
        assert_eq!(vpn1.dpd.retry_interval_ms, 60_000);
        assert_eq!(ike.tunnels["hub"].remote_gw.as_deref(), Some("192.0.2.1"));

        // Same config again: nothing to publish.
        let mut out = Vec::new();
        ike.on_config(&cfg, &mut out);
        assert!(out.is_empty());

        // Drop "hub": exactly one removal.
        let cfg2 = haven_config::parse(&CONF.replace("edit \"hub\"", "edit \"hub2\""))
            .unwrap()
            .config;
        let mut out = Vec::new();
        ike.on_config(&cfg2, &mut out);
        assert!(out
            .iter()
            .any(|b| matches!(b, Body::TunnelRemoved { name } if name == "hub")));
        assert!(out
            .iter()
            .any(|b| matches!(b, Body::Tunnel(t) if t.name == "hub2")));
    }

    /// Gateway A of a mirrored pair: one AES-GCM tunnel in UDP, one AES-CBC+SHA1 tunnel in
    /// raw ESP without replay checking, and an IKE tunnel beside them.
    const MK: &str = r#"
config vpn ipsec phase1-interface
    edit "hub"
        set ike-version 2
        set remote-gw 192.0.2.1
        set interface "port1"
        set psksecret "y"
    next
end
config vpn ipsec phase2-interface
    edit "hub"
        set phase1name "hub"
    next
end
config vpn ipsec manualkey-interface
    edit "mk-gcm"
        set interface "port1"
        set local-gw 198.51.100.1
        set remote-gw 203.0.113.2
        set enc-alg aes128gcm
        set enc-key 0102030405060708-090a0b0c0d0e0f10-11121314
        set local-spi 0x1001
        set remote-spi 0x2001
        set encapsulation udp
        set src-subnet 10.1.0.0 255.255.255.0
        set dst-subnet 10.2.0.0/24
    next
    edit "mk-cbc"
        set interface "port1"
        set remote-gw 203.0.113.2
        set auth-alg sha1
        set enc-alg aes128
        set auth-key 2122232425262728-292a2b2c2d2e2f30-31323334
        set enc-key 4142434445464748-494a4b4c4d4e4f50
        set local-spi 1002
        set remote-spi 2002
        set replay disable
    next
end
"#;

    /// The transform names esp-proto's `Transform::from_name` accepts (espd/esp-proto,
    /// transform.rs), with the key block length each needs: encryption key and salt, then
    /// the integrity key.
    const ESP_PROTO_TRANSFORMS: [(&str, usize); 9] = [
        ("aes128gcm", 20),
        ("aes256gcm", 36),
        ("chacha20poly1305", 36),
        ("aes128-sha1", 16 + 20),
        ("aes128-sha256", 16 + 32),
        ("aes128-sha512", 16 + 64),
        ("aes256-sha1", 32 + 20),
        ("aes256-sha256", 32 + 32),
        ("aes256-sha512", 32 + 64),
    ];

    fn parse(text: &str) -> Config {
        match haven_config::parse(text) {
            Ok(p) => p.config,
            Err(e) => panic!("{e}"),
        }
    }

    fn child_sas(out: &[Body]) -> Vec<&ChildSaInfo> {
        out.iter()
            .filter_map(|b| match b {
                Body::ChildSa(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    fn removed_sas(out: &[Body]) -> Vec<(&str, u32)> {
        out.iter()
            .filter_map(|b| match b {
                Body::ChildSaRemoved { tunnel, spi_in } => Some((tunnel.as_str(), *spi_in)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn manual_key_tunnels_publish_an_up_tunnel_and_one_child_sa_each() {
        let cfg = parse(MK);
        let mut ike = Ikemgr::new(&cfg, Path::new("/nonexistent"));
        let mut out = Vec::new();
        ike.on_config(&cfg, &mut out);
        // hub, mk-cbc, mk-gcm tunnels; two SAs.
        assert_eq!(out.len(), 5, "{out:?}");
        let t = &ike.tunnels["mk-gcm"];
        assert_eq!(t.kind, TunnelKind::Static);
        assert_eq!(t.state, TunnelState::Up);
        assert_eq!(t.phase1, "mk-gcm");
        assert_eq!(t.local_gw.as_deref(), Some("198.51.100.1"));
        assert_eq!(t.remote_gw.as_deref(), Some("203.0.113.2"));
        assert_eq!(t.interface.as_deref(), Some("port1"));
        assert_eq!(t.dpd.mode, "disable");
        assert_eq!(ike.tunnels["hub"].state, TunnelState::Down);
        assert_eq!(ike.tunnels["mk-cbc"].local_gw, None);

        // Each SA follows its tunnel on the bus.
        let pos = |pred: &dyn Fn(&Body) -> bool| out.iter().position(pred).unwrap();
        for name in ["mk-gcm", "mk-cbc"] {
            let t = pos(&|b| matches!(b, Body::Tunnel(t) if t.name == name));
            let c = pos(&|b| matches!(b, Body::ChildSa(c) if c.tunnel == name));
            assert!(t < c, "{name}: {out:?}");
        }

        let sas = child_sas(&out);
        assert_eq!(sas.len(), 2);
        let gcm = sas.iter().find(|c| c.tunnel == "mk-gcm").unwrap();
        assert_eq!(
            (gcm.phase1.as_str(), gcm.phase2.as_str()),
            ("mk-gcm", "mk-gcm")
        );
        assert_eq!((gcm.spi_in, gcm.spi_out), (0x1001, 0x2001));
        assert_eq!(gcm.transform, "aes128gcm");
        assert!(!gcm.esn);
        let gcm_key: Vec<u8> = (1u8..=16).chain(0x11..=0x14).collect();
        assert_eq!(gcm.keys_in, gcm_key);
        assert_eq!(gcm.keys_out, gcm_key);
        assert_eq!(
            (gcm.local.as_str(), gcm.remote.as_str()),
            ("198.51.100.1", "203.0.113.2")
        );
        assert_eq!(
            gcm.encap,
            EspEncap::Udp {
                local_port: 4500,
                remote_port: 4500
            }
        );
        assert_eq!(gcm.local_ts, ["10.1.0.0/24"]);
        assert_eq!(gcm.remote_ts, ["10.2.0.0/24"]);
        assert_eq!(gcm.replay_window, 2048);
        assert_eq!(gcm.lifetime, SaLifetime::default());
        assert_eq!(gcm.initial_seq, 1);
        assert!(gcm.outbound);

        let cbc = sas.iter().find(|c| c.tunnel == "mk-cbc").unwrap();
        assert_eq!((cbc.spi_in, cbc.spi_out), (0x1002, 0x2002));
        assert_eq!(cbc.transform, "aes128-sha1");
        let enc: Vec<u8> = (0x41u8..=0x50).collect();
        let auth: Vec<u8> = (0x21u8..=0x34).collect();
        assert_eq!(cbc.keys_in, [enc.clone(), auth.clone()].concat());
        assert_eq!(cbc.keys_out, cbc.keys_in);
        assert_eq!(cbc.local, "0.0.0.0");
        assert_eq!(cbc.encap, EspEncap::None);
        assert_eq!(cbc.local_ts, ["0.0.0.0/0"]);
        assert_eq!(cbc.remote_ts, ["0.0.0.0/0"]);
        assert_eq!(cbc.replay_window, 0);

        // Debug output (what a log line would show) carries no key bytes.
        let dbg = format!("{out:?}");
        assert!(dbg.contains("<redacted>"));
        assert!(!dbg.contains("[65, 66, 67"), "{dbg}");
        assert!(!dbg.contains("[1, 2, 3"), "{dbg}");
        // Nor does the view.
        let view = ike.view("manualkey", &[]).unwrap().to_string();
        assert!(view.contains("\"spi_in\":\"00001001\""), "{view}");
        assert!(!view.contains("keys"), "{view}");
    }

    #[test]
    fn every_implemented_algorithm_maps_to_an_esp_proto_transform() {
        let algs = [
            ("aes128", 16, "sha1", 20),
            ("aes128", 16, "sha256", 32),
            ("aes128", 16, "sha512", 64),
            ("aes256", 32, "sha1", 20),
            ("aes256", 32, "sha256", 32),
            ("aes256", 32, "sha512", 64),
            ("aes128gcm", 20, "null", 0),
            ("aes256gcm", 36, "null", 0),
            ("chacha20poly1305", 36, "null", 0),
        ];
        let mut seen = Vec::new();
        for (enc, enc_len, auth, auth_len) in algs {
            let mut text = format!(
                "config vpn ipsec manualkey-interface\n edit \"m\"\n set interface \"p\"\n \
                 set remote-gw 192.0.2.9\n set local-spi 100\n set remote-spi 100\n \
                 set enc-alg {enc}\n set enc-key {}\n set auth-alg {auth}\n",
                "cd".repeat(enc_len)
            );
            if auth_len > 0 {
                text.push_str(&format!(" set auth-key {}\n", "ef".repeat(auth_len)));
            }
            text.push_str(" next\nend\n");
            let cfg = parse(&text);
            let mut ike = Ikemgr::new(&cfg, Path::new("/nonexistent"));
            let mut out = Vec::new();
            ike.on_config(&cfg, &mut out);
            let sa = child_sas(&out)[0].clone();
            let want = ESP_PROTO_TRANSFORMS
                .iter()
                .find(|(n, _)| *n == sa.transform)
                .unwrap_or_else(|| panic!("{} is not an esp-proto name", sa.transform));
            assert_eq!(sa.keys_in.len(), want.1, "{}", sa.transform);
            // Encryption key first, then the integrity key (RFC 7296 §2.17 order).
            assert!(sa.keys_in[..enc_len].iter().all(|b| *b == 0xcd));
            assert!(sa.keys_in[enc_len..].iter().all(|b| *b == 0xef));
            assert_eq!(sa.keys_out, sa.keys_in);
            seen.push(sa.transform);
        }
        seen.sort();
        let mut all: Vec<String> = ESP_PROTO_TRANSFORMS
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        all.sort();
        assert_eq!(seen, all);
    }

    #[test]
    fn reload_republishes_changed_sas_and_removes_deleted_ones() {
        let cfg = parse(MK);
        let mut ike = Ikemgr::new(&cfg, Path::new("/nonexistent"));
        let mut out = Vec::new();
        ike.on_config(&cfg, &mut out);

        // Same config: nothing.
        let mut out = Vec::new();
        ike.on_config(&cfg, &mut out);
        assert!(out.is_empty(), "{out:?}");

        // New keys for one tunnel: one SA put under the same key, nothing else.
        let rekeyed = MK.replace(
            "4142434445464748-494a4b4c4d4e4f50",
            "5152535455565758-595a5b5c5d5e5f60",
        );
        let mut out = Vec::new();
        ike.on_config(&parse(&rekeyed), &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        let sa = child_sas(&out)[0];
        assert_eq!((sa.tunnel.as_str(), sa.spi_in), ("mk-cbc", 0x1002));
        assert_eq!(sa.keys_in[0], 0x51);

        // replay disabled -> enabled: the SA changes too.
        let mut out = Vec::new();
        let replay_on = rekeyed.replace("        set replay disable\n", "");
        ike.on_config(&parse(&replay_on), &mut out);
        assert_eq!(child_sas(&out).len(), 1);
        assert_eq!(child_sas(&out)[0].replay_window, 2048);

        // A new inbound SPI: the old SA is removed first, then the new one installed.
        let respi = replay_on.replace("set local-spi 1002", "set local-spi 1003");
        let mut out = Vec::new();
        ike.on_config(&parse(&respi), &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            matches!(&out[0], Body::ChildSaRemoved { tunnel, spi_in } if tunnel == "mk-cbc" && *spi_in == 0x1002)
        );
        assert!(matches!(&out[1], Body::ChildSa(c) if c.tunnel == "mk-cbc" && c.spi_in == 0x1003));

        // The tunnel goes: its SA removal comes before the tunnel's.
        let start = respi.find("    edit \"mk-cbc\"").unwrap();
        let end = start + respi[start..].find("    next\n").unwrap() + "    next\n".len();
        let gone = format!("{}{}", &respi[..start], &respi[end..]);
        let mut out = Vec::new();
        ike.on_config(&parse(&gone), &mut out);
        assert_eq!(removed_sas(&out), [("mk-cbc", 0x1003)]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[1], Body::TunnelRemoved { name } if name == "mk-cbc"));
        assert!(!ike.child_sas.values().any(|c| c.tunnel == "mk-cbc"));
        assert_eq!(ike.child_sas.len(), 1);
    }
}
