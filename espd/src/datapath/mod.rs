//! The ESP datapath: IO and threads, driven by the daemon logic through [`Datapath`].
//!
//! - [`tun`]: one persistent TUN device per phase1-interface;
//! - [`offload`]: TSO segmentation and checksum completion for TUN reads;
//! - [`sockets`]: raw ESP, UDP/4500, the IKE hand-off unix sockets, batched IO;
//! - [`table`]: the read-mostly SA table (inbound by SPI, outbound by longest prefix);
//! - [`worker`]: the packet loops, one thread per core;
//! - [`seqstore`]: outbound sequence-number marks persisted before use;
//! - [`lifestore`]: per-SA age and counts persisted for a restart (written by the control side).
//!
//! Threads: `workers` packet threads, one housekeeping thread that extends sequence-number
//! leases (persisting the mark first) every [`HOUSEKEEPING`], and one thread relaying IKE
//! messages from ikemgr out of UDP/4500. The control side (the daemon's actor) installs and
//! removes SAs; each change builds a new [`table::Table`] and swaps it in.

pub mod lifestore;
pub mod offload;
pub mod seqstore;
pub mod sockets;
pub mod table;
pub mod tun;
pub mod worker;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bus_schema::schema::{ChildSaInfo, EspEncap};
use esp_proto::{AtomicSeq, EspCrypto, ReplayWindow, SaConfig, SaKeys, SeqLease, Transform};

use self::seqstore::SeqStore;
use self::sockets::Sockets;
use self::table::{Cidr, DirCounters, Peer, PeerCell, Sa, Table, NUM_DROPS};
use self::tun::TunDev;

/// Sequence numbers leased per persisted mark. The housekeeping thread extends the lease
/// when half of it is left, every [`HOUSEKEEPING`]: 2^19 numbers per 20 ms is 26 M packets/s
/// before a worker could run dry. A restart skips at most one block.
pub const SEQ_BLOCK: u64 = 1 << 20;
/// Housekeeping period.
pub const HOUSEKEEPING: Duration = Duration::from_millis(20);
/// Outer IPv4 (20) + UDP (8) headers, for the TUN MTU.
const OUTER_OVERHEAD: u32 = 28;
/// Outer IPv6 (40, RFC 8200 §3) + UDP (8) headers.
const OUTER_OVERHEAD_V6: u32 = 48;
/// Path MTU assumed for the outside interface.
const OUTER_MTU: u32 = 1500;

/// Errors of the datapath layer.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// A socket, device or file operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The SA as published cannot be installed.
    #[error("SA {key}: {reason}")]
    BadSa { key: String, reason: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Io { what, source }
}

/// State shared by the workers and the control side.
pub struct Shared {
    table: RwLock<Arc<Table>>,
    pub sockets: Sockets,
    pub stop: AtomicBool,
    /// Drops by reason (indices of [`table::DROP_LABELS`]), all SAs and none.
    pub drops: [AtomicU64; NUM_DROPS],
    pub keepalives: AtomicU64,
    pub ike_relayed: AtomicU64,
    pub ike_sent: AtomicU64,
    pub rx: DirCounters,
    pub tx: DirCounters,
    /// SPIs of ESP packets that found no SA, for the control side (FGSP promotion).
    pub unknown_spis: UnknownSpis,
}

/// The last few inbound SPIs that found no SA: a fixed ring written by the workers without
/// locks and drained by the control side (`UnknownSaTraffic` to hasyncd, which promotes a
/// tunnel it holds a standby copy of). SPI 0 is reserved (RFC 4303 §2.1) and marks a free
/// slot. A flood of random SPIs overwrites the ring; nothing grows.
#[derive(Default)]
pub struct UnknownSpis {
    slots: [std::sync::atomic::AtomicU32; UNKNOWN_SPI_SLOTS],
    next: std::sync::atomic::AtomicUsize,
}

/// Size of [`UnknownSpis`].
const UNKNOWN_SPI_SLOTS: usize = 16;

impl UnknownSpis {
    /// Notes one SPI (worker side).
    #[inline]
    pub fn record(&self, spi: u32) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % UNKNOWN_SPI_SLOTS;
        if let Some(s) = self.slots.get(i) {
            s.store(spi, Ordering::Relaxed);
        }
    }

    /// The distinct SPIs noted since the last call (control side).
    pub fn drain(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .slots
            .iter()
            .map(|s| s.swap(0, Ordering::Relaxed))
            .filter(|spi| *spi != 0)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl Shared {
    /// The current table (one read lock and one `Arc` clone).
    pub fn current(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    #[inline]
    pub fn count_drop(&self, reason: usize) {
        self.count_drops(reason, 1);
    }

    #[inline]
    pub fn count_drops(&self, reason: usize, n: usize) {
        if n > 0 {
            if let Some(c) = self.drops.get(reason) {
                c.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Where an SA being installed starts: when it was created and what it carried before
/// (see [`lifestore`]).
#[derive(Clone, Copy, Debug)]
pub struct Resume {
    /// When the SA was first installed (its age counts from here).
    pub created: Instant,
    /// Inbound counts carried before.
    pub rx: esp_proto::Counters,
    /// Outbound counts carried before.
    pub tx: esp_proto::Counters,
}

impl Resume {
    /// A new SA, created at `now`.
    pub fn new(now: Instant) -> Resume {
        Resume {
            created: now,
            rx: Default::default(),
            tx: Default::default(),
        }
    }
}

/// The running datapath.
pub struct Datapath {
    shared: Arc<Shared>,
    seqs: SeqStore,
    sas: BTreeMap<String, Arc<Sa>>,
    devices: HashMap<String, Arc<TunDev>>,
    generation: u64,
    /// Table publications are held ([`Datapath::hold_publish`]); one is due at the release.
    held: Option<bool>,
    workers: usize,
    threads: Vec<JoinHandle<()>>,
    /// New SAs wait for hasyncd's sequence lease before sending (`crate::ha`).
    ha_gating: bool,
    /// When the sequence marks were last pruned (None: not yet).
    pruned: Option<Instant>,
}

/// How often removing an SA also prunes old sequence marks.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

impl Datapath {
    /// Opens the sockets and starts `workers` packet threads plus housekeeping and the IKE
    /// relay.
    pub fn start(run_dir: &Path, workers: usize) -> Result<Datapath, DatapathError> {
        let workers = workers.max(1);
        let sockets = Sockets::open(run_dir, workers).map_err(io_err("sockets"))?;
        let seqs =
            SeqStore::open(run_dir).map_err(io_err(format!("{}/espd-seq", run_dir.display())))?;
        let shared = Arc::new(Shared {
            table: RwLock::new(Arc::new(Table::default())),
            sockets,
            stop: AtomicBool::new(false),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            keepalives: AtomicU64::new(0),
            ike_relayed: AtomicU64::new(0),
            ike_sent: AtomicU64::new(0),
            rx: DirCounters::default(),
            tx: DirCounters::default(),
            unknown_spis: UnknownSpis::default(),
        });
        let mut threads = Vec::new();
        for id in 0..workers {
            // The worker's buffers hold raw pointers for the kernel: build it on its thread.
            let shared = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("espd-worker-{id}"))
                .spawn(move || match worker::Worker::new(id, shared) {
                    Ok(w) => w.run(),
                    Err(e) => tracing::error!("worker {id} cannot start: {e}"),
                })
                .map_err(io_err("worker thread"))?;
            threads.push(h);
        }
        {
            let shared = shared.clone();
            let seqs = seqs.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("espd-housekeeping".into())
                    .spawn(move || housekeeping(&shared, &seqs))
                    .map_err(io_err("housekeeping thread"))?,
            );
        }
        {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("espd-ike-relay".into())
                    .spawn(move || ike_relay(&shared))
                    .map_err(io_err("IKE relay thread"))?,
            );
        }
        Ok(Datapath {
            shared,
            seqs,
            sas: BTreeMap::new(),
            devices: HashMap::new(),
            generation: 0,
            held: None,
            workers,
            threads,
            ha_gating: false,
            // Prune at the first removal: marks may have aged while espd was down.
            pruned: None,
        })
    }

    /// Whether SAs installed from now on send only below hasyncd's granted lease.
    pub fn set_ha_gating(&mut self, on: bool) {
        self.ha_gating = on;
    }

    /// Counters and drops shared with the workers.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Installed SAs by store key.
    pub fn sas(&self) -> &BTreeMap<String, Arc<Sa>> {
        &self.sas
    }

    /// The installed SAs of `tunnel` that send with `spi_out` (the store key starts with
    /// `<tunnel>/`, so one range of the ordered map, not a scan of every SA).
    pub fn sas_of<'a>(&'a self, tunnel: &str, spi_out: u32) -> impl Iterator<Item = &'a Arc<Sa>> {
        let prefix = format!("{tunnel}/");
        self.sas
            .range(prefix.clone()..)
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .map(|(_, sa)| sa)
            .filter(move |sa| sa.spi_out == spi_out)
    }

    /// Open TUN devices by phase1 name.
    pub fn devices(&self) -> &HashMap<String, Arc<TunDev>> {
        &self.devices
    }

    /// Holds back the table publications of the installs and removals that follow until
    /// [`Datapath::release_publish`], which publishes once: a reconcile that installed 20
    /// SAs of 1 000 built the workers' table 20 times (its hashing was the largest share of
    /// espd's time in a 1 000-tunnel soak). SA state is not held: a removed SA is marked
    /// dead at once, and the flags and peers are the SAs' own.
    pub fn hold_publish(&mut self) {
        self.held.get_or_insert(false);
    }

    /// Publishes the table if an install or removal was held back since
    /// [`Datapath::hold_publish`].
    pub fn release_publish(&mut self) {
        if self.held.take() == Some(true) {
            self.publish();
        }
    }

    fn publish(&mut self) {
        if let Some(due) = self.held.as_mut() {
            *due = true;
            return;
        }
        self.generation += 1;
        let t = Table::build(self.generation, self.sas.values().cloned(), &self.devices);
        *self.shared.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(t);
    }

    /// Installs (or replaces) a CHILD SA pair, created at `resume.created` and having
    /// carried `resume`'s counts already (a restarted espd taking its SAs back; zero and
    /// now for a new SA).
    pub fn install(&mut self, info: &ChildSaInfo, resume: &Resume) -> Result<(), DatapathError> {
        let key = ChildSaInfo::key_of(&info.tunnel, info.spi_in);
        let sa = self.build_sa(&key, info, resume)?;
        self.sas.insert(key, Arc::new(sa));
        self.publish();
        Ok(())
    }

    /// Flips an installed SA's outbound flag (make-before-break) without touching its state.
    pub fn set_outbound(&mut self, key: &str, outbound: bool) -> bool {
        match self.sas.get(key) {
            Some(sa) => {
                sa.outbound.store(outbound, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Points an installed UDP-encapsulated SA at `to` (ikemgr followed the peer's NAT
    /// mapping), keeping its state. False for an unknown or raw SA.
    pub fn set_peer(&mut self, key: &str, to: SocketAddr) -> bool {
        match self.sas.get(key) {
            Some(sa) if sa.peer.get() != Peer::Udp(to) => sa.peer.move_udp(to),
            Some(_) => true,
            None => false,
        }
    }

    /// Removes an SA. Its persisted sequence mark stays (the same SA may be installed again
    /// and must resume above it; see [`seqstore`]) unless a rekey `replaced` it (it never
    /// comes back); marks of SAs long gone are pruned here, at most once per
    /// [`PRUNE_EVERY`]. Its device stays: see [`Datapath::prune_devices`].
    pub fn remove(&mut self, key: &str, replaced: bool) -> Option<Arc<Sa>> {
        let sa = self.sas.remove(key)?;
        sa.dead.store(true, Ordering::Relaxed);
        self.publish();
        if replaced {
            self.seqs.forget(&sa.tunnel, sa.spi_out);
        }
        if self.pruned.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            self.prune_seq_marks();
        }
        Some(sa)
    }

    /// Deletes the sequence marks of SAs not installed and untouched for
    /// [`seqstore::RETAIN`].
    fn prune_seq_marks(&mut self) {
        self.pruned = Some(Instant::now());
        let installed = self
            .sas
            .values()
            .map(|s| seqstore::sa_file_name(&s.tunnel, s.spi_out))
            .collect();
        let gone = self
            .seqs
            .prune(std::time::SystemTime::now(), seqstore::RETAIN, &installed);
        if gone > 0 {
            tracing::info!("pruned {gone} sequence marks of SAs gone for more than 2 days");
        }
    }

    /// Deletes the TUN devices that no SA uses and whose phase1 is not in `keep` (the
    /// tunnels ikemgr still has: their routes point at the device).
    pub fn prune_devices(&mut self, keep: &std::collections::BTreeSet<String>) {
        let unused: Vec<String> = self
            .devices
            .keys()
            .filter(|d| !keep.contains(*d) && !self.sas.values().any(|s| &s.phase1 == *d))
            .cloned()
            .collect();
        if unused.is_empty() {
            return;
        }
        for d in unused {
            if let Some(dev) = self.devices.remove(&d) {
                dev.unpersist();
                tracing::info!("{d}: TUN device deleted");
            }
        }
        self.publish();
    }

    /// Opens (or re-attaches to) the TUN device of `phase1` before it has an SA, so that
    /// routes through it can exist while the tunnel waits for traffic (traffic-triggered
    /// negotiation). Its MTU fits the largest ESP overhead of any transform and the outer
    /// headers of the phase1's family (`ipv6`). Kept while `phase1` is in
    /// [`Datapath::prune_devices`]'s `keep` set.
    pub fn ensure_device(&mut self, phase1: &str, ipv6: bool) -> Result<(), DatapathError> {
        if self.devices.contains_key(phase1) {
            return Ok(());
        }
        let widest = Transform::all()
            .into_iter()
            .max_by_key(|t| t.max_overhead())
            .ok_or_else(|| DatapathError::BadSa {
                key: phase1.to_string(),
                reason: "no transform".into(),
            })?;
        let outer = if ipv6 {
            OUTER_OVERHEAD_V6
        } else {
            OUTER_OVERHEAD
        };
        self.device(phase1, widest, outer)?;
        self.publish();
        Ok(())
    }

    /// The TUN device of `phase1`, opened with the MTU that fits `transform`'s ESP overhead
    /// and `outer` bytes of outer headers if it is new.
    fn device(
        &mut self,
        phase1: &str,
        transform: Transform,
        outer: u32,
    ) -> Result<Arc<TunDev>, DatapathError> {
        if let Some(d) = self.devices.get(phase1) {
            return Ok(d.clone());
        }
        let mtu = OUTER_MTU - outer - transform.max_overhead() as u32;
        let dev =
            Arc::new(TunDev::open(phase1, mtu).map_err(io_err(format!("TUN device {phase1}")))?);
        tracing::info!("{}: TUN device up, mtu {mtu}", dev.name());
        self.devices.insert(phase1.to_string(), dev.clone());
        Ok(dev)
    }

    fn build_sa(
        &mut self,
        key: &str,
        info: &ChildSaInfo,
        resume: &Resume,
    ) -> Result<Sa, DatapathError> {
        let now = resume.created;
        let bad = |reason: &str| DatapathError::BadSa {
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let transform = Transform::from_name(&info.transform)
            .ok_or_else(|| bad(&format!("unknown transform {:?}", info.transform)))?;
        let parse_ts = |v: &[String]| -> Result<Vec<Cidr>, DatapathError> {
            v.iter()
                .map(|s| Cidr::parse(s).ok_or_else(|| bad(&format!("bad selector {s:?}"))))
                .collect()
        };
        let local_ts = parse_ts(&info.local_ts)?;
        let remote_ts = parse_ts(&info.remote_ts)?;
        let remote: IpAddr = match info.remote.parse::<IpAddr>() {
            Ok(a) if !a.is_unspecified() => a,
            _ => {
                return Err(bad(&format!(
                    "remote gateway {:?} is not an IPv4 or IPv6 address",
                    info.remote
                )))
            }
        };
        // The source of every outbound packet: the local gateway address, of the remote's
        // family; unset (0.0.0.0 or ::) lets the kernel pick.
        let local_ip = match (info.local.parse::<IpAddr>(), remote) {
            (Ok(l @ IpAddr::V4(_)), IpAddr::V4(_)) | (Ok(l @ IpAddr::V6(_)), IpAddr::V6(_)) => l,
            (Ok(l), _) if !l.is_unspecified() => {
                return Err(bad(&format!(
                    "local gateway {} and remote gateway {remote} are of different families",
                    info.local
                )))
            }
            (_, IpAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (_, IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let peer = match info.encap {
            EspEncap::None => Peer::Raw(remote),
            EspEncap::Udp { remote_port, .. } => Peer::Udp(SocketAddr::new(remote, remote_port)),
        };
        let l = info.lifetime;
        let opt = |v: u64| (v > 0).then_some(v);
        let lifetime = esp_proto::LifetimeConfig {
            soft_bytes: opt(l.soft_bytes),
            hard_bytes: opt(l.hard_bytes),
            soft_packets: None,
            hard_packets: None,
            soft_time: opt(l.soft_secs).map(Duration::from_secs),
            hard_time: opt(l.hard_secs).map(Duration::from_secs),
        };
        let cfg = |spi| SaConfig {
            spi,
            transform,
            esn: info.esn,
            lifetime,
        };
        let keys_in = SaKeys::split(transform, &info.keys_in)
            .map_err(|e| bad(&format!("inbound keys: {e}")))?;
        let keys_out = SaKeys::split(transform, &info.keys_out)
            .map_err(|e| bad(&format!("outbound keys: {e}")))?;
        let mut dec = Vec::with_capacity(self.workers);
        let mut enc = Vec::with_capacity(self.workers);
        for _ in 0..self.workers {
            dec.push(Mutex::new(
                EspCrypto::new(&cfg(info.spi_in), keys_in, false)
                    .map_err(|e| bad(&e.to_string()))?,
            ));
            enc.push(Mutex::new(
                EspCrypto::new(&cfg(info.spi_out), keys_out, true)
                    .map_err(|e| bad(&e.to_string()))?,
            ));
        }
        let replay =
            ReplayWindow::new(info.replay_window, info.esn).map_err(|e| bad(&e.to_string()))?;

        // Sequence numbers: resume above anything that may have been sent before a crash,
        // and persist the first lease before the SA can send anything.
        let persisted = self.seqs.load(&info.tunnel, info.spi_out);
        let first = info.initial_seq.max(persisted).max(1);
        let mut lease = SeqLease::new(SEQ_BLOCK, first).map_err(|e| bad(&e.to_string()))?;
        let mut granted = first;
        if let Some(hw) = lease.poll_persist(first) {
            self.seqs
                .store(&info.tunnel, info.spi_out, hw)
                .map_err(io_err("persisting sequence mark"))?;
            lease.persisted(hw);
            granted = hw;
        }
        // In a cluster nothing is sent until hasyncd granted a lease (crate::ha).
        let ha_hw = if self.ha_gating { first } else { u64::MAX };
        let seq = AtomicSeq::new(first, info.esn, Some(granted.min(ha_hw)))
            .map_err(|e| bad(&e.to_string()))?;
        if persisted > info.initial_seq {
            tracing::info!(
                "{key}: outbound SPI {:08x} resumes at sequence {first} (persisted mark)",
                info.spi_out
            );
        }
        let outer = if remote.is_ipv6() {
            OUTER_OVERHEAD_V6
        } else {
            OUTER_OVERHEAD
        };
        let tun = self.device(&info.phase1, transform, outer)?;
        Ok(Sa {
            key: key.to_string(),
            tunnel: info.tunnel.clone(),
            phase1: info.phase1.clone(),
            phase2: info.phase2.clone(),
            spi_in: info.spi_in,
            spi_out: info.spi_out,
            transform,
            esn: info.esn,
            local: info.local.clone(),
            peer: PeerCell::new(peer),
            peer_moves: AtomicU64::new(0),
            local_ts,
            remote_ts,
            tun,
            installed: now,
            replay_size: info.replay_window,
            dec: dec.into_boxed_slice(),
            enc: enc.into_boxed_slice(),
            replay: Mutex::new(replay),
            seq,
            lease: Mutex::new(lease),
            outbound: AtomicBool::new(info.outbound),
            dead: AtomicBool::new(false),
            hard_bytes: opt(l.hard_bytes).unwrap_or(u64::MAX),
            hard_packets: u64::MAX,
            hard_deadline_ns: opt(l.hard_secs)
                .map(|s| {
                    haven_daemon::now_ns()
                        .saturating_sub(now.elapsed().as_nanos() as u64)
                        .saturating_add(s.saturating_mul(1_000_000_000))
                })
                .unwrap_or(u64::MAX),
            rx: DirCounters::starting_at(resume.rx),
            tx: DirCounters::starting_at(resume.tx),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            ha_hw: AtomicU64::new(ha_hw),
            local_ip,
        })
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Extends sequence-number leases: persist the next mark, then let the workers use it.
fn housekeeping(shared: &Shared, seqs: &SeqStore) {
    let mut failing = false;
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(HOUSEKEEPING);
        let table = shared.current();
        for sa in table.by_spi.values() {
            // A removed SA sends nothing more (and a replaced one's mark is deleted).
            if sa.dead.load(Ordering::Relaxed) {
                continue;
            }
            let mut lease = sa.lease.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hw) = lease.poll_persist(sa.seq.next()) {
                match seqs.store(&sa.tunnel, sa.spi_out, hw) {
                    Ok(()) => {
                        lease.persisted(hw);
                        sa.seq.grant(hw.min(sa.ha_hw.load(Ordering::Acquire)));
                        failing = false;
                    }
                    Err(e) => {
                        // Workers stop sending on this SA once its lease runs out (counted
                        // as seq_lease drops); say so once, not every 20 ms.
                        if !failing {
                            tracing::error!("{}: cannot persist sequence mark: {e}", sa.key);
                        }
                        failing = true;
                    }
                }
            }
        }
    }
}

/// Sends ikemgr's IKE messages out of UDP/4500.
fn ike_relay(shared: &Shared) {
    let mut buf = vec![0u8; 65_536];
    let mut out = vec![0u8; 65_536 + 4];
    while !shared.stop.load(Ordering::Relaxed) {
        match shared.sockets.relay_from_ikemgr(&mut buf, &mut out) {
            Ok(true) => {
                shared.ike_sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => {
                shared.count_drop(table::DROP_IKE_RELAY);
                tracing::debug!("IKE message from ikemgr not sent: {e}");
            }
        }
    }
}
