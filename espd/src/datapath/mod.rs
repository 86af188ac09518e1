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
//! removes SAs; each change makes the next [`table::Table`] from the previous one (shared
//! shards, only the changed devices' routes) and swaps it in.

mod journal;
pub mod lifestore;
pub mod offload;
pub mod routes;
pub mod seqstore;
pub mod shards;
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
use self::table::{Changes, Cidr, DirCounters, Peer, PeerCell, Sa, Table, NUM_DROPS};
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
    /// IKE messages from UDP/4500 on their way to ikemgr (the workers never wait for it).
    pub ike_queue: IkeQueue,
    pub ike_relayed: AtomicU64,
    pub ike_sent: AtomicU64,
    pub rx: DirCounters,
    pub tx: DirCounters,
    /// SPIs of ESP packets that found no SA, for the control side (FGSP promotion).
    pub unknown_spis: UnknownSpis,
}

/// The workers' queue of IKE hand-offs to ikemgr, emptied by the hand-off thread
/// ([`ike_handoff`]). ikemgr takes only a few datagrams at a time from its unix socket (the
/// kernel's `net.unix.max_dgram_qlen`, 10 by default), and a worker must not wait for it: a
/// burst of IKE on UDP/4500 (a client deleting or rekeying many SAs at once) waits here
/// instead of being dropped. Bounded in messages and bytes; beyond either, or with no
/// hand-off thread, a message is dropped and counted (`ike_relay`).
pub struct IkeQueue {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    /// Bytes queued and not yet taken by the hand-off thread.
    pending: std::sync::atomic::AtomicUsize,
}

/// Most IKE messages [`IkeQueue`] holds.
pub const IKE_QUEUE_MESSAGES: usize = 4096;
/// Most bytes [`IkeQueue`] holds (a flood of large datagrams stops here, not at 4096 x 64 KiB).
pub const IKE_QUEUE_BYTES: usize = 4 << 20;

impl IkeQueue {
    /// A queue and the receiving end for the hand-off thread.
    pub fn new() -> (IkeQueue, std::sync::mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(IKE_QUEUE_MESSAGES);
        let q = IkeQueue {
            tx,
            pending: std::sync::atomic::AtomicUsize::new(0),
        };
        (q, rx)
    }

    /// Queues one hand-off datagram; false if it was refused (the queue is full, or the
    /// hand-off thread is gone): the caller counts the drop.
    pub fn push(&self, msg: Vec<u8>) -> bool {
        let n = msg.len();
        if self.pending.fetch_add(n, Ordering::AcqRel) + n > IKE_QUEUE_BYTES {
            self.pending.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        if self.tx.try_send(msg).is_err() {
            self.pending.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// The hand-off thread took a message of `n` bytes off the queue.
    fn taken(&self, n: usize) {
        self.pending.fetch_sub(n, Ordering::AcqRel);
    }
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

/// The entries of `map` (keyed `<tunnel>/<spi_in>`, as the store keys CHILD SAs) that belong
/// to `tunnel`: one range of the ordered map, not a scan.
pub fn of_tunnel<'a, V>(
    map: &'a BTreeMap<String, V>,
    tunnel: &str,
) -> impl Iterator<Item = (&'a String, &'a V)> {
    let prefix = format!("{tunnel}/");
    map.range(prefix.clone()..)
        .take_while(move |(k, _)| k.starts_with(&prefix))
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
    /// The same SAs per phase1 (a device's routes; whether a device is in use).
    by_phase1: HashMap<String, BTreeMap<String, Arc<Sa>>>,
    /// The peer address each SA is counted under in the table's peer set (where it was
    /// installed, or where ikemgr last pointed it).
    peer_of: HashMap<String, IpAddr>,
    /// What changed since the last publication ([`Table::next`]).
    changes: Changes,
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
    /// SAs installed since the last publication, with the first lease appended for each
    /// (granted by [`Datapath::persist_staged`]).
    staged: Vec<(Arc<Sa>, u64)>,
}

/// How often removing an SA also prunes old sequence marks.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

impl Datapath {
    /// Opens the sockets and starts `workers` packet threads plus housekeeping and the IKE
    /// relay.
    pub fn start(run_dir: &Path, workers: usize) -> Result<Datapath, DatapathError> {
        let workers = workers.max(1);
        let sockets = Sockets::open(run_dir, workers).map_err(io_err("sockets"))?;
        let (ike_queue, ike_rx) = IkeQueue::new();
        let seqs =
            SeqStore::open(run_dir).map_err(io_err(format!("{}/espd-seq", run_dir.display())))?;
        let shared = Arc::new(Shared {
            table: RwLock::new(Arc::new(Table::default())),
            sockets,
            stop: AtomicBool::new(false),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            keepalives: AtomicU64::new(0),
            ike_queue,
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
                    .name("espd-ike-handoff".into())
                    .spawn(move || ike_handoff(&shared, &ike_rx))
                    .map_err(io_err("IKE hand-off thread"))?,
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
            by_phase1: HashMap::new(),
            peer_of: HashMap::new(),
            changes: Changes::default(),
            devices: HashMap::new(),
            generation: 0,
            held: None,
            workers,
            threads,
            ha_gating: false,
            // Prune at the first removal: marks may have aged while espd was down.
            pruned: None,
            staged: Vec::new(),
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
        self.sas_of_tunnel(tunnel)
            .filter(move |sa| sa.spi_out == spi_out)
    }

    /// The installed SAs of `tunnel` (one range of the ordered map).
    pub fn sas_of_tunnel<'a>(&'a self, tunnel: &str) -> impl Iterator<Item = &'a Arc<Sa>> {
        of_tunnel(&self.sas, tunnel).map(|(_, sa)| sa)
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
        self.persist_staged();
        self.generation += 1;
        let changes = std::mem::take(&mut self.changes);
        let t =
            self.shared
                .current()
                .next(self.generation, &changes, &self.by_phase1, &self.devices);
        #[cfg(debug_assertions)]
        self.check_against_whole(&t);
        *self.shared.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(t);
    }

    /// The table built whole from the installed SAs, the addresses their peers are
    /// counted under and the open devices: what every [`Table::next`] must equal.
    #[cfg(any(test, debug_assertions))]
    pub fn whole_table(&self) -> Table {
        Table::build(
            self.generation,
            self.sas.iter().map(|(k, sa)| {
                (
                    sa.clone(),
                    self.peer_of.get(k).copied().unwrap_or(sa.peer.get().ip()),
                )
            }),
            &self.devices,
        )
    }

    /// Debug builds (the tests) check every publication against the whole build.
    #[cfg(debug_assertions)]
    fn check_against_whole(&self, t: &Table) {
        if let Err(e) = t.same_as(&self.whole_table()) {
            panic!("the table made from the changes differs from the whole build: {e}");
        }
    }

    /// Syncs the first leases of the SAs installed since the last publication, and the
    /// marks of replaced SAs forgotten meanwhile (one `fdatasync` for all of them), and
    /// lets each new SA send below its lease. If the sync fails they send nothing until
    /// housekeeping has stored their leases (it retries every [`HOUSEKEEPING`]).
    fn persist_staged(&mut self) {
        if self.staged.is_empty() && !self.seqs.pending() {
            return;
        }
        match self.seqs.sync() {
            Ok(()) => {
                for (sa, hw) in self.staged.drain(..) {
                    sa.lease
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .persisted(hw);
                    sa.seq.grant(hw.min(sa.ha_hw.load(Ordering::Acquire)));
                }
            }
            Err(e) => {
                tracing::error!(
                    "cannot persist the sequence marks of {} new SAs: {e}; they send once housekeeping has stored them",
                    self.staged.len()
                );
                self.staged.clear();
            }
        }
    }

    /// Installs (or replaces) a CHILD SA pair, created at `resume.created` and having
    /// carried `resume`'s counts already (a restarted espd taking its SAs back; zero and
    /// now for a new SA).
    pub fn install(&mut self, info: &ChildSaInfo, resume: &Resume) -> Result<(), DatapathError> {
        let key = ChildSaInfo::key_of(&info.tunnel, info.spi_in);
        let (sa, first_lease) = self.build_sa(&key, info, resume)?;
        let sa = Arc::new(sa);
        if let Some(hw) = first_lease {
            self.staged.push((sa.clone(), hw));
        }
        let ip = sa.peer.get().ip();
        if let Some(old) = self.sas.insert(key.clone(), sa.clone()) {
            self.forget(&key, old);
        }
        self.peer_of.insert(key.clone(), ip);
        self.by_phase1
            .entry(sa.phase1.clone())
            .or_default()
            .insert(key, sa.clone());
        self.changes.phase1s.insert(sa.phase1.clone());
        self.changes.installed.push((sa, ip));
        self.publish();
        Ok(())
    }

    /// `old` left the table under `key` (removed, or replaced): noted for the next
    /// publication.
    fn forget(&mut self, key: &str, old: Arc<Sa>) {
        let ip = self
            .peer_of
            .remove(key)
            .unwrap_or_else(|| old.peer.get().ip());
        if let Some(m) = self.by_phase1.get_mut(&old.phase1) {
            m.remove(key);
            if m.is_empty() {
                self.by_phase1.remove(&old.phase1);
            }
        }
        self.changes.phase1s.insert(old.phase1.clone());
        self.changes.removed.push((old, ip));
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
        let moved = match self.sas.get(key) {
            Some(sa) if sa.peer.get() != Peer::Udp(to) => sa.peer.move_udp(to),
            Some(_) => return true,
            None => return false,
        };
        if moved {
            // Counted under the new address from the next publication on.
            if let Some(ip) = self.peer_of.get_mut(key) {
                if *ip != to.ip() {
                    self.changes.moved.push((*ip, to.ip()));
                    *ip = to.ip();
                }
            }
        }
        moved
    }

    /// Removes an SA. Its persisted sequence mark stays (the same SA may be installed again
    /// and must resume above it; see [`seqstore`]) unless a rekey `replaced` it (it never
    /// comes back); marks of SAs long gone are pruned here, at most once per
    /// [`PRUNE_EVERY`]. Its device stays: see [`Datapath::prune_devices`].
    pub fn remove(&mut self, key: &str, replaced: bool) -> Option<Arc<Sa>> {
        let sa = self.sas.remove(key)?;
        sa.dead.store(true, Ordering::Relaxed);
        self.forget(key, sa.clone());
        if replaced {
            // Written with the publication (one sync for the batch).
            self.seqs.forget(&sa.tunnel, sa.spi_out);
        }
        self.publish();
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
            .filter(|d| !keep.contains(*d) && !self.by_phase1.contains_key(*d))
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
    ) -> Result<(Sa, Option<u64>), DatapathError> {
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

        // Sequence numbers: resume above anything that may have been sent before a crash.
        // The first lease is appended to the journal here and granted once it is synced,
        // with every other SA of this batch, before the table that holds them is published
        // (`persist_staged`): until then the SA sends nothing.
        let persisted = self.seqs.load(&info.tunnel, info.spi_out);
        let first = info.initial_seq.max(persisted).max(1);
        let mut lease = SeqLease::new(SEQ_BLOCK, first).map_err(|e| bad(&e.to_string()))?;
        let first_lease = lease.poll_persist(first);
        if let Some(hw) = first_lease {
            self.seqs.append(&info.tunnel, info.spi_out, hw);
        }
        // In a cluster nothing is sent until hasyncd granted a lease (crate::ha).
        let ha_hw = if self.ha_gating { first } else { u64::MAX };
        let seq = AtomicSeq::new(first, info.esn, Some(first.min(ha_hw)))
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
        let sa = Sa {
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
        };
        Ok((sa, first_lease))
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

/// Extends sequence-number leases: persist the next marks (one sync for every SA due),
/// then let the workers use them.
fn housekeeping(shared: &Shared, seqs: &SeqStore) {
    let mut failing = false;
    let mut due: Vec<(Arc<Sa>, u64)> = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(HOUSEKEEPING);
        let table = shared.current();
        for sa in table.by_spi.values() {
            // A removed SA sends nothing more (and a replaced one's mark is deleted).
            if sa.dead.load(Ordering::Relaxed) {
                continue;
            }
            // More than half a block left below the mark the workers may use: no extension
            // is due (the lease's own mark is never below that one), and a mark whose sync
            // failed is due again only once fewer are left. An idle SA costs two loads, not
            // its lease's lock (100 000 SAs: most of this thread's time).
            if sa.seq.granted().saturating_sub(sa.seq.next()) > SEQ_BLOCK / 2 {
                continue;
            }
            let hw = sa
                .lease
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .poll_persist(sa.seq.next());
            if let Some(hw) = hw {
                seqs.append(&sa.tunnel, sa.spi_out, hw);
                due.push((sa.clone(), hw));
            }
        }
        if due.is_empty() {
            continue;
        }
        match seqs.sync() {
            Ok(()) => {
                for (sa, hw) in due.drain(..) {
                    sa.lease
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .persisted(hw);
                    sa.seq.grant(hw.min(sa.ha_hw.load(Ordering::Acquire)));
                }
                failing = false;
            }
            Err(e) => {
                // Workers stop sending on these SAs once their leases run out (counted as
                // seq_lease drops); say so once, not every 20 ms.
                if !failing {
                    tracing::error!(
                        "cannot persist the sequence marks of {} SAs (first {}): {e}",
                        due.len(),
                        due[0].0.key
                    );
                }
                failing = true;
                due.clear();
            }
        }
    }
}

/// Hands the IKE messages the workers queued to ikemgr, each waiting up to
/// [`sockets::IKE_HANDOFF_WAIT`] for room in ikemgr's socket.
fn ike_handoff(shared: &Shared, rx: &std::sync::mpsc::Receiver<Vec<u8>>) {
    handoff_loop(
        &shared.ike_queue,
        rx,
        &shared.sockets.ike_out,
        &shared.stop,
        |ok| {
            if ok {
                shared.ike_relayed.fetch_add(1, Ordering::Relaxed);
            } else {
                shared.count_drop(table::DROP_IKE_RELAY);
            }
        },
    );
}

/// [`ike_handoff`]'s loop: until `stop`, or the queue's sending side is gone; `sent(true)`
/// for each message handed over, `sent(false)` for each that could not be.
fn handoff_loop(
    queue: &IkeQueue,
    rx: &std::sync::mpsc::Receiver<Vec<u8>>,
    out: &sockets::IkeHandoffSocket,
    stop: &AtomicBool,
    mut sent: impl FnMut(bool),
) {
    use std::sync::mpsc::RecvTimeoutError;
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(msg) => {
                queue.taken(msg.len());
                match out.send(&msg) {
                    Ok(()) => sent(true),
                    Err(e) => {
                        sent(false);
                        tracing::debug!("IKE message not handed to ikemgr: {e}");
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// A burst of IKE messages many times the kernel's unix datagram queue (10 by default)
    /// reaches an ikemgr that is slow to read, all of them, in order: the workers queue them
    /// and the hand-off thread waits for room instead of dropping. (Found in the soak: a
    /// client deleting 20 tunnels at once lost its answers to DPD probes here.)
    #[test]
    fn a_burst_of_ike_waits_for_a_slow_ikemgr_instead_of_being_dropped() {
        let dir = std::env::temp_dir().join(format!("espd-handoff-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ike4500.sock");
        let ikemgr = UnixDatagram::bind(&path).unwrap();
        let out = sockets::IkeHandoffSocket::open(&path).unwrap();
        let (queue, rx) = IkeQueue::new();
        const BURST: usize = 200;
        let from: std::net::SocketAddr = "192.0.2.7:4500".parse().unwrap();
        for i in 0..BURST {
            let ike = (i as u32).to_be_bytes();
            assert!(
                queue.push(Sockets::ike_handoff(from, None, &ike)),
                "message {i}"
            );
        }
        let stop = AtomicBool::new(false);
        let (queue, out, stop) = (&queue, &out, &stop);
        let (got, (ok, failed)) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                // ikemgr busy elsewhere: it reads only after the burst is queued.
                std::thread::sleep(Duration::from_millis(100));
                ikemgr
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 64];
                while got.len() < BURST {
                    let Ok(n) = ikemgr.recv(&mut buf) else { break };
                    got.push(buf[sockets::IKE_HDR_LEN..n].to_vec());
                }
                got
            });
            let handoff = s.spawn(move || {
                let (mut ok, mut failed) = (0usize, 0usize);
                handoff_loop(queue, &rx, out, stop, |sent| {
                    if sent {
                        ok += 1
                    } else {
                        failed += 1
                    }
                });
                (ok, failed)
            });
            let got = reader.join().unwrap();
            stop.store(true, Ordering::Relaxed);
            (got, handoff.join().unwrap())
        });
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!((ok, failed), (BURST, 0));
        let want: Vec<Vec<u8>> = (0..BURST as u32)
            .map(|i| i.to_be_bytes().to_vec())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn the_ike_queue_refuses_beyond_its_byte_budget_and_frees_what_is_taken() {
        let (queue, rx) = IkeQueue::new();
        let big = vec![0u8; 60_000];
        let fit = IKE_QUEUE_BYTES / big.len();
        for i in 0..fit {
            assert!(queue.push(big.clone()), "message {i}");
        }
        assert!(!queue.push(big.clone()), "over the byte budget");
        let m = rx.recv().unwrap();
        queue.taken(m.len());
        assert!(queue.push(big.clone()), "room again once one was taken");
        drop(rx);
        assert!(!queue.push(vec![1]), "no hand-off thread");
    }
}
