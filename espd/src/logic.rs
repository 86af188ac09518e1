//! espd's control side, run by the daemon shell's actor: follows ikemgr's `sa.child` table,
//! installs and removes SAs in the [`Datapath`], polls lifetimes, and publishes tunnel
//! records, activity batches, sequence marks and lifetime events. Never sees a packet.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bus_schema::schema::{ChildSaInfo, EspEncap, SaExpiry, SaUsage, SeqMark, TunnelActivity};
use bus_schema::{table, Body, DaemonKind, EspTunnelInfo, StateStore};
use esp_proto::{Lifetime, LifetimeEvent, LimitKind};
use haven_config::Config;
use haven_daemon::{diff_keyed, DaemonLogic, Outbox};
use serde_json::{json, Value};

use crate::datapath::lifestore::{monotonic_ns, LifeRecord, LifeStore};
use crate::datapath::table::{Peer, Sa, DROP_LABELS, NUM_DROPS};
use crate::datapath::{Datapath, Resume};

/// Ticks between two rounds of retries, tunnel records and metrics (once a second at the
/// 200 ms tick); lifetimes are checked every tick.
const SLOW_EVERY: u64 = 5;

/// How long an SA that ikemgr removed while its tunnel has a successor (a rekey) keeps
/// taking inbound packets: the peer may still send on it until it processes the DELETE.
/// It sends nothing meanwhile. Hard-expired and flushed SAs go at once.
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// Lifetime state of one installed SA, per direction, and what of it is persisted.
struct SaLife {
    inbound: Lifetime,
    outbound: Lifetime,
    /// The SA's persisted record as last written (`None`: nothing written yet).
    written: Option<LifeRecord>,
    /// CLOCK_MONOTONIC ns when the SA was first installed.
    installed_ns: u64,
}

pub struct Espd {
    run_dir: PathBuf,
    /// Ticks since start: activity goes out every tick, records and metrics every
    /// [`SLOW_EVERY`] ticks.
    ticks: u64,
    workers: usize,
    dp: Option<Datapath>,
    dp_error: Option<String>,
    /// The last `sa.child` table seen from ikemgr, by store key.
    desired: BTreeMap<String, ChildSaInfo>,
    /// Tunnel instances ikemgr publishes (`tunnel.state`) -> phase1.
    tunnel_records: BTreeMap<String, String>,
    /// How many of `tunnel_records` each phase1 has (its device stays while it has one).
    phase1_tunnels: BTreeMap<String, usize>,
    /// The copy of ikemgr's store read last: `desired` and `tunnel_records` follow what
    /// differs from it, and an update that changes neither table (an IKE SA's message IDs
    /// after a DPD exchange) reconciles nothing.
    ikemgr_store: StateStore,
    /// What is in the datapath, as it was installed.
    installed: BTreeMap<String, ChildSaInfo>,
    /// Install failures, by key (retried when ikemgr republishes, or every tick).
    failed: BTreeMap<String, String>,
    /// Hard-expired or flushed: not re-installed until ikemgr drops or replaces them.
    dead: BTreeSet<String>,
    /// Removed by ikemgr after a rekey, still accepting inbound until the given time.
    lingering: BTreeMap<String, Instant>,
    /// [`LINGER`] (longer in tests that must not see an SA's lingering end).
    linger: std::time::Duration,
    lives: BTreeMap<String, SaLife>,
    /// Persisted ages and counts of the SAs (`None` if the run-dir refused it: then an
    /// espd restart counts lifetimes from zero, which is logged).
    life_store: Option<LifeStore>,
    /// The last write of the lifetime records failed (logged once until one succeeds).
    life_failing: bool,
    tunnels: BTreeMap<String, EspTunnelInfo>,
    activity_seen: BTreeMap<String, (u64, u64)>,
    seq_published: BTreeMap<String, u64>,
    /// Inner bytes last published per SA in `esp.seq`'s `usage` (cluster members only).
    usage_published: BTreeMap<String, u64>,
    /// HA sequence leases through hasyncd.
    ha: crate::ha::HaLeases,
    /// Paces `esp.acquire` (outbound traffic without an SA).
    acquire: crate::acquire::AcquirePacer,
    /// `esp.acquire` events published (`espd_acquires_total`).
    acquires: u64,
    /// Static phase1s that wait for traffic (`auto-negotiate disable`, no `passive-mode`):
    /// their TUN device exists before the first SA, for ikemgr's routes.
    waiting_for_traffic: BTreeSet<String>,
    /// The phase1s with `ip-version 6` (their TUN MTU leaves room for an IPv6 header).
    ipv6_phase1s: BTreeSet<String>,
}

fn limit_name(k: LimitKind) -> &'static str {
    match k {
        LimitKind::Bytes => "bytes",
        LimitKind::Packets => "packets",
        LimitKind::Time => "time",
        LimitKind::SeqSpace => "seq_space",
    }
}

fn lifetime_config(info: &ChildSaInfo) -> esp_proto::LifetimeConfig {
    let l = info.lifetime;
    let opt = |v: u64| (v > 0).then_some(v);
    esp_proto::LifetimeConfig {
        soft_bytes: opt(l.soft_bytes),
        hard_bytes: opt(l.hard_bytes),
        soft_packets: None,
        hard_packets: None,
        soft_time: opt(l.soft_secs).map(std::time::Duration::from_secs),
        hard_time: opt(l.hard_secs).map(std::time::Duration::from_secs),
    }
}

/// Sets `life`'s record with counts `rx`/`tx` (written by the next
/// [`Espd::flush_life`]).
fn write_life(
    store: Option<&mut LifeStore>,
    tunnel: &str,
    spi_in: u32,
    life: &mut SaLife,
    rx: esp_proto::Counters,
    tx: esp_proto::Counters,
) {
    let Some(store) = store else { return };
    let rec = LifeRecord {
        boot: store.boot().to_string(),
        installed_ns: life.installed_ns,
        hard_secs: life.inbound.config().hard_time.map_or(0, |t| t.as_secs()),
        rx,
        tx,
        soft_in: life.inbound.soft_reported(),
        soft_out: life.outbound.soft_reported(),
    };
    store.store(tunnel, spi_in, &rec);
    life.written = Some(rec);
}

/// A tunnel's record before its SAs are counted in.
fn tunnel_entry(tunnel: &str, phase1: &str) -> EspTunnelInfo {
    EspTunnelInfo {
        tunnel: tunnel.to_string(),
        device: phase1.to_string(),
        sa_in: 0,
        sa_out: 0,
        rx_pkts: 0,
        tx_pkts: 0,
        rx_bytes: 0,
        tx_bytes: 0,
    }
}

/// Counts `sa` into its tunnel's record.
fn add_sa(e: &mut EspTunnelInfo, sa: &Sa) {
    e.sa_in += 1;
    if sa.outbound.load(Ordering::Relaxed) {
        e.sa_out += 1;
    }
    let (rx, tx) = (sa.rx.get(), sa.tx.get());
    e.rx_pkts += rx.packets;
    e.rx_bytes += rx.bytes;
    e.tx_pkts += tx.packets;
    e.tx_bytes += tx.bytes;
}

/// What a reconcile looks at (see [`Espd::reconcile`]).
enum Scope {
    All,
    /// These SA keys and tunnels, and the SAs that wait.
    Pending {
        keys: BTreeSet<String>,
        tunnels: BTreeSet<String>,
    },
}

impl Scope {
    fn waiting() -> Scope {
        Scope::Pending {
            keys: BTreeSet::new(),
            tunnels: BTreeSet::new(),
        }
    }
}

impl Espd {
    /// A logic for `run_dir` with `workers` packet threads (the datapath starts with the
    /// configuration, or failing that with the first SA).
    pub fn with(run_dir: PathBuf, workers: usize) -> Espd {
        let run_dir_for_life = run_dir.clone();
        Espd {
            run_dir,
            workers,
            dp: None,
            dp_error: None,
            desired: BTreeMap::new(),
            tunnel_records: BTreeMap::new(),
            phase1_tunnels: BTreeMap::new(),
            ikemgr_store: StateStore::default(),
            installed: BTreeMap::new(),
            failed: BTreeMap::new(),
            dead: BTreeSet::new(),
            lingering: BTreeMap::new(),
            linger: LINGER,
            lives: BTreeMap::new(),
            life_failing: false,
            life_store: match LifeStore::open(&run_dir_for_life) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(
                        "{}/espd-life: {e}: SA ages and counts are not kept across a restart",
                        run_dir_for_life.display()
                    );
                    None
                }
            },
            tunnels: BTreeMap::new(),
            activity_seen: BTreeMap::new(),
            seq_published: BTreeMap::new(),
            usage_published: BTreeMap::new(),
            ha: {
                let mut ha = crate::ha::HaLeases::default();
                ha.set_run_dir(&run_dir_for_life);
                ha
            },
            acquire: Default::default(),
            acquires: 0,
            waiting_for_traffic: BTreeSet::new(),
            ipv6_phase1s: BTreeSet::new(),
            ticks: 0,
        }
    }

    fn datapath(&mut self) -> Option<&mut Datapath> {
        if self.dp.is_none() {
            match Datapath::start(&self.run_dir, self.workers) {
                Ok(mut dp) => {
                    dp.set_ha_gating(self.ha.gating());
                    tracing::info!(
                        "datapath up: {} workers, raw ESP and UDP 4500, run-dir {}",
                        self.workers,
                        self.run_dir.display()
                    );
                    self.dp = Some(dp);
                    self.dp_error = None;
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.dp_error.as_deref() != Some(msg.as_str()) {
                        tracing::error!(
                            "datapath cannot start (retried with the next SA to install): {msg}"
                        );
                    }
                    self.dp_error = Some(msg);
                }
            }
        }
        self.dp.as_mut()
    }

    /// Brings the datapath in line with `desired`: every SA ([`Scope::All`]), or the SAs of
    /// `scope`'s keys and those that wait (failed installs, flushed or hard-expired SAs
    /// still installed, SAs lingering after a rekey). Tunnel records are re-published for
    /// the tunnels it touched.
    fn reconcile(&mut self, scope: Scope, out: &mut Outbox) {
        let now = Instant::now();
        // One table publication for every install and removal below (the datapath is
        // started first if SAs wait for it: started by the first install, it published
        // once per SA).
        if !self.desired.is_empty() {
            let _ = self.datapath();
        }
        if let Some(dp) = self.dp.as_mut() {
            dp.hold_publish();
        }
        let (keys, mut touched) = match scope {
            Scope::All => (None, None),
            Scope::Pending { keys, tunnels } => (Some(keys), Some(tunnels)),
        };
        self.dead.retain(|k| self.desired.contains_key(k));
        // A lingering SA that ikemgr publishes again is live again.
        let revived: Vec<String> = self
            .lingering
            .keys()
            .filter(|k| self.desired.contains_key(*k))
            .cloned()
            .collect();
        for k in revived {
            self.lingering.remove(&k);
            let outbound = self.installed.get(&k).is_some_and(|i| i.outbound);
            if let Some(dp) = self.dp.as_mut() {
                dp.set_outbound(&k, outbound);
            }
        }
        let is_gone = |k: &String| !self.desired.contains_key(k) || self.dead.contains(k);
        let gone: Vec<String> = match &keys {
            None => self
                .installed
                .keys()
                .filter(|k| is_gone(k))
                .cloned()
                .collect(),
            Some(keys) => {
                let waiting = self.dead.iter().chain(self.lingering.keys());
                let mut gone: Vec<String> = keys
                    .iter()
                    .chain(waiting)
                    .filter(|k| self.installed.contains_key(*k) && is_gone(k))
                    .cloned()
                    .collect();
                gone.sort_unstable();
                gone.dedup();
                gone
            }
        };
        for k in gone {
            let forget = !self.desired.contains_key(&k);
            if forget && !self.dead.contains(&k) {
                match self.lingering.get(&k) {
                    Some(until) if now < *until => continue,
                    Some(_) => {}
                    None => {
                        let tunnel = self.installed.get(&k).map(|i| i.tunnel.as_str());
                        let successor = tunnel.is_some_and(|t| {
                            crate::datapath::of_tunnel(&self.desired, t).any(|(_, i)| i.tunnel == t)
                        });
                        if successor {
                            if let Some(dp) = self.dp.as_mut() {
                                dp.set_outbound(&k, false);
                            }
                            self.lingering.insert(k.clone(), now + self.linger);
                            tracing::info!(
                                "SA {k} replaced: inbound only for {} s more",
                                self.linger.as_secs()
                            );
                            if let (Some(t), Some(i)) = (touched.as_mut(), self.installed.get(&k)) {
                                t.insert(i.tunnel.clone());
                            }
                            continue;
                        }
                    }
                }
            }
            if let (Some(t), Some(i)) = (touched.as_mut(), self.installed.get(&k)) {
                t.insert(i.tunnel.clone());
            }
            // It lingered because a successor replaced it (a rekey): gone for good.
            let replaced = self.lingering.remove(&k).is_some();
            let mut carried = String::new();
            if let Some(sa) = self
                .dp
                .as_mut()
                .and_then(|dp| dp.remove(&k, replaced && forget))
            {
                let (rx, tx) = (sa.rx.get(), sa.tx.get());
                carried = format!(
                    ": in {} packets {} bytes, out {} packets {} bytes",
                    rx.packets, rx.bytes, tx.packets, tx.bytes
                );
            }
            if forget {
                if let (Some(store), Some(i)) = (self.life_store.as_mut(), self.installed.get(&k)) {
                    store.remove(&i.tunnel, i.spi_in);
                }
            }
            self.installed.remove(&k);
            self.lives.remove(&k);
            self.seq_published.remove(&k);
            tracing::info!("SA {k} removed{carried}");
        }
        self.failed.retain(|k, _| self.desired.contains_key(k));
        // Only what differs from the installed SA (cloning all of them on every hand-over
        // was most of the rest of a reconcile).
        let differs = |k: &String, v: &ChildSaInfo| {
            !self.dead.contains(k) && self.installed.get(k) != Some(v)
        };
        let wanted: Vec<(String, ChildSaInfo)> = match &keys {
            None => self
                .desired
                .iter()
                .filter(|(k, v)| differs(k, v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            Some(keys) => {
                let keys: BTreeSet<&String> = keys.iter().chain(self.failed.keys()).collect();
                keys.into_iter()
                    .filter_map(|k| self.desired.get_key_value(k))
                    .filter(|(k, v)| differs(k, v))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }
        };
        for (k, info) in wanted {
            if let Some(t) = touched.as_mut() {
                t.insert(info.tunnel.clone());
            }
            if let Some(cur) = self.installed.get(&k) {
                let mut same = cur.clone();
                same.outbound = info.outbound;
                // A UDP-encapsulated SA whose peer moved (ikemgr followed its NAT mapping,
                // RFC 7296 §2.23) keeps its state: only the destination changes.
                let moved_to = match (cur.encap, info.encap) {
                    (EspEncap::Udp { .. }, EspEncap::Udp { remote_port, .. })
                        if (cur.remote != info.remote || cur.encap != info.encap) =>
                    {
                        info.remote
                            .parse::<std::net::IpAddr>()
                            .ok()
                            .map(|ip| std::net::SocketAddr::new(ip, remote_port))
                    }
                    _ => None,
                };
                if moved_to.is_some() {
                    same.remote = info.remote.clone();
                    same.encap = info.encap;
                }
                if same == info {
                    if let Some(dp) = self.dp.as_mut() {
                        if cur.outbound != info.outbound {
                            dp.set_outbound(&k, info.outbound);
                            tracing::info!(
                                "SA {k} outbound {}",
                                if info.outbound { "enabled" } else { "disabled" }
                            );
                        }
                        if let Some(to) = moved_to {
                            dp.set_peer(&k, to);
                            tracing::info!("SA {k}: peer moved to {to}");
                        }
                    }
                    self.installed.insert(k, info);
                    continue;
                }
            }
            // An SA this espd (or the one before a restart) already carried goes on with its
            // age, counts and reported soft limits.
            let now_ns = monotonic_ns();
            let record = self
                .life_store
                .as_ref()
                .and_then(|s| s.load(&info.tunnel, info.spi_in))
                .filter(|r| r.installed_ns <= now_ns);
            let resume = match &record {
                Some(r) => Resume {
                    created: now
                        .checked_sub(std::time::Duration::from_nanos(now_ns - r.installed_ns))
                        .unwrap_or(now),
                    rx: r.rx,
                    tx: r.tx,
                },
                None => Resume::new(now),
            };
            let Some(dp) = self.datapath() else {
                self.failed.insert(k, "datapath down".into());
                continue;
            };
            match dp.install(&info, &resume) {
                Ok(()) => {
                    if let Some(r) = &record {
                        tracing::info!(
                            "SA {k}: taken back at age {} s, in {} packets {} bytes, out {} packets {} bytes (persisted)",
                            now.saturating_duration_since(resume.created).as_secs(),
                            r.rx.packets,
                            r.rx.bytes,
                            r.tx.packets,
                            r.tx.bytes
                        );
                    }
                    tracing::info!(
                        "SA {k} installed: {} in {:08x} out {:08x} {} -> {} {}",
                        info.transform,
                        info.spi_in,
                        info.spi_out,
                        info.local,
                        info.remote,
                        match info.encap {
                            EspEncap::None => "esp".to_string(),
                            EspEncap::Udp { remote_port, .. } => format!("udp/{remote_port}"),
                        }
                    );
                    let cfg = lifetime_config(&info);
                    let installed_ns = record.as_ref().map_or(now_ns, |r| r.installed_ns);
                    let mut life = SaLife {
                        inbound: Lifetime::resume(
                            cfg,
                            resume.created,
                            record.as_ref().is_some_and(|r| r.soft_in),
                        ),
                        outbound: Lifetime::resume(
                            cfg,
                            resume.created,
                            record.as_ref().is_some_and(|r| r.soft_out),
                        ),
                        written: record,
                        installed_ns,
                    };
                    if life.written.is_none() {
                        // Its creation time, before the first packet.
                        write_life(
                            self.life_store.as_mut(),
                            &info.tunnel,
                            info.spi_in,
                            &mut life,
                            resume.rx,
                            resume.tx,
                        );
                    }
                    self.lives.insert(k.clone(), life);
                    self.failed.remove(&k);
                    self.installed.insert(k, info);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.failed.get(&k) != Some(&msg) {
                        tracing::error!("cannot install SA: {msg}");
                    }
                    self.failed.insert(k, msg);
                }
            }
        }
        if let Some(dp) = self.dp.as_mut() {
            for p1 in &self.waiting_for_traffic {
                if !self.phase1_tunnels.contains_key(p1) {
                    continue;
                }
                if let Err(e) = dp.ensure_device(p1, self.ipv6_phase1s.contains(p1)) {
                    tracing::warn!("{p1}: cannot open the TUN device for its routes: {e}");
                }
            }
            let keep: BTreeSet<String> = self.phase1_tunnels.keys().cloned().collect();
            dp.prune_devices(&keep);
            dp.release_publish();
        }
        self.flush_life();
        match touched {
            None => self.refresh_tunnels(out),
            Some(tunnels) => self.refresh_tunnels_of(&tunnels, out),
        }
    }

    /// Writes the lifetime records changed since the last call (one append).
    fn flush_life(&mut self) {
        let Some(store) = self.life_store.as_mut() else {
            return;
        };
        match store.flush() {
            Ok(()) => self.life_failing = false,
            Err(e) => {
                if !self.life_failing {
                    tracing::error!(
                        "cannot persist the SAs' ages and counts: {e} (a restart would count them from zero)"
                    );
                }
                self.life_failing = true;
            }
        }
    }

    /// Re-publishes the per-tunnel records whose content changed.
    fn refresh_tunnels(&mut self, out: &mut Outbox) {
        let mut desired: BTreeMap<String, EspTunnelInfo> = BTreeMap::new();
        for (t, p) in &self.tunnel_records {
            desired.insert(t.clone(), tunnel_entry(t, p));
        }
        if let Some(dp) = self.dp.as_ref() {
            for sa in dp.sas().values() {
                let e = desired
                    .entry(sa.tunnel.clone())
                    .or_insert_with(|| tunnel_entry(&sa.tunnel, &sa.phase1));
                add_sa(e, sa);
            }
        }
        diff_keyed(
            &self.tunnels,
            &desired,
            |_, e| Body::EspTunnel(e),
            |tunnel| Body::EspTunnelRemoved { tunnel },
            out,
        );
        self.tunnels = desired;
    }

    /// [`Espd::refresh_tunnels`] for `tunnels` only (what a reconcile of a few SAs touched):
    /// each tunnel's SAs are one range of the datapath's ordered map.
    fn refresh_tunnels_of(&mut self, tunnels: &BTreeSet<String>, out: &mut Outbox) {
        for t in tunnels {
            let mut entry = self.tunnel_records.get(t).map(|p| tunnel_entry(t, p));
            if let Some(dp) = self.dp.as_ref() {
                for sa in dp.sas_of_tunnel(t).filter(|sa| sa.tunnel == *t) {
                    add_sa(entry.get_or_insert_with(|| tunnel_entry(t, &sa.phase1)), sa);
                }
            }
            match entry {
                Some(e) if self.tunnels.get(t) != Some(&e) => {
                    self.tunnels.insert(t.clone(), e.clone());
                    out.push(Body::EspTunnel(e));
                }
                Some(_) => {}
                None => {
                    if self.tunnels.remove(t).is_some() {
                        out.push(Body::EspTunnelRemoved { tunnel: t.clone() });
                    }
                }
            }
        }
    }

    /// Reports lifetime events; persists each SA's counts when they changed (every tick for
    /// an SA with a volume limit, on `slow` ticks for the others) and at once when a soft
    /// limit was reported.
    fn poll_lifetimes(&mut self, slow: bool, out: &mut Outbox) {
        let now = Instant::now();
        let Some(dp) = self.dp.as_ref() else { return };
        let mut hard = Vec::new();
        for (k, life) in self.lives.iter_mut() {
            if self.lingering.contains_key(k) {
                continue;
            }
            let Some(sa) = dp.sas().get(k) else { continue };
            let ev_in = life.inbound.poll(&sa.rx.get(), now, (false, false));
            let ev_out = life.outbound.poll(&sa.tx.get(), now, sa.seq.state());
            for ev in [ev_in, ev_out].into_iter().flatten() {
                let (is_hard, kind) = match ev {
                    LifetimeEvent::Soft(k) => (false, k),
                    LifetimeEvent::Hard(k) => (true, k),
                };
                tracing::info!(
                    "SA {k}: {} lifetime reached ({})",
                    if is_hard { "hard" } else { "soft" },
                    limit_name(kind)
                );
                out.push(Body::EspExpire(SaExpiry {
                    tunnel: sa.tunnel.clone(),
                    spi_in: sa.spi_in,
                    hard: is_hard,
                    reason: limit_name(kind).to_string(),
                    packets: sa.rx.get().packets.saturating_add(sa.tx.get().packets),
                }));
                if is_hard {
                    hard.push(k.clone());
                    break;
                }
            }
            let (rx, tx) = (sa.rx.get(), sa.tx.get());
            let due = match &life.written {
                None => true,
                Some(w) => {
                    let volume = life.inbound.config().soft_bytes.is_some()
                        || life.inbound.config().hard_bytes.is_some();
                    w.soft_in != life.inbound.soft_reported()
                        || w.soft_out != life.outbound.soft_reported()
                        || ((slow || volume) && (w.rx != rx || w.tx != tx))
                }
            };
            if due {
                write_life(
                    self.life_store.as_mut(),
                    &sa.tunnel,
                    sa.spi_in,
                    life,
                    rx,
                    tx,
                );
            }
        }
        for k in hard {
            self.dead.insert(k);
        }
        self.flush_life();
    }

    fn publish_activity(&mut self, out: &mut Outbox) {
        let Some(dp) = self.dp.as_ref() else { return };
        let mut per: BTreeMap<&str, TunnelActivity> = BTreeMap::new();
        for sa in dp.sas().values() {
            let a = per
                .entry(sa.tunnel.as_str())
                .or_insert_with(|| TunnelActivity {
                    tunnel: sa.tunnel.clone(),
                    last_rx_ns: 0,
                    last_tx_ns: 0,
                    rx_pkts: 0,
                    tx_pkts: 0,
                    rx_bytes: 0,
                    tx_bytes: 0,
                });
            let (rx, tx) = (sa.rx.get(), sa.tx.get());
            a.rx_pkts += rx.packets;
            a.tx_pkts += tx.packets;
            a.rx_bytes += rx.bytes;
            a.tx_bytes += tx.bytes;
            a.last_rx_ns = a.last_rx_ns.max(sa.rx.last_ns.load(Ordering::Relaxed));
            a.last_tx_ns = a.last_tx_ns.max(sa.tx.last_ns.load(Ordering::Relaxed));
        }
        let mut changed = Vec::new();
        for (t, a) in per {
            let cur = (a.rx_pkts, a.tx_pkts);
            if self.activity_seen.get(t) != Some(&cur) {
                self.activity_seen.insert(t.to_string(), cur);
                changed.push(a);
            }
        }
        let live: BTreeSet<&str> = dp.sas().values().map(|s| s.tunnel.as_str()).collect();
        self.activity_seen.retain(|t, _| live.contains(t.as_str()));
        if !changed.is_empty() {
            out.push(Body::EspActivity { tunnels: changed });
        }
        let mut marks = Vec::new();
        for (k, sa) in dp.sas() {
            let hw = sa.lease.lock().unwrap_or_else(|p| p.into_inner()).granted();
            if self.seq_published.get(k) != Some(&hw) {
                self.seq_published.insert(k.clone(), hw);
                marks.push(SeqMark {
                    tunnel: sa.tunnel.clone(),
                    spi_out: sa.spi_out,
                    seq_hw: hw,
                });
            }
        }
        // In a cluster, each SA whose inner byte count moved goes with its age, so hasyncd
        // can tell the other members what its lifetimes have left (at most once per batch,
        // never per packet).
        let mut usage = Vec::new();
        if self.ha.gating() {
            let now = Instant::now();
            for (k, sa) in dp.sas() {
                let bytes = sa.rx.get().bytes.max(sa.tx.get().bytes);
                if self.usage_published.get(k) != Some(&bytes) {
                    self.usage_published.insert(k.clone(), bytes);
                    usage.push(SaUsage {
                        tunnel: sa.tunnel.clone(),
                        spi_in: sa.spi_in,
                        age_ms: u64::try_from(
                            now.saturating_duration_since(sa.installed).as_millis(),
                        )
                        .unwrap_or(u64::MAX),
                        bytes,
                    });
                }
            }
            self.usage_published.retain(|k, _| dp.sas().contains_key(k));
        }
        if !marks.is_empty() || !usage.is_empty() {
            out.push(Body::EspSeq { sas: marks, usage });
        }
    }

    /// Turns the devices' notes of outbound packets without an SA into paced
    /// `esp.acquire` events (see [`crate::acquire`]).
    fn publish_acquires(&mut self, out: &mut Outbox) {
        let Some(dp) = self.dp.as_ref() else { return };
        let now = Instant::now();
        for (phase1, dev) in dp.devices() {
            let ([v4, v6], dropped) = dev.acquire.take();
            // The drops are counted once, with the first family's packet (or alone).
            let packets = match (v4, v6) {
                (None, None) => vec![None],
                (a, b) => [a, b].into_iter().flatten().map(Some).collect(),
            };
            let mut dropped = dropped;
            for packet in packets {
                let Some(a) = self
                    .acquire
                    .offer(now, phase1, packet, std::mem::take(&mut dropped))
                else {
                    continue;
                };
                tracing::info!(
                    "{phase1}: no SA for {} -> {} (phase2 {:?}), {} packets dropped: acquire",
                    a.src,
                    a.dst,
                    a.phase2,
                    a.dropped
                );
                self.acquires += 1;
                out.push(Body::Acquire(a));
            }
        }
    }

    fn export_metrics(&self) {
        let installed = self.dp.as_ref().map(|d| d.sas().len()).unwrap_or(0);
        metrics::gauge!("espd_sas").set(installed as f64);
        metrics::gauge!("espd_sas_failed").set(self.failed.len() as f64);
        metrics::gauge!("espd_datapath_up").set(if self.dp.is_some() { 1.0 } else { 0.0 });
        let Some(dp) = self.dp.as_ref() else { return };
        let s = dp.shared();
        metrics::gauge!("espd_tun_devices").set(dp.devices().len() as f64);
        let (rx, tx) = (s.rx.get(), s.tx.get());
        metrics::counter!("espd_packets_total", "direction" => "in").absolute(rx.packets);
        metrics::counter!("espd_packets_total", "direction" => "out").absolute(tx.packets);
        metrics::counter!("espd_bytes_total", "direction" => "in").absolute(rx.bytes);
        metrics::counter!("espd_bytes_total", "direction" => "out").absolute(tx.bytes);
        for (i, label) in DROP_LABELS.iter().enumerate() {
            let v = s
                .drops
                .get(i)
                .map(|c| c.load(Ordering::Relaxed))
                .unwrap_or(0);
            metrics::counter!("espd_drops_total", "reason" => *label).absolute(v);
        }
        metrics::counter!("espd_acquires_total").absolute(self.acquires);
        metrics::counter!("espd_nat_keepalives_total")
            .absolute(s.keepalives.load(Ordering::Relaxed));
        metrics::counter!("espd_ike_relayed_total", "direction" => "in")
            .absolute(s.ike_relayed.load(Ordering::Relaxed));
        metrics::counter!("espd_ike_relayed_total", "direction" => "out")
            .absolute(s.ike_sent.load(Ordering::Relaxed));
    }

    fn sa_json(&self, sa: &Arc<Sa>, now: Instant) -> Value {
        let t = sa.transform;
        let (rx, tx) = (sa.rx.get(), sa.tx.get());
        let life = self
            .installed
            .get(&sa.key)
            .map(|i| i.lifetime)
            .unwrap_or_default();
        let age = now.saturating_duration_since(sa.installed).as_secs();
        let expire = if life.hard_secs > 0 {
            life.hard_secs.saturating_sub(age)
        } else {
            0
        };
        let range = |c: &crate::datapath::table::Cidr| {
            let (a, b) = c.range();
            format!("0:{a}-{b}:0")
        };
        let replay = sa.replay.lock().unwrap_or_else(|p| p.into_inner());
        let mut drops = serde_json::Map::new();
        for (i, label) in DROP_LABELS.iter().enumerate().take(NUM_DROPS) {
            let v = sa.drop_count(i);
            if v > 0 {
                drops.insert((*label).to_string(), json!(v));
            }
        }
        let enc_name = t.encryption().diag_name();
        let (ah, ah_key) = match t.integrity() {
            Some(i) => (i.diag_name(), i.key_len()),
            None => ("null", 0),
        };
        let dir = |spi: u32| {
            json!({
                "spi": format!("{spi:08x}"), "esp": enc_name, "key": t.encryption().key_len(),
                "ah": ah, "ah_key": ah_key,
            })
        };
        json!({
            "key": sa.key,
            "proxyid": sa.phase2,
            "src": sa.local_ts.iter().map(range).collect::<Vec<_>>(),
            "dst": sa.remote_ts.iter().map(range).collect::<Vec<_>>(),
            "transform": t.name(),
            "outbound": sa.outbound.load(Ordering::Relaxed),
            "mtu": sa.tun.mtu(),
            "expire": expire,
            "replaywin": sa.replay_size,
            "seqno": sa.seq.next(),
            "seq_hw": sa.lease.lock().unwrap_or_else(|p| p.into_inner()).granted(),
            "ha_held": sa.seq.held(),
            "esn": sa.esn,
            "replaywin_lastseq": replay.top(),
            "life": {
                "bytes": rx.bytes + tx.bytes, "bytes_hard": life.hard_bytes,
                "timeout": age, "timeout_hard": life.hard_secs,
            },
            "dec": dir(sa.spi_in),
            "enc": dir(sa.spi_out),
            "dec_pkts": rx.packets, "dec_bytes": rx.bytes,
            "enc_pkts": tx.packets, "enc_bytes": tx.bytes,
            "drops": drops,
        })
    }

    fn tunnel_list(&self, filter: Option<&str>) -> Value {
        let now = Instant::now();
        let mut by_tunnel: BTreeMap<&str, Vec<&Arc<Sa>>> = BTreeMap::new();
        if let Some(dp) = self.dp.as_ref() {
            for sa in dp.sas().values() {
                by_tunnel.entry(sa.tunnel.as_str()).or_default().push(sa);
            }
        }
        for t in self.tunnel_records.keys() {
            by_tunnel.entry(t.as_str()).or_default();
        }
        let mut list = Vec::new();
        for (name, sas) in by_tunnel {
            if filter.is_some_and(|f| f != name) {
                continue;
            }
            let first = sas.first();
            let info = self.desired.values().find(|i| i.tunnel == name);
            let peer = first.map(|s| s.peer.get());
            let (lport, rport, encap) = match peer {
                Some(Peer::Udp(a)) => (4500, a.port(), "udp"),
                _ => (0, 0, "none"),
            };
            let remote_gw = match peer {
                Some(Peer::Udp(a)) => a.ip().to_string(),
                Some(Peer::Raw(a)) => a.to_string(),
                None => info.map(|i| i.remote.clone()).unwrap_or_default(),
            };
            let peer_moves: u64 = sas
                .iter()
                .map(|s| s.peer_moves.load(Ordering::Relaxed))
                .sum();
            let (mut rxp, mut txp, mut rxb, mut txb) = (0, 0, 0, 0);
            for sa in &sas {
                let (r, t) = (sa.rx.get(), sa.tx.get());
                rxp += r.packets;
                rxb += r.bytes;
                txp += t.packets;
                txb += t.bytes;
            }
            let phase1 = first
                .map(|s| s.phase1.clone())
                .or_else(|| self.tunnel_records.get(name).cloned())
                .unwrap_or_default();
            list.push(json!({
                "name": name,
                "ver": 2,
                "phase1": phase1,
                "device": phase1,
                "local_gw": first.map(|s| s.local.clone()).or_else(|| info.map(|i| i.local.clone())).unwrap_or_default(),
                "remote_gw": remote_gw,
                "peer_moves": peer_moves,
                "local_port": lport,
                "remote_port": rport,
                "encap": encap,
                "stat": {"rxp": rxp, "txp": txp, "rxb": rxb, "txb": txb},
                "sas": sas.iter().map(|s| self.sa_json(s, now)).collect::<Vec<_>>(),
            }));
        }
        let mut drops = serde_json::Map::new();
        if let Some(dp) = self.dp.as_ref() {
            for (i, label) in DROP_LABELS.iter().enumerate() {
                let v = dp
                    .shared()
                    .drops
                    .get(i)
                    .map(|c| c.load(Ordering::Relaxed))
                    .unwrap_or(0);
                drops.insert((*label).to_string(), json!(v));
            }
        }
        json!({
            "datapath": match (&self.dp, &self.dp_error) {
                (Some(_), _) => "up".to_string(),
                (None, Some(e)) => format!("down: {e}"),
                (None, None) => "idle (no SA yet)".to_string(),
            },
            "tunnels": list,
            "drops": drops,
            // Every gated outbound SA held: hasyncd is gone (`ha.rs`).
            "ha_held": self.ha.held(),
            "acquires": self.acquires,
            "nat_keepalives": self.dp.as_ref().map(|d| d.shared().keepalives.load(Ordering::Relaxed)).unwrap_or(0),
            "failed": self.failed,
        })
    }
}

/// Metric help texts (the shell installed the recorder before building the logic).
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_counter!(
        "espd_packets_total",
        Unit::Count,
        "ESP packets carried, by direction (in: decrypted to TUN, out: encrypted to the wire)"
    );
    describe_counter!(
        "espd_bytes_total",
        Unit::Bytes,
        "Inner (plaintext) bytes carried, by direction"
    );
    describe_counter!("espd_drops_total", Unit::Count, "Packets dropped, by reason (truncated, unknown_spi, replay, icv, padding, inner_header, selector, no_sa, link_scope, ...)");
    describe_counter!(
        "espd_acquires_total",
        Unit::Count,
        "esp.acquire events sent to ikemgr (outbound traffic without an SA; at most one per phase2 per second; the packets are counted in espd_drops_total{reason=no_sa})"
    );
    describe_counter!(
        "espd_nat_keepalives_total",
        Unit::Count,
        "NAT keepalives received on UDP 4500 (RFC 3948)"
    );
    describe_counter!(
        "espd_ike_relayed_total",
        Unit::Count,
        "IKE messages relayed between UDP 4500 and ikemgr, by direction"
    );
    describe_counter!(
        "espd_ha_holds_total",
        Unit::Count,
        "Times outbound SAs of a cluster member were held: hasyncd gone for half the partner's loss time, or hasyncd's SeqHold (another member carries the tunnel in a split brain); their packets are counted in espd_drops_total{reason=seq_lease}"
    );
    describe_gauge!(
        "espd_ha_held",
        Unit::Count,
        "1 while every gated outbound SA is held because hasyncd is gone"
    );
    describe_gauge!(
        "espd_sas",
        Unit::Count,
        "CHILD SA pairs installed in the datapath"
    );
    describe_gauge!(
        "espd_sas_failed",
        Unit::Count,
        "CHILD SAs ikemgr published that could not be installed"
    );
    describe_gauge!(
        "espd_datapath_up",
        "1 when the datapath sockets and threads are running"
    );
    describe_gauge!("espd_tun_devices", Unit::Count, "TUN devices open");
}

/// `[name N]` or `[N]`.
fn name_arg(args: &[String]) -> Result<Option<&str>, String> {
    match args {
        [] => Ok(None),
        [n] => Ok(Some(n.as_str())),
        [k, n] if k == "name" => Ok(Some(n.as_str())),
        _ => Err(format!("expected [name N], got {args:?}")),
    }
}

impl DaemonLogic for Espd {
    const KIND: DaemonKind = DaemonKind::Espd;
    const FOLLOWS: &'static [DaemonKind] = &[DaemonKind::Ikemgr, DaemonKind::Hasyncd];

    fn new(_config: &Config, run_dir: &Path) -> Self {
        describe_metrics();
        let run_dir = run_dir.to_path_buf();
        // ESPD_WORKERS overrides one packet thread per core (for benchmarks and small hosts).
        let workers = std::env::var("ESPD_WORKERS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            })
            .clamp(1, 16);
        Espd::with(run_dir, workers)
    }

    fn on_config(&mut self, config: &Config, _out: &mut Outbox) {
        self.ha.on_config(config, self.dp.as_mut());
        self.acquire.set_config(config);
        self.waiting_for_traffic = config
            .phase1
            .iter()
            .filter(|p| {
                p.kind != haven_config::Phase1Type::Dynamic && !p.auto_negotiate && !p.passive_mode
            })
            .map(|p| p.name.clone())
            .collect();
        self.ipv6_phase1s = config
            .phase1
            .iter()
            .filter(|p| p.ipv6)
            .map(|p| p.name.clone())
            .collect();
        // Own UDP 4500 and raw ESP from the start: IKE that floats to 4500 (NAT-T, RFC 3948)
        // reaches ikemgr through this datapath before any SA exists. A failure is retried
        // with the first SA.
        let _ = self.datapath();
    }

    fn on_replica(&mut self, src: DaemonKind, store: &StateStore, out: &mut Outbox) {
        self.on_replica_copy(src, store.clone(), out);
    }

    fn on_replica_copy(&mut self, src: DaemonKind, store: StateStore, out: &mut Outbox) {
        // hasyncd is followed for its lease grants (events) only.
        if src != DaemonKind::Ikemgr {
            return;
        }
        let old = std::mem::take(&mut self.ikemgr_store);
        // The store keys CHILD SAs by `tunnel/spi_in` (`ChildSaInfo::key_of`) and tunnels
        // by name, as these maps do.
        let children = store.changes_since(&old, table::CHILD_SA);
        let tunnels = store.changes_since(&old, table::TUNNEL);
        let changed = !children.is_empty() || !tunnels.is_empty();
        let mut keys = BTreeSet::new();
        let mut touched = BTreeSet::new();
        // The reconcile also re-publishes the tunnels of what it installs or removes; a
        // lingering SA that comes back (outbound again) is only touched here.
        for (key, body) in children {
            match body {
                Some(Body::ChildSa(c)) => {
                    touched.insert(c.tunnel.clone());
                    self.desired.insert(key.clone(), c.clone());
                }
                _ => {
                    if let Some(c) = self.desired.remove(&key) {
                        touched.insert(c.tunnel);
                    }
                }
            }
            keys.insert(key);
        }
        for (name, body) in tunnels {
            let phase1 = match body {
                Some(Body::Tunnel(t)) => Some(t.phase1.clone()),
                _ => None,
            };
            let before = match &phase1 {
                Some(p) => self.tunnel_records.insert(name.clone(), p.clone()),
                None => self.tunnel_records.remove(&name),
            };
            if before != phase1 {
                if let Some(p) = before {
                    if let Some(n) = self.phase1_tunnels.get_mut(&p) {
                        *n -= 1;
                        if *n == 0 {
                            self.phase1_tunnels.remove(&p);
                        }
                    }
                }
                if let Some(p) = phase1 {
                    *self.phase1_tunnels.entry(p).or_default() += 1;
                }
            }
            touched.insert(name);
        }
        haven_daemon::drop_later(old);
        self.ikemgr_store = store;
        if changed {
            self.reconcile(
                Scope::Pending {
                    keys,
                    tunnels: touched,
                },
                out,
            );
        }
        self.ha.requests(self.dp.as_ref(), out);
    }

    fn on_event(&mut self, src: DaemonKind, body: &Body, _out: &mut Outbox) {
        match (src, body) {
            (DaemonKind::Hasyncd, Body::SeqLeaseGranted { sas }) => {
                self.ha.granted(self.dp.as_ref(), sas);
            }
            (DaemonKind::Hasyncd, Body::SeqHold { tunnels }) => {
                self.ha.hold_tunnels(self.dp.as_ref(), tunnels);
            }
            (DaemonKind::Hasyncd, Body::SeqSkip { sas }) => {
                let now_ms = haven_daemon::now_ns() / 1_000_000;
                self.ha.skip(self.dp.as_ref(), sas, now_ms);
            }
            _ => {}
        }
    }

    fn view(&self, name: &str, args: &[String]) -> Result<Value, String> {
        match name {
            "tunnel-list" => Ok(self.tunnel_list(name_arg(args)?)),
            "tunnels" => Ok(json!(self.tunnels.values().collect::<Vec<_>>())),
            other => Err(format!(
                "unknown view {other:?}: espd has: tunnel-list, tunnels"
            )),
        }
    }

    fn command(&mut self, name: &str, args: &[String], out: &mut Outbox) -> Result<Value, String> {
        match name {
            "tunnel-flush" => {
                let filter = name_arg(args)?;
                let keys: Vec<String> = self
                    .installed
                    .iter()
                    .filter(|(_, i)| filter.is_none_or(|f| f == i.tunnel))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in &keys {
                    if let Some(i) = self.installed.get(k) {
                        out.push(Body::EspExpire(SaExpiry {
                            tunnel: i.tunnel.clone(),
                            spi_in: i.spi_in,
                            hard: true,
                            reason: "flush".into(),
                            packets: 0,
                        }));
                    }
                    self.dead.insert(k.clone());
                }
                self.reconcile(Scope::All, out);
                tracing::info!("flushed {} SAs", keys.len());
                Ok(json!({ "flushed": keys }))
            }
            other => Err(format!("unknown command {other:?}: espd has: tunnel-flush")),
        }
    }

    /// Activity batches (for dpdmon) every 200 ms (DESIGN.md §3.4).
    const TICK_MS: u64 = 200;

    /// A cluster member also wakes every [`crate::ha::UNKNOWN_SPI_POLL_MS`] to report ESP
    /// for unknown SPIs to hasyncd (FGSP promotion); the rest of the tick keeps its period.
    fn poll_timeout(&self) -> Option<u64> {
        self.ha
            .gating()
            .then(|| haven_daemon::now_ns() / 1_000_000 + crate::ha::UNKNOWN_SPI_POLL_MS)
    }

    fn tick(&mut self, now_ns: u64, out: &mut Outbox) {
        let now_ms = now_ns / 1_000_000;
        self.ha.watch_hasyncd(self.dp.as_ref(), now_ms);
        self.ha.unknown_spis(self.dp.as_ref(), now_ms, out);
        if self.ha.gating() {
            // The 10 ms wake-ups of a cluster member only look for unknown SPIs, and
            // shortly after a skip send the lease requests above it.
            if now_ms.saturating_sub(self.ha.full_tick_ms) < Self::TICK_MS.saturating_sub(5) {
                self.ha.skip_requests(self.dp.as_ref(), now_ms, out);
                return;
            }
            self.ha.full_tick_ms = now_ms;
        }
        self.publish_activity(out);
        self.publish_acquires(out);
        // Every tick: a volume limit can be reached within a second at full rate.
        self.poll_lifetimes((self.ticks + 1) % SLOW_EVERY == 0, out);
        self.ha.requests(self.dp.as_ref(), out);
        self.ticks += 1;
        if self.ticks % SLOW_EVERY != 0 {
            if self.dead.iter().any(|k| self.installed.contains_key(k)) {
                self.reconcile(Scope::waiting(), out);
            }
            return;
        }
        let now = Instant::now();
        if !self.failed.is_empty()
            || self.dead.iter().any(|k| self.installed.contains_key(k))
            || self.lingering.values().any(|t| now >= *t)
        {
            self.reconcile(Scope::waiting(), out);
        }
        self.refresh_tunnels(out);
        self.export_metrics();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_schema::schema::SaLifetime;

    #[test]
    fn name_argument_forms() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(name_arg(&s(&[])), Ok(None));
        assert_eq!(name_arg(&s(&["vpn1"])), Ok(Some("vpn1")));
        assert_eq!(name_arg(&s(&["name", "vpn1_1"])), Ok(Some("vpn1_1")));
        assert!(name_arg(&s(&["nom", "x"])).is_err());
        assert!(name_arg(&s(&["name", "a", "b"])).is_err());
    }

    #[test]
    fn lifetimes_map_zero_to_unlimited() {
        let mut info = ChildSaInfo {
            tunnel: "vpn1".into(),
            phase1: "vpn1".into(),
            phase2: "vpn1".into(),
            spi_in: 0x100,
            spi_out: 0x200,
            transform: "aes128gcm".into(),
            esn: false,
            keys_in: vec![0; 20],
            keys_out: vec![0; 20],
            local: "192.0.2.1".into(),
            remote: "192.0.2.2".into(),
            encap: EspEncap::None,
            local_ts: vec!["10.0.1.0/24".into()],
            remote_ts: vec!["10.0.2.0/24".into()],
            replay_window: 2048,
            lifetime: SaLifetime::default(),
            initial_seq: 1,
            outbound: true,
        };
        assert_eq!(lifetime_config(&info), esp_proto::LifetimeConfig::default());
        info.lifetime = SaLifetime {
            soft_secs: 10,
            hard_secs: 20,
            soft_bytes: 0,
            hard_bytes: 1000,
        };
        let c = lifetime_config(&info);
        assert_eq!(c.soft_time, Some(std::time::Duration::from_secs(10)));
        assert_eq!(c.hard_time, Some(std::time::Duration::from_secs(20)));
        assert_eq!(c.soft_bytes, None);
        assert_eq!(c.hard_bytes, Some(1000));
        assert_eq!(limit_name(LimitKind::SeqSpace), "seq_space");
    }
}

/// Tests and a benchmark of the control side with a real datapath: each moves its test
/// thread to a network namespace of its own (needs root) for the datapath's sockets and
/// TUN devices, which go with the thread.
#[cfg(test)]
mod with_datapath {
    use super::*;
    use bus_schema::samples;
    use std::time::Duration;

    fn sa(i: usize, spi_in: u32) -> Body {
        let mut c = samples::child_sa();
        c.tunnel = format!("vpn1_{i}");
        c.phase1 = "vpn1".into();
        c.transform = "aes128gcm".into();
        c.keys_in = vec![0x11; 20];
        c.keys_out = vec![0x22; 20];
        c.spi_in = spi_in;
        c.spi_out = spi_in ^ 0x8000_0000;
        c.local = "192.0.2.1".into();
        c.remote = format!("198.18.{}.{}", (i >> 8) & 255, i & 255);
        c.encap = EspEncap::None;
        c.local_ts = vec!["0.0.0.0/0".into()];
        c.remote_ts = vec![format!(
            "10.{}.{}.{}/32",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        )];
        Body::ChildSa(c)
    }

    fn tunnel(i: usize) -> Body {
        let mut t = samples::tunnel();
        t.name = format!("vpn1_{i}");
        t.phase1 = "vpn1".into();
        Body::Tunnel(t)
    }

    fn own_netns() {
        // SAFETY: unshare only changes this thread's network namespace (the datapath's
        // threads, started later from this one, inherit it).
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {} (the test needs root)",
            std::io::Error::last_os_error()
        );
    }

    /// A scratch run-dir, removed when dropped (also when the test fails).
    struct RunDir(PathBuf);

    impl Drop for RunDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn run_dir(name: &str) -> RunDir {
        let dir = std::env::temp_dir().join(format!("espd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("run dir");
        RunDir(dir)
    }

    use bus_schema::test_rng::Rng;

    /// A reconcile of only what changed (and what waits) must leave the datapath as a
    /// reconcile of every SA would: after each hand-over of 400 random steps of ikemgr's
    /// tunnels and CHILD SAs coming, changing (outbound flag, NAT port) and going, with the
    /// odd flush, a full reconcile finds nothing to install, remove or re-publish.
    #[test]
    fn a_reconcile_of_the_changes_leaves_nothing_for_a_full_one() {
        own_netns();
        let dir = run_dir("scoped");
        let mut espd = Espd::with(dir.0.clone(), 1);
        espd.linger = Duration::from_secs(3600);
        let mut r = Rng(0x5eed_0e5d);
        let mut store = StateStore::new();
        let mut out = Outbox::new();
        let mut checks = 0;
        for step in 0..400 {
            for _ in 0..1 + r.below(3) {
                let i = r.below(12) as usize;
                let spi = 0x1000_0000 + (i as u32) * 16 + r.below(4) as u32;
                match r.below(10) {
                    0 => {
                        let mut t = tunnel(i);
                        if let Body::Tunnel(t) = &mut t {
                            t.phase1 = if i % 3 == 0 { "vpn2" } else { "vpn1" }.into();
                        }
                        store.apply(&t);
                    }
                    1 => {
                        store.apply(&Body::TunnelRemoved {
                            name: format!("vpn1_{i}"),
                        });
                    }
                    2..=6 => {
                        let mut b = sa(i, spi);
                        if let Body::ChildSa(c) = &mut b {
                            c.outbound = r.below(3) != 0;
                            if r.below(4) == 0 {
                                c.encap = EspEncap::Udp {
                                    local_port: 4500,
                                    remote_port: 4500 + r.below(3) as u16,
                                };
                            }
                        }
                        store.apply(&b);
                    }
                    _ => {
                        store.apply(&Body::ChildSaRemoved {
                            tunnel: format!("vpn1_{i}"),
                            spi_in: spi,
                        });
                    }
                }
            }
            if r.below(25) == 0 {
                let t = format!("vpn1_{}", r.below(12));
                let _ = espd.command("tunnel-flush", &["name".into(), t], &mut out);
            }
            espd.on_replica_copy(DaemonKind::Ikemgr, store.clone(), &mut out);
            let installed = espd.installed.clone();
            let lingering: Vec<String> = espd.lingering.keys().cloned().collect();
            let in_dp: Vec<String> = espd
                .dp
                .as_ref()
                .map_or_else(Vec::new, |dp| dp.sas().keys().cloned().collect());
            let tunnels = espd.tunnels.clone();
            let mut again = Outbox::new();
            espd.reconcile(Scope::All, &mut again);
            let ctx = format!("step {step}");
            assert!(espd.failed.is_empty(), "{ctx}: {:?}", espd.failed);
            assert_eq!(espd.installed, installed, "{ctx}: installed");
            assert_eq!(
                espd.lingering.keys().cloned().collect::<Vec<_>>(),
                lingering,
                "{ctx}: lingering"
            );
            let now_in_dp: Vec<String> = espd
                .dp
                .as_ref()
                .map_or_else(Vec::new, |dp| dp.sas().keys().cloned().collect());
            assert_eq!(now_in_dp, in_dp, "{ctx}: datapath SAs");
            assert_eq!(espd.tunnels, tunnels, "{ctx}: tunnel records");
            assert!(
                again.is_empty(),
                "{ctx}: a full reconcile published {again:?}"
            );
            checks += usize::from(!installed.is_empty());
        }
        assert!(checks > 200, "SAs were installed in most steps ({checks})");
        drop(espd);
        drop(dir);
    }

    /// The housekeeping thread extends the lease of an SA that used half of it, and leaves
    /// an idle SA's lease alone (it passes an SA with more than half a block left without
    /// taking the lease's lock).
    #[test]
    fn a_half_used_lease_is_extended_and_an_idle_one_left_alone() {
        use crate::datapath::SEQ_BLOCK;
        own_netns();
        let dir = run_dir("lease");
        let mut espd = Espd::with(dir.0.clone(), 1);
        let mut store = StateStore::new();
        for i in 0..2 {
            store.apply(&tunnel(i));
            store.apply(&sa(i, 0x1000_0000 + i as u32));
        }
        espd.on_replica_copy(DaemonKind::Ikemgr, store, &mut Outbox::new());
        let sas = espd.dp.as_ref().expect("datapath").sas().clone();
        let (busy, idle) = (&sas["vpn1_0/10000000"], &sas["vpn1_1/10000001"]);
        // The first lease, synced before the table was published: numbers 1 .. 2^20.
        assert_eq!(
            (busy.seq.granted(), idle.seq.granted()),
            (1 + SEQ_BLOCK, 1 + SEQ_BLOCK)
        );
        // The workers take half a block and one more: fewer than half are left.
        for _ in 0..=SEQ_BLOCK / 2 {
            busy.seq.take().expect("a number below the lease");
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while busy.seq.granted() == 1 + SEQ_BLOCK && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            busy.seq.granted(),
            1 + 2 * SEQ_BLOCK,
            "the next block, once its mark is synced"
        );
        // Several sweeps later the idle SA still has its first lease.
        std::thread::sleep(crate::datapath::HOUSEKEEPING * 5);
        assert_eq!(idle.seq.granted(), 1 + SEQ_BLOCK);
        drop(espd);
        drop(dir);
    }

    /// CPU time (user + system) of this process's thread named `name` (`/proc`'s 15-char
    /// form), at the kernel's clock tick.
    fn thread_cpu(name: &str) -> Duration {
        let tick = 100u64; // USER_HZ on Linux
        let mut total = 0u64;
        for t in std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
        {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // Fields after the `(comm)`: state is the 3rd field, utime the 14th, stime the 15th.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<u64> = rest
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse().ok())
                .collect();
            total += f.iter().sum::<u64>();
        }
        Duration::from_millis(total * 1000 / tick)
    }

    #[test]
    #[ignore]
    fn reconcile_bench() {
        own_netns();
        let sizes: Vec<usize> = std::env::var("HAVEN_BENCH_SAS")
            .ok()
            .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_else(|| vec![1_000, 10_000, 100_000]);
        for n in sizes {
            let dir = run_dir(&format!("bench-{n}"));
            let mut espd = Espd::with(dir.0.clone(), 1);
            let mut store = StateStore::new();
            for i in 0..n {
                store.apply(&tunnel(i));
                store.apply(&sa(i, 0x1000_0000 + i as u32));
            }
            let mut out = Outbox::new();
            let t = Instant::now();
            espd.on_replica_copy(DaemonKind::Ikemgr, store.clone(), &mut out);
            let first = t.elapsed();
            assert_eq!(espd.installed.len(), n, "{:?}", espd.failed.values().next());
            let rounds = 10u32;
            espd.linger = Duration::ZERO;
            let (mut add, mut del, mut gone, mut full) = Default::default();
            for r in 0..rounds as usize {
                let i = (r * 7919) % n;
                store.apply(&sa(i, 0x4000_0000 + r as u32));
                out.clear();
                let t = Instant::now();
                espd.on_replica_copy(DaemonKind::Ikemgr, store.clone(), &mut out);
                add += t.elapsed();
                store.apply(&Body::ChildSaRemoved {
                    tunnel: format!("vpn1_{i}"),
                    spi_in: 0x1000_0000 + i as u32,
                });
                let t = Instant::now();
                espd.on_replica_copy(DaemonKind::Ikemgr, store.clone(), &mut out);
                del += t.elapsed();
                // The tick that ends its lingering removes it.
                let t = Instant::now();
                espd.reconcile(Scope::waiting(), &mut out);
                gone += t.elapsed();
                assert!(espd.lingering.is_empty());
                // The reference: a reconcile of every SA, with nothing left to do.
                let t = Instant::now();
                espd.reconcile(Scope::All, &mut out);
                full += t.elapsed();
            }
            // The datapath's housekeeping thread with every SA idle: its CPU time over 2 s.
            let idle = {
                let before = thread_cpu("espd-housekeepi");
                std::thread::sleep(Duration::from_secs(2));
                thread_cpu("espd-housekeepi").saturating_sub(before)
            };
            let mean = |d: Duration| d / rounds;
            println!(
                "{n:>7} SAs: installed in {first:.2?}; a rekey: new SA {:.2?}, old SA handed over {:.2?}, removed {:.2?} (mean of {rounds}); reference, a reconcile of every SA with nothing to do {:.2?}",
                mean(add),
                mean(del),
                mean(gone),
                mean(full)
            );
            println!(
                "{n:>7} SAs idle: the housekeeping thread used {:.1} % of a core",
                idle.as_secs_f64() / 2.0 * 100.0
            );
            // Each publication made the workers' table whole before it was made from the
            // previous one and the changes.
            let dp = espd.dp.as_ref().expect("the datapath runs");
            let t = Instant::now();
            let whole = dp.whole_table();
            let build = t.elapsed();
            drop(whole);
            println!(
                "{n:>7} SAs: reference, the workers' table built whole {build:.2?} (what every install and removal cost before)"
            );
            drop(espd);
            drop(dir);
        }
    }
}
