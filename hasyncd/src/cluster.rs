//! The daemon side of the HA links: sockets, keys and counters around ha-core.
//!
//! [`Cluster::drive`] runs on every daemon tick with `now_ms`: it drains the sockets,
//! opens each datagram with ha-core's `HaLink` (drops counted by reason), feeds heartbeats
//! to the FGCP election (`Fgcp`) or to FGSP peer liveness (`Liveness`), then sends what is
//! due. Election and role decisions stay in ha-core; this module only moves bytes and
//! counts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use std::collections::{BTreeMap, BTreeSet};

use bus_schema::schema::{
    ike_mid_mark_spi, is_ike_mid_mark, IkeSaRecord, LifetimeLeft, SeqMark, TakeoverInfo,
    UnknownSaTraffic,
};
use ha_core::fgsp::{StartSeq, DEFAULT_UNSYNCED_JUMP};
use ha_core::msg::{ChildSaSync, DeleteSync, HaRole, Heartbeat, IkeSaSync, KeyBytes, SeqLeaseAck};
use ha_core::{
    ClusterKind, ElectionEvent, Fgcp, FgcpConfig, HaLink, LinkKey, Liveness, MemberId, Message,
    Outgoing, PeerEvent, TableMode, TunnelEvent, TunnelRole, TunnelTable,
};
use haven_config::Config;
use serde_json::{json, Value};

use crate::io::{hw_addr, LinkIdentity, LinkSocket, FGCP_PORT};

mod epochs;
mod hbpump;
pub use epochs::EpochStore;
mod resync;
mod snapshot;

/// A member that leaves its hello phase is sent the primary's claims and marks again
/// (`TunnelTable::resync_peer`, two datagrams per tunnel); above this many tunnels it gets
/// a snapshot instead (the same records, windowed, in a few large datagrams).
const RESYNC_BY_SNAPSHOT: usize = 256;

/// At most how often the IKE SAs a member held when it turned secondary are sent to the
/// primary ([`Cluster::hand_ike_sas_to`]), a heartbeat interval apart, while the primary's
/// stream does not show it holds them.
const IKE_HANDOVER_SENDS: u8 = 20;

/// The IKE SAs a member held when it turned secondary, still to be sent to the primary
/// ([`Cluster::hand_ike_sas_to`]).
struct IkeHandover {
    to: MemberId,
    msgs: Vec<Message>,
    sends_left: u8,
    next_ms: u64,
}

/// Local records changed at once above which the peers may get a snapshot instead of one
/// datagram per record ([`Cluster::send_sync_or_snapshot`]).
const BULK_BY_SNAPSHOT: usize = 256;

/// Changed records still sent one datagram each when they are fewer than half of what a
/// snapshot would carry ([`Cluster::send_sync_or_snapshot`]): some 40 ms of sealing.
const BULK_SEND_MAX: usize = 4096;

/// Records handled between two heartbeat checks in a long loop (`Cluster::keep_heartbeats`).
const HEARTBEAT_CHECK_EVERY: usize = 4096;

/// FGCP primary: `reclaim_stale` runs at least this often besides its triggers
/// (`Cluster::reclaim_due`).
const RECLAIM_EVERY_MS: u64 = 1_000;

/// FGSP peers kept per cluster member from its heartbeats (a cluster has a handful).
const MAX_FGSP_PEERS_ANNOUNCED: usize = 64;

/// FGSP heartbeat period and loss time of a link: the shortest `hb-interval` of its
/// `cluster-peer`s, and the longest `hb-interval` x `hb-lost-threshold` (no peer is lost
/// sooner than its own keys say). Defaults 200 ms and 1.2 s (2 x 100 ms, 6 beats).
fn fgsp_timing(peers: &[haven_config::ClusterPeer]) -> (u64, u64) {
    let hb = peers
        .iter()
        .map(|p| u64::from(p.hb_interval_ms()))
        .min()
        .unwrap_or(200)
        .max(1);
    let lost = peers
        .iter()
        .map(|p| u64::from(p.lost_after_ms()))
        .max()
        .unwrap_or(1_200)
        .max(hb);
    (hb, lost)
}

/// FGCP side: one heartbeat device.
struct FgcpSide {
    sock: LinkSocket,
    dest: SocketAddr,
    /// Shared with the heartbeat pump.
    link: hbpump::SharedLink,
    /// Sends the heartbeats while the tick is late (None: its thread did not start).
    pump: Option<hbpump::HeartbeatPump>,
    fgcp: Fgcp,
    group_id: u16,
    session_pickup: bool,
    hostname: String,
    hbdev: String,
    /// Serial numbers and host names of members heard (for the status view).
    hostnames: std::collections::BTreeMap<MemberId, String>,
    ha_id_changes: u64,
    /// Each peer's role as last announced.
    peer_roles: BTreeMap<MemberId, HaRole>,
    /// Peers that just announced `secondary` (they heard this member).
    now_secondary: Vec<MemberId>,
    /// A peer that announced `primary` announces something else now (it stepped down after
    /// a split brain, during which it held and announced the shared addresses).
    stepped_down: bool,
    /// A peer announced another role than before (for `Cluster::reclaim_due`).
    peer_role_changed: bool,
    /// Where each member was last heard from (snapshots are sent there, unicast).
    addrs: BTreeMap<MemberId, SocketAddr>,
    /// Link counters heard per member: lost sync datagrams ([`resync`]).
    loss: resync::LossWatch,
    /// Members heard with a new epoch (they started, or restarted faster than the loss
    /// detection), for a snapshot.
    restarted: Vec<MemberId>,
    /// The role `Cluster::drive` last reported: a reload applied in place
    /// (`reconfigure_in_place`) re-elects outside `drive`, and its role change must still
    /// be reported (shared addresses, roles published).
    reported_role: HaRole,
    /// The FGSP epoch this member speaks for the cluster under, announced in its
    /// heartbeats (0: it does not speak).
    fgsp_epoch_out: u64,
    /// The highest FGSP epoch a cluster member announced: the next one this member takes
    /// is above it.
    fgsp_epoch_heard: u64,
    /// The FGSP peers this member hears while it speaks for the cluster, announced in its
    /// heartbeats.
    fgsp_peers_out: Vec<MemberId>,
    /// The FGSP peers each cluster member announced last (empty: it did not speak). The
    /// member that speaks next presumes them alive ([`FgspSide::presume`]).
    fgsp_peers_heard: BTreeMap<MemberId, Vec<MemberId>>,
}

/// Runs a tunnel table's timer when it is due, then takes what it has to send and the
/// events it raised.
fn step_table(t: &mut TunnelTable, now_ms: u64) -> (Vec<Outgoing>, Vec<TunnelEvent>) {
    if t.poll_timeout().is_some_and(|d| d <= now_ms) {
        t.handle_timeout(now_ms);
    }
    let out = std::iter::from_fn(|| t.poll_transmit()).collect();
    let events = std::iter::from_fn(|| t.poll_event()).collect();
    (out, events)
}

/// One configured FGSP `cluster-peer`.
struct FgspPeer {
    addr: SocketAddrV4,
    id: Option<MemberId>,
    sync_sent: u64,
    sync_recv: u64,
}

/// FGSP side.
struct FgspSide {
    sock: LinkSocket,
    key: LinkKey,
    /// Shared with the heartbeat pump.
    link: hbpump::SharedLink,
    /// Sends the heartbeats while the tick is late (None: its thread did not start).
    pump: Option<hbpump::HeartbeatPump>,
    live: Liveness,
    me: MemberId,
    group: u8,
    peers: Vec<FgspPeer>,
    next_hb_ms: u64,
    /// Heartbeat period (ms), from the cluster-peers' `hb-interval`.
    hb_ms: u64,
    /// Silence after which a peer is lost (ms), from `hb-interval` x `hb-lost-threshold`.
    lost_ms: u64,
    /// True while this member speaks for its FGCP cluster (or has no FGCP cluster).
    active: bool,
    /// Link counters heard per peer: lost sync datagrams ([`resync`]).
    loss: resync::LossWatch,
    /// Peers presumed alive when this member started to speak for its cluster, whose
    /// address is not known yet: their first message here counts as their coming up (they
    /// get a snapshot then).
    presumed: BTreeSet<MemberId>,
    /// Live peers heard under a new epoch: their hasyncd restarted within the loss time, or
    /// another member of their FGCP cluster speaks for it now. Either holds no copy of what
    /// this member carries, and is never declared lost and up again: it gets a snapshot.
    restarted: Vec<MemberId>,
}

/// What changed in a drive, for the daemon to publish.
#[derive(Default)]
pub struct Changes {
    /// The FGCP role changed.
    pub role_changed: bool,
    /// FGSP detected peers changed.
    pub peers_changed: bool,
    /// An FGCP member was heard from for the first time, or again after it was lost (it may
    /// have been primary meanwhile and announced the shared addresses as its own).
    pub fgcp_peer_joined: bool,
    /// An FGCP member that announced itself primary does not any more (a split brain
    /// ended: it held and announced the shared addresses meanwhile).
    pub fgcp_peer_stepped_down: bool,
}

/// The running HA links of this member.
pub struct Cluster {
    /// The time of the last [`Cluster::drive`] (when standby copies arrive).
    now_ms: u64,
    fgcp: Option<FgcpSide>,
    fgsp: Option<FgspSide>,
    failovers: u64,
    was_secondary: bool,
    /// CHILD SAs this member carries (from ikemgr), by `tunnel/spi_in`, as last sent.
    local: BTreeMap<String, ChildSaSync>,
    /// How many of `local`'s records have each (tunnel, outbound SPI): what the tunnel
    /// tables count, kept with `local` so a change is looked up, not scanned for.
    local_out: BTreeMap<(String, u32), usize>,
    /// Phase1 names whose SAs go to FGSP peers (`fgsp-sync enable`).
    fgsp_sync: std::collections::BTreeSet<String>,
    /// Standby copies received from other members, by `tunnel/spi_in`.
    replicas: BTreeMap<String, Replica>,
    /// FGCP per-tunnel ownership and sequence leases (ha-core), with an FGCP link only.
    table: Option<TunnelTable>,
    /// FGCP cluster that is also an FGSP peer (seed 001): the per-tunnel FGSP table between
    /// clusters, keyed by the FGSP member id the cluster's members share, run by the
    /// cluster's primary only (emptied when this member stops speaking for the cluster).
    fgsp_table: Option<TunnelTable>,
    /// FGCP cluster over FGSP: per outbound SA of a synced tunnel, the marks the FGCP table
    /// and the FGSP table confirmed, and the mark granted (the lower of the two).
    lease_halves: BTreeMap<(String, u32), [u64; 3]>,
    /// RFC 6311 sync marks of IKE SAs another member synced while it held the tunnel,
    /// which this member claimed back: `(tunnel, mark SPI)` to M1. Never granted here.
    foreign_marks: BTreeMap<(String, u32), u64>,
    /// IKE SAs this member carries (ikemgr's `sa.ike`), by tunnel, as last sent.
    ike_local: BTreeMap<String, IkeSaRecord>,
    /// Standby copies of other members' IKE SAs, by tunnel.
    ike_replicas: BTreeMap<String, (MemberId, IkeSaSync)>,
    /// Tunnels registered as established here in `table`.
    local_tunnels: std::collections::BTreeSet<String>,
    /// Leases every live member acknowledged, for espd (drained by the daemon).
    grants: Vec<SeqMark>,
    /// Tunnels this member took over, for ikemgr (drained by the daemon).
    takeovers: Vec<TakeoverInfo>,
    /// Election events of the current drive, applied to `table` after the messages.
    election_events: Vec<ElectionEvent>,
    /// Configured phase1 names (a tunnel's phase1 from its name, see [`phase1_of`]).
    phase1_names: Vec<String>,
    /// Tunnels another member took from this one (FGSP), for the daemon (drained by it).
    demotions: Vec<String>,
    /// Where espd's outbound SAs of tunnels claimed back while carried here must continue
    /// (`SeqSkip`), for the daemon (drained by it).
    skips: Vec<SeqMark>,
    /// FGCP: the IKE SAs this member held when it turned secondary, for the primary
    /// ([`Cluster::hand_ike_sas_to`]).
    ike_handover: Option<IkeHandover>,
    /// Tunnel roles may have changed (FGSP table), for the daemon (reset by it): all of
    /// them (a member joined or was lost, the configuration changed).
    pub roles_dirty: bool,
    /// Tunnels whose role may have changed (a claim, a lease of a tunnel not known yet, a
    /// promotion, a deletion), for the daemon ([`Cluster::take_roles_of`]): 100 000 tunnels
    /// rebuilt the whole role list (43 ms) for every lease of a new or rekeyed CHILD SA.
    roles_of: BTreeSet<String>,
    /// Age of the last update applied per peer (`hasyncd_sync_lag_seconds`).
    lag: crate::lag::SyncLag,
    /// Snapshot transfers to and from members that join ([`snapshot`]).
    snap: snapshot::Snapshots,
    /// This member's link epochs, above every earlier one ([`epochs`]).
    epochs: EpochStore,
    /// FGCP primary: something that can leave a tunnel with a non-primary owner happened
    /// (a membership or role change, a claim, lease or record received, a snapshot
    /// applied): `reclaim_stale` runs on the next drive. It scans every tunnel, so it runs
    /// only then and every [`RECLAIM_EVERY_MS`], not on every tick.
    reclaim_due: bool,
    next_reclaim_ms: u64,
    /// Many local records changed at once: snapshots to every peer on the next drive
    /// ([`Cluster::send_sync_or_snapshot`]).
    bulk_changed: bool,
    /// Snapshots to every peer started in this drive after such a change: the tunnel
    /// table's claims and leases queued before them are in them (not sent separately).
    bulk_started: bool,
    /// Configuration sync messages received over the FGCP link, for the daemon's
    /// `cfgsync` (drained by it).
    config_inbox: Vec<(MemberId, Message)>,
    /// The configuration blocks the links were started from.
    started_from: (
        Option<haven_config::Ha>,
        Option<haven_config::StandaloneCluster>,
    ),
}

/// A standby copy of another member's CHILD SA.
pub struct Replica {
    /// Who sent it.
    pub from: MemberId,
    /// Which link it came over.
    pub link: &'static str,
    /// The record (with keys).
    pub sa: ChildSaSync,
    /// When it arrived (ms): its lifetimes are what was left then.
    pub received_ms: u64,
}

fn sa_key(tunnel: &str, spi_in: u32) -> String {
    format!("{tunnel}/{spi_in:08x}")
}

fn secret_of(s: &Option<haven_config::Secret>) -> Option<&[u8]> {
    s.as_ref()
        .filter(|s| s.is_usable())
        .map(|s| s.expose_bytes())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn count_drop(link: &'static str, reason: &'static str) {
    metrics::counter!("hasyncd_link_drops_total", "link" => link, "reason" => reason).increment(1);
}

/// `n` drops at once (the reader thread's counts, taken once per tick).
fn count_drops(link: &'static str, reason: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!("hasyncd_link_drops_total", "link" => link, "reason" => reason)
            .increment(n);
    }
}

fn count_sent(link: &'static str, bytes: usize) {
    metrics::counter!("hasyncd_sync_messages_sent_total", "link" => link).increment(1);
    metrics::counter!("hasyncd_sync_bytes_sent_total", "link" => link).increment(bytes as u64);
}

fn count_received(link: &'static str, bytes: usize) {
    metrics::counter!("hasyncd_sync_messages_received_total", "link" => link).increment(1);
    metrics::counter!("hasyncd_sync_bytes_received_total", "link" => link).increment(bytes as u64);
}

/// Registers the descriptions of hasyncd's series.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_gauge!(
        "hasyncd_role",
        "FGCP role of this member: 2 primary, 1 secondary, 0 hello, -1 no FGCP cluster."
    );
    describe_counter!(
        "hasyncd_resyncs_total",
        Unit::Count,
        "Snapshots a secondary asked its primary for after sync datagrams were lost on the FGCP link."
    );
    describe_counter!(
        "hasyncd_peers_lost_total",
        Unit::Count,
        "Members (link=fgcp) or FGSP peers (link=fgsp) declared lost: no heartbeat within the loss time."
    );
    describe_counter!(
        "hasyncd_failovers_total",
        Unit::Count,
        "Times this member took the primary role over from another member."
    );
    describe_counter!(
        "hasyncd_heartbeats_late_tick_total",
        Unit::Count,
        "Heartbeats the heartbeat thread sent because the daemon's tick was late, by link (one per FGSP peer)."
    );
    for link in ["fgcp", "fgsp"] {
        metrics::counter!("hasyncd_heartbeats_late_tick_total", "link" => link).increment(0);
    }
    describe_counter!(
        "hasyncd_sequence_skips_total",
        Unit::Count,
        "Outbound SAs this member's espd was told to continue above another member's leases (a tunnel claimed back while carried here, after a split brain)."
    );
    describe_counter!(
        "hasyncd_sequence_skips_repeated_total",
        Unit::Count,
        "Skips sent to espd again because espd had not yet asked for a lease above them (a bus event can be lost right after hasyncd starts)."
    );
    describe_counter!(
        "hasyncd_link_drops_total",
        Unit::Count,
        "HA link datagrams dropped, by link (fgcp, fgsp) and reason."
    );
    describe_counter!(
        "hasyncd_sync_messages_sent_total",
        Unit::Count,
        "HA link messages sent (heartbeats included), by link."
    );
    describe_counter!(
        "hasyncd_sync_bytes_sent_total",
        Unit::Bytes,
        "HA link bytes sent, by link."
    );
    describe_counter!(
        "hasyncd_sync_messages_received_total",
        Unit::Count,
        "HA link messages accepted (authenticated, fresh), by link."
    );
    describe_counter!(
        "hasyncd_sync_bytes_received_total",
        Unit::Bytes,
        "HA link bytes accepted, by link."
    );
    describe_gauge!(
        "hasyncd_tunnels",
        "Tunnels by role on this member (sync-primary, standby)."
    );
    describe_gauge!(
        "hasyncd_tunnels_held",
        "Tunnels this FGCP primary leaves to another member that still says it is primary (split brain): espd holds their outbound SAs."
    );
    describe_gauge!(
        "hasyncd_standby_child_sas",
        "CHILD SA standby copies held for other members."
    );
    describe_counter!(
        "hasyncd_tunnel_takeovers_total",
        Unit::Count,
        "Tunnels this member took over (IKE SA restored by ikemgr, CHILD SAs past their leases)."
    );
    describe_counter!(
        "hasyncd_carrier_claims_total",
        Unit::Count,
        "Tunnels taken here as the successor of a member this one lost contact with, claimed again when the peer's ESP reached this member's SAs (the other members learn it carries them)."
    );
    describe_counter!(
        "hasyncd_later_ike_copies_total",
        Unit::Count,
        "IKE SAs carried here whose copy from another member had later message IDs (after a split brain or a take-back): handed to ikemgr."
    );
    describe_counter!(
        "hasyncd_traffic_promotions_total",
        Unit::Count,
        "FGSP standby tunnels promoted here because their ESP or IKE traffic arrived (the router moved them)."
    );
    describe_counter!(
        "hasyncd_snapshots_sent_total",
        Unit::Count,
        "Snapshots of this member's state sent to a member that joined or asked, by link."
    );
    describe_counter!(
        "hasyncd_snapshots_received_total",
        Unit::Count,
        "Snapshots from another member applied here, by link."
    );
    describe_counter!(
        "hasyncd_gratuitous_arps_total",
        Unit::Count,
        "ARP announcements sent for the FGCP shared addresses."
    );
    describe_counter!(
        "hasyncd_sequence_leases_granted_total",
        Unit::Count,
        "Outbound sequence leases granted to espd after every live member stored them."
    );
    describe_gauge!(
        "hasyncd_fgsp_detected_peers",
        "FGSP peers currently heard from."
    );
    describe_gauge!(
        "hasyncd_fgsp_peers_configured",
        "FGSP peers configured (config cluster-peer); 0 without FGSP."
    );
    describe_gauge!(
        "hasyncd_fgcp_peers",
        "Other FGCP members currently heard from (heartbeats); 0 without FGCP."
    );
}

impl Cluster {
    /// Starts the links the configuration asks for. A link that cannot start (no
    /// secret, no heartbeat device, socket error) is left out with one log line each;
    /// the daemon keeps running standalone for it.
    pub fn start(config: &Config, now_ms: u64, mut epochs: EpochStore) -> Cluster {
        let fgcp = config
            .ha
            .as_ref()
            .filter(|h| h.mode == haven_config::HaMode::ActivePassive)
            .and_then(|ha| match start_fgcp(ha, now_ms, epochs.next(now_ms)) {
                Ok(s) => {
                    tracing::info!(
                        "FGCP link up on {} port {FGCP_PORT}/udp as {} (member id {})",
                        s.hbdev,
                        s.fgcp.config().serial,
                        s.fgcp.config().me.0
                    );
                    Some(s)
                }
                Err(e) => {
                    tracing::error!("FGCP HA link not started, running standalone: {e}");
                    None
                }
            });
        let fgsp = config.standalone.as_ref().and_then(|sc| {
            match start_fgsp(sc, now_ms, epochs.next(now_ms), fgcp.is_none()) {
                Ok(s) => {
                    tracing::info!(
                        "FGSP link up on port {}/udp as member {} of group {} ({} peers)",
                        haven_config::FGSP_PORT,
                        s.me.0,
                        s.group,
                        s.peers.len()
                    );
                    Some(s)
                }
                Err(e) => {
                    tracing::error!("FGSP link not started, running without peers: {e}");
                    None
                }
            }
        });
        let role = if fgcp.is_some() { 0.0 } else { -1.0 };
        // FGCP: the election decides who carries the tunnels. FGSP alone: each tunnel is
        // owned by one member and moves on traffic or on its owner's death. (An FGSP peer
        // that is an FGCP cluster runs the FGCP table only: per-tunnel FGSP ownership
        // between clusters is not done yet.)
        let table = match (&fgcp, &fgsp) {
            (Some(s), _) => Some(TunnelTable::with_mode(s.fgcp.config().me, TableMode::Fgcp)),
            (None, Some(f)) => Some(TunnelTable::with_mode(f.me, TableMode::Fgsp)),
            (None, None) => None,
        };
        let fgsp_table = match (&fgcp, &fgsp) {
            (Some(_), Some(f)) => Some(TunnelTable::with_mode(f.me, TableMode::Fgsp)),
            _ => None,
        };
        metrics::gauge!("hasyncd_role").set(role);
        // Gauges otherwise first set by an event: exported from the start so dashboards
        // show 0 instead of no data.
        metrics::gauge!("hasyncd_standby_child_sas").set(0.0);
        metrics::gauge!("hasyncd_fgsp_detected_peers").set(0.0);
        metrics::gauge!("hasyncd_fgsp_peers_configured")
            .set(fgsp.as_ref().map_or(0, |f| f.peers.len()) as f64);
        metrics::gauge!("hasyncd_fgcp_peers").set(0.0);
        Cluster {
            fgcp,
            fgsp,
            failovers: 0,
            was_secondary: false,
            local: BTreeMap::new(),
            local_out: BTreeMap::new(),
            fgsp_sync: config
                .phase1
                .iter()
                .filter(|p| p.fgsp_sync)
                .map(|p| p.name.clone())
                .collect(),
            replicas: BTreeMap::new(),
            table,
            fgsp_table,
            lease_halves: BTreeMap::new(),
            foreign_marks: BTreeMap::new(),
            ike_local: BTreeMap::new(),
            ike_replicas: BTreeMap::new(),
            local_tunnels: Default::default(),
            grants: Vec::new(),
            takeovers: Vec::new(),
            election_events: Vec::new(),
            phase1_names: config.phase1.iter().map(|p| p.name.clone()).collect(),
            demotions: Vec::new(),
            skips: Vec::new(),
            ike_handover: None,
            roles_dirty: true,
            roles_of: BTreeSet::new(),
            started_from: (config.ha.clone(), config.standalone.clone()),
            config_inbox: Vec::new(),
            lag: Default::default(),
            snap: snapshot::Snapshots::new(now_ms),
            epochs,
            reclaim_due: true,
            next_reclaim_ms: now_ms,
            now_ms,
            bulk_changed: false,
            bulk_started: false,
        }
    }

    /// Re-reads which phase1s are synced to FGSP peers (`fgsp-sync`).
    pub fn set_fgsp_sync(&mut self, config: &Config) {
        self.phase1_names = config.phase1.iter().map(|p| p.name.clone()).collect();
        self.fgsp_sync = config
            .phase1
            .iter()
            .filter(|p| p.fgsp_sync)
            .map(|p| p.name.clone())
            .collect();
    }

    /// Applies a reload that changes only FGCP election parameters (priority, override,
    /// heartbeat interval and threshold) without restarting the links; returns false when
    /// anything else changed (the caller restarts the links).
    pub fn reconfigure_in_place(&mut self, config: &Config, now_ms: u64) -> bool {
        if config.standalone != self.started_from.1 {
            return false;
        }
        let (Some(new), Some(old), Some(side)) = (
            config.ha.as_ref(),
            self.started_from.0.as_ref(),
            self.fgcp.as_mut(),
        ) else {
            return false;
        };
        let same_link = new.group_id == old.group_id
            && new.mode == old.mode
            && secret_of(&new.password) == secret_of(&old.password)
            && new.hbdev.first().map(|h| &h.interface) == old.hbdev.first().map(|h| &h.interface);
        if !same_link {
            return false;
        }
        let mut cfg = side.fgcp.config().clone();
        cfg.priority = new.priority;
        cfg.override_ = new.override_;
        cfg.hb_interval_ms = u64::from(new.hb_interval_ms());
        cfg.hb_lost_threshold = u32::from(new.hb_lost_threshold);
        match side.fgcp.reconfigure(cfg, now_ms) {
            Ok(()) => {
                side.session_pickup = new.session_pickup;
                self.started_from.0 = Some(new.clone());
                tracing::info!("FGCP election parameters reloaded in place");
                true
            }
            Err(e) => {
                tracing::warn!("FGCP reload in place refused ({e}); restarting the link");
                false
            }
        }
    }

    /// The FGCP role, or `None` without an FGCP link.
    pub fn fgcp_role(&self) -> Option<HaRole> {
        self.fgcp.as_ref().map(|s| s.fgcp.role())
    }

    /// The member this one takes for FGCP primary (itself included), if any.
    pub fn fgcp_primary(&self) -> Option<MemberId> {
        self.fgcp.as_ref().and_then(|s| s.fgcp.primary())
    }

    /// This member's FGCP id and serial.
    pub fn fgcp_me(&self) -> Option<(MemberId, String)> {
        self.fgcp
            .as_ref()
            .map(|s| (s.fgcp.config().me, s.fgcp.config().serial.clone()))
    }

    /// Configuration sync messages received since the last call.
    pub fn take_config_messages(&mut self) -> Vec<(MemberId, Message)> {
        std::mem::take(&mut self.config_inbox)
    }

    /// Sends `msg` to every FGCP member (the heartbeat broadcast).
    pub fn broadcast_fgcp(&mut self, msg: &Message) {
        let Some(side) = self.fgcp.as_mut() else {
            return;
        };
        match side.link.seal(msg) {
            Ok(d) => match side.sock.send_to(&d, side.dest) {
                Ok(()) => count_sent("fgcp", d.len()),
                Err(e) => tracing::debug!("send on {}: {e}", side.hbdev),
            },
            Err(e) => tracing::error!("seal: {e}"),
        }
    }

    /// When the links want the next tick (ms): soon while a snapshot transfer runs (see
    /// [`snapshot::TRANSFER_TICK_MS`]), else at the daemon's regular tick.
    pub fn poll_timeout(&self, now_ms: u64) -> Option<u64> {
        self.snap
            .busy(now_ms)
            .then(|| now_ms.saturating_add(snapshot::TRANSFER_TICK_MS))
    }

    /// Sends this member's FGCP heartbeat if one is due by the wall clock (the daemon
    /// ticks' clock). Long loops over every record (applying a snapshot of 100 000) call it
    /// every [`HEARTBEAT_CHECK_EVERY`] records: the heartbeats keep flowing while the tick
    /// is held, so a big join never makes a peer declare this member lost.
    pub fn keep_heartbeats(&mut self) {
        let now_ms = haven_daemon::now_ns() / 1_000_000;
        if let Some(side) = self.fgcp.as_mut() {
            side.send_heartbeats(now_ms);
        }
    }

    /// Sends `msg` to one FGCP member, where it was last heard from.
    pub fn send_fgcp_to(&mut self, to: MemberId, msg: &Message) {
        self.send_to_member("fgcp", to, msg);
    }

    /// Runs the links up to `now_ms`.
    pub fn drive(&mut self, now_ms: u64) -> Changes {
        self.now_ms = now_ms;
        let mut ch = Changes::default();
        let mut received: Vec<(MemberId, &'static str, u64, u64, Message)> = Vec::new();
        // Members that get a snapshot of what this member carries (it joined, or this
        // member just became the one that speaks).
        let mut snap_to: Vec<(&'static str, MemberId)> = Vec::new();
        // Members heard under a new epoch (their hasyncd restarted) on each link.
        let mut restarted: Vec<(&'static str, MemberId)> = Vec::new();
        let mut snap_all_fgcp = false;
        let mut snap_all_fgsp = false;
        let mut fgsp_events: Vec<PeerEvent> = Vec::new();
        let mut presumed: Vec<MemberId> = Vec::new();
        if let Some(side) = self.fgcp.as_mut() {
            let before = side.reported_role;
            received.extend(
                side.drive(now_ms)
                    .into_iter()
                    .map(|(m, e, c, msg)| (m, "fgcp", e, c, msg)),
            );
            if std::mem::take(&mut side.stepped_down) {
                ch.fgcp_peer_stepped_down = true;
            }
            if std::mem::take(&mut side.peer_role_changed) {
                self.reclaim_due = true;
            }
            let mut events = Vec::new();
            while let Some(ev) = side.fgcp.poll_event() {
                events.push(ev.clone());
                match ev {
                    ElectionEvent::PeerJoined(m) => {
                        tracing::info!("FGCP member {} joined", m.0);
                        snap_to.push(("fgcp", m));
                        ch.fgcp_peer_joined = true;
                    }
                    ElectionEvent::PeerLost(m) => {
                        metrics::counter!("hasyncd_peers_lost_total", "link" => "fgcp")
                            .increment(1);
                        tracing::warn!("FGCP member {} lost (no heartbeat)", m.0)
                    }
                    ElectionEvent::BecamePrimary => {
                        side.ha_id_changes += 1;
                        // A new primary sends what it carries to every member.
                        snap_all_fgcp = true;
                        if self.was_secondary {
                            self.failovers += 1;
                            metrics::counter!("hasyncd_failovers_total").increment(1);
                        }
                        tracing::info!("FGCP: this member is now primary");
                    }
                    ElectionEvent::BecameSecondary { primary } => {
                        side.ha_id_changes += 1;
                        self.was_secondary = true;
                        tracing::info!("FGCP: this member is secondary under {}", primary.0);
                    }
                }
            }
            // A member that restarted within the loss time is never declared lost, so it
            // does not join again: its new epoch says it lost its copies.
            for m in std::mem::take(&mut side.restarted) {
                restarted.push(("fgcp", m));
                if !snap_to.contains(&("fgcp", m)) {
                    tracing::info!("FGCP member {} restarted (new link epoch)", m.0);
                    snap_to.push(("fgcp", m));
                }
            }
            if !events.is_empty() {
                self.reclaim_due = true;
            }
            self.election_events = events;
            let after = side.fgcp.role();
            side.reported_role = after;
            metrics::gauge!("hasyncd_fgcp_peers").set(side.fgcp.peer_count() as f64);
            if after != before {
                ch.role_changed = true;
                metrics::gauge!("hasyncd_role").set(match after {
                    HaRole::Primary => 2.0,
                    HaRole::Secondary => 1.0,
                    HaRole::Hello => 0.0,
                });
            }
        }
        let speaks = self.fgcp_role().is_none_or(|r| r == HaRole::Primary);
        // A cluster member that joined, or that just turned secondary, may have spoken for
        // the cluster's FGSP member id meanwhile (both primary for a moment) with a newer
        // epoch than this member's: the FGSP peers would refuse this member's older one. The
        // speaker starts a fresh epoch.
        let renew = self
            .election_events
            .iter()
            .any(|e| matches!(e, ElectionEvent::PeerJoined(_)))
            || self
                .fgcp
                .as_ref()
                .is_some_and(|s| !s.now_secondary.is_empty());
        // Above every FGSP epoch a cluster member announced: a partner whose clock runs
        // ahead spoke under epochs this member's clock has not reached.
        let floor = self
            .fgcp
            .as_ref()
            .map_or(0, |s| s.fgsp_epoch_heard.saturating_add(1));
        if let Some(side) = self.fgsp.as_mut() {
            if speaks && (!side.active || renew) {
                // A new speaker for this member id: a fresh epoch above the old speaker's.
                let epoch = self.epochs.next(now_ms.max(floor));
                if epoch > now_ms.saturating_add(1_000) {
                    tracing::info!(
                        "FGSP: speaking for the cluster under epoch {epoch}, {} ms ahead of this member's clock (above an epoch this member used before or its cluster announced)",
                        epoch - now_ms
                    );
                }
                match HaLink::new(side.key.clone(), side.me, epoch) {
                    Ok(link) => {
                        if let Some(f) = self.fgcp.as_mut() {
                            f.fgsp_epoch_out = epoch;
                        }
                        side.link.replace(link);
                        side.active = true;
                        side.next_hb_ms = now_ms;
                        snap_all_fgsp = true;
                        // The previous speaker's FGSP peers are presumed alive: this
                        // member's first leases wait for their acknowledgements, as its
                        // predecessor's did, until each is heard or lost.
                        if let Some(f) = self.fgcp.as_ref() {
                            presumed = side.presume(f.fgsp_peers_heard.values().flatten(), now_ms);
                        }
                        // Transfers sealed under the old epoch cannot continue.
                        self.snap.forget_link("fgsp");
                    }
                    Err(e) => tracing::error!("FGSP link: {e}"),
                }
            } else if !speaks {
                if side.active {
                    // No longer the cluster's voice on the FGSP link: the next primary
                    // starts its FGSP table afresh (same member id, new epoch).
                    if let Some(t) = self.fgsp_table.as_mut() {
                        *t = TunnelTable::with_mode(side.me, TableMode::Fgsp);
                    }
                    self.lease_halves.clear();
                }
                side.active = false;
                side.presumed.clear();
                if let Some(f) = self.fgcp.as_mut() {
                    f.fgsp_epoch_out = 0;
                }
                if let Some(p) = &side.pump {
                    p.silence();
                }
            }
            let (changed, msgs, _joined, events) = side.drive(now_ms);
            if changed || !presumed.is_empty() {
                ch.peers_changed = true;
            }
            if let Some(f) = self.fgcp.as_mut() {
                f.fgsp_peers_out.clear();
                if side.active {
                    f.fgsp_peers_out.extend(side.live.peers());
                }
            }
            for ev in &events {
                if let PeerEvent::Up(m) = ev {
                    snap_to.push(("fgsp", *m));
                }
            }
            for m in std::mem::take(&mut side.restarted) {
                restarted.push(("fgsp", m));
                if side.active && !snap_to.contains(&("fgsp", m)) {
                    tracing::info!(
                        "FGSP peer {} speaks under a new epoch (its hasyncd restarted, or another member of its cluster speaks for it now): it gets a snapshot",
                        m.0
                    );
                    snap_to.push(("fgsp", m));
                }
            }
            received.extend(
                msgs.into_iter()
                    .map(|(m, e, c, msg)| (m, "fgsp", e, c, msg)),
            );
            fgsp_events = events;
        }
        // FGSP table: peers that came up before their messages (as FGCP membership below).
        if self.fgsp_mode() {
            if let Some(t) = self.table.as_mut() {
                for ev in &fgsp_events {
                    if let PeerEvent::Up(m) = ev {
                        t.peer_joined(*m);
                        self.roles_dirty = true;
                    }
                }
            }
        }
        if let Some(t) = self.fgsp_table.as_mut() {
            let up = fgsp_events.iter().filter_map(|ev| match ev {
                PeerEvent::Up(m) => Some(m),
                PeerEvent::Lost(_) => None,
            });
            for m in presumed.iter().chain(up) {
                t.peer_joined(*m);
                self.roles_dirty = true;
            }
        }
        // Membership first: a lease that arrives with a peer's first heartbeat must not be
        // marked stale by that peer's PeerJoined afterwards.
        if let Some(t) = self.table.as_mut() {
            for ev in &self.election_events {
                match ev {
                    ElectionEvent::PeerJoined(m) => t.peer_joined(*m),
                    ElectionEvent::PeerLost(m) => t.peer_lost(*m),
                    _ => {}
                }
            }
        }
        for (from, link, epoch, counter, msg) in received {
            if matches!(
                msg,
                Message::ConfigStatus(_) | Message::ConfigRequest(_) | Message::ConfigChunk(_)
            ) {
                // Configuration sync is FGCP's (the daemon's `cfgsync`); FGSP peers keep
                // their own configuration and never send these.
                if link == "fgcp" {
                    self.config_inbox.push((from, msg));
                } else {
                    count_drop(link, "config_over_fgsp");
                }
                continue;
            }
            self.lag.applied(link, from, now_ms);
            self.receive(from, link, epoch, counter, msg, now_ms);
        }
        let fgsp_mode = self.fgsp_mode();
        let fgsp_lost_table = if self.fgsp_table.is_some() {
            self.fgsp_table.as_mut()
        } else if fgsp_mode {
            self.table.as_mut()
        } else {
            None
        };
        if let Some(t) = fgsp_lost_table {
            for ev in &fgsp_events {
                if let PeerEvent::Lost(m) = ev {
                    // The successor (lowest live id) promotes the dead owner's tunnels.
                    t.peer_lost(*m);
                    self.roles_dirty = true;
                }
            }
        }
        let mut hand_to = None;
        for ev in std::mem::take(&mut self.election_events) {
            let Some(t) = self.table.as_mut() else { break };
            match ev {
                ElectionEvent::PeerJoined(_) | ElectionEvent::PeerLost(_) => {}
                ElectionEvent::BecamePrimary => {
                    // Every tunnel another member carried is ours now, each outbound SA
                    // starting at its last acknowledged lease.
                    t.promote_all();
                    self.local_tunnels.clear();
                }
                ElectionEvent::BecameSecondary { primary } => {
                    self.local_tunnels.clear();
                    hand_to = Some(primary);
                }
            }
        }
        if let Some(primary) = hand_to {
            self.hand_ike_sas_to(primary);
        }
        self.repeat_ike_handover(now_ms);
        let primary = self.fgcp_role() == Some(HaRole::Primary);
        if let (Some(side), Some(t)) = (self.fgcp.as_mut(), self.table.as_mut()) {
            for m in std::mem::take(&mut side.now_secondary) {
                if !primary || snap_to.contains(&("fgcp", m)) || self.snap.sending_to("fgcp", m) {
                    // A snapshot under way to it carries the claims and marks (see
                    // `snapshot::restates_snapshot`).
                    continue;
                }
                if t.roles().nth(RESYNC_BY_SNAPSHOT).is_some() {
                    // Many tunnels: one windowed transfer instead of two datagrams each.
                    snap_to.push(("fgcp", m));
                } else {
                    // It heard us: claims and leases again, so its records are exact.
                    t.resync_peer(m);
                }
            }
        }
        if primary && (std::mem::take(&mut self.reclaim_due) || now_ms >= self.next_reclaim_ms) {
            self.next_reclaim_ms = now_ms.saturating_add(RECLAIM_EVERY_MS);
            self.reclaim_stale(now_ms);
        }
        self.resync_lost(now_ms);
        // A member that (re)joined gets a snapshot of every IKE and CHILD SA this member
        // carries and of the tunnel table (windowed and acknowledged, see `snapshot`).
        // (A member that does not speak sends no stream either: the change is dropped.)
        let bulk = std::mem::take(&mut self.bulk_changed);
        if self.fgcp_role().is_none_or(|r| r == HaRole::Primary) {
            if bulk {
                snap_all_fgcp = true;
                snap_all_fgsp = true;
                self.bulk_started = true;
            }
            if snap_all_fgcp {
                if let Some(side) = self.fgcp.as_ref() {
                    snap_to.extend(side.addrs.keys().map(|m| ("fgcp", *m)));
                }
            }
            if snap_all_fgsp {
                if let Some(side) = self.fgsp.as_ref() {
                    snap_to.extend(side.peers.iter().filter_map(|p| p.id).map(|m| ("fgsp", m)));
                }
            }
            snap_to.sort();
            snap_to.dedup();
            for (link, m) in snap_to {
                self.start_snapshot(link, m, None, now_ms);
            }
        }
        // A restarted member is alive: the first lease after a promotion from it waits for
        // its acknowledgement too (`TunnelTable::peer_restarted`; a member that joined after
        // it was declared lost gets the same from `peer_joined`).
        for (link, m) in restarted {
            let table = if link == "fgsp" && self.fgsp_table.is_some() {
                self.fgsp_table.as_mut()
            } else {
                self.table.as_mut()
            };
            if let Some(t) = table {
                t.peer_restarted(m);
            }
        }
        self.run_snapshots(now_ms);
        self.run_table(now_ms);
        self.bulk_started = false;
        self.lag.publish(now_ms);
        ch
    }

    /// A sync message to apply now (after the snapshot gate): the tunnel table, then the
    /// standby copies.
    fn process(&mut self, from: MemberId, link: &'static str, msg: Message) {
        let fgsp_mode = self.fgsp_mode();
        // An FGCP cluster's primary speaking for it over FGSP keeps a table of its own for
        // the FGSP link (seed 001).
        let over = self.fgsp_table.is_some();
        if link == "fgsp" && (fgsp_mode || over) {
            // Only tunnels of phase1s with `fgsp-sync enable` here: others are neither
            // kept nor taken over (seed 000's DC1_VM4); their leases are acknowledged
            // without being stored, so the owner is never held up by this member.
            let tunnel = msg_tunnel(&msg).map(str::to_string);
            if let Some(tunnel) = tunnel.filter(|t| !self.syncs(t)) {
                if let Message::SeqLease(l) = &msg {
                    let ack = Message::SeqLeaseAck(SeqLeaseAck {
                        tunnel: l.tunnel.clone(),
                        spi_out: l.spi_out,
                        seq_hw: l.seq_hw,
                    });
                    self.send_fgsp(Some(from), &ack);
                }
                tracing::trace!("FGSP: {tunnel} is not synced here (fgsp-sync disable)");
                return;
            }
            if let Message::SeqLeaseAck(a) = &msg {
                tracing::debug!(
                    "FGSP: member {} acknowledged {} {:08x} below {}",
                    from.0,
                    a.tunnel,
                    a.spi_out,
                    a.seq_hw
                );
            }
            let table = if over {
                self.fgsp_table.as_mut()
            } else {
                self.table.as_mut()
            };
            if let Some(t) = table {
                t.handle_message(from, &msg);
            }
            match msg_tunnel(&msg) {
                Some(tunnel) => self.note_role(tunnel),
                None => self.roles_dirty = true,
            }
        }
        if link == "fgcp" {
            if let Some(t) = self.table.as_mut() {
                t.handle_message(from, &msg);
            }
            if matches!(
                msg,
                Message::Ownership(_) | Message::SeqLease(_) | Message::ChildSa(_)
            ) {
                self.reclaim_due = true;
            }
        }
        self.apply(from, link, msg);
        metrics::gauge!("hasyncd_standby_child_sas").set(self.replicas.len() as f64);
    }

    /// FGCP primary, after every election and message: the primary owns every tunnel. A
    /// tunnel the table gives to a member that no longer says it is primary (it claimed it
    /// during a split brain, when it missed this member's heartbeats) is claimed back: a
    /// takeover to ikemgr from the standby copy when ikemgr does not carry it here, each
    /// outbound SA starting beyond the last synced lease (ha-core's `reclaim_stale`).
    fn reclaim_stale(&mut self, now_ms: u64) {
        let (Some(side), Some(t)) = (self.fgcp.as_ref(), self.table.as_mut()) else {
            return;
        };
        let live: std::collections::BTreeSet<MemberId> = side
            .fgcp
            .members(now_ms)
            .into_iter()
            .map(|m| m.member)
            .collect();
        let roles = &side.peer_roles;
        let owners: BTreeMap<String, MemberId> = t
            .roles()
            .filter(|(_, r)| *r == TunnelRole::Standby)
            .filter_map(|(n, _)| t.owner(n).map(|(o, _)| (n.to_string(), o)))
            .collect();
        let ike_local = &self.ike_local;
        let reclaimed = t.reclaim_stale(
            |m| live.contains(&m) && roles.get(&m) == Some(&HaRole::Primary),
            // Keyed by tunnel (`set_local_ike_sas`): a lookup, not a scan per tunnel.
            |tunnel| ike_local.contains_key(tunnel),
        );
        for (tunnel, carried) in reclaimed {
            let from = owners.get(&tunnel).map_or(0, |m| m.0);
            if carried {
                tracing::info!(
                    "FGCP: {tunnel} was claimed by member {from}, which is not primary; the primary claims it back (carried here)"
                );
                self.take_later_copy(&tunnel);
            } else {
                tracing::warn!(
                    "FGCP: {tunnel} was claimed by member {from}, which is not primary (split brain); the primary takes it back"
                );
            }
            self.note_role(&tunnel);
            self.local_tunnels.insert(tunnel);
        }
    }

    /// Sends what the tunnel table queued (leases, acknowledgements, claims: secondaries
    /// acknowledge too) and turns its events into grants and takeovers.
    fn run_table(&mut self, now_ms: u64) {
        // FGCP cluster over FGSP: the FGSP table between clusters first (a promotion there
        // claims the tunnel in the FGCP table, whose messages follow).
        if let Some(t) = self.fgsp_table.as_mut() {
            let (mut out, events) = step_table(t, now_ms);
            out.retain(|o| !self.restated_by_snapshot("fgsp", o));
            for o in &out {
                self.send_fgsp(o.to, &o.message);
            }
            self.table_events(events, "FGSP", true);
        }
        let Some(t) = self.table.as_mut() else {
            return;
        };
        let (mut out, events) = step_table(t, now_ms);
        let link = if self.fgsp_mode() { "fgsp" } else { "fgcp" };
        out.retain(|o| !self.restated_by_snapshot(link, o));
        if self.fgsp_mode() {
            for o in &out {
                self.send_fgsp(o.to, &o.message);
            }
        } else if let Some(side) = self.fgcp.as_mut() {
            for o in &out {
                match side.link.seal(&o.message) {
                    Ok(d) => match side.sock.send_to(&d, side.dest) {
                        Ok(()) => count_sent("fgcp", d.len()),
                        Err(e) => tracing::warn!("lease send on {}: {e}", side.hbdev),
                    },
                    Err(e) => tracing::error!("lease seal: {e}"),
                }
            }
        }
        let label = if self.fgsp_mode() { "FGSP" } else { "FGCP" };
        self.table_events(events, label, false);
    }

    /// A table message that a snapshot under way already carries: to one member receiving
    /// one, or to all when every peer was just sent one after a bulk change (a lease
    /// still unacknowledged is retransmitted on its timer: snapshots are not acknowledged
    /// per record).
    fn restated_by_snapshot(&self, link: &'static str, o: &Outgoing) -> bool {
        snapshot::restates_snapshot(&o.message)
            && (self.bulk_started || o.to.is_some_and(|m| self.snap.sending_to(link, m)))
    }

    /// FGCP cluster over FGSP: one table confirmed `seq_hw` for an outbound SA of a synced
    /// tunnel; espd gets the lower of the two tables' confirmed marks once it grows.
    fn lease_half(&mut self, from_fgsp: bool, m: SeqMark) {
        let e = self
            .lease_halves
            .entry((m.tunnel.clone(), m.spi_out))
            .or_insert([0; 3]);
        let half = usize::from(from_fgsp);
        // Indices 0 (FGCP), 1 (FGSP) and 2 (granted): the array has three entries.
        e[half] = e[half].max(m.seq_hw);
        let both = e[0].min(e[1]);
        if both > e[2] {
            e[2] = both;
            self.grants.push(SeqMark { seq_hw: both, ..m });
        } else {
            tracing::debug!(
                "{} {:08x} below {} confirmed by the {} table; waiting for the other",
                m.tunnel,
                m.spi_out,
                m.seq_hw,
                if from_fgsp { "FGSP" } else { "FGCP" }
            );
        }
    }

    /// Grants, takeovers and demotions from a tunnel table's events (`from_fgsp`: the FGSP
    /// table of an FGCP cluster over FGSP).
    fn table_events(&mut self, events: Vec<TunnelEvent>, label: &str, from_fgsp: bool) {
        for ev in events {
            // A confirmed lease changes no role (the most frequent event: every new or
            // rekeyed CHILD SA leases first); the others change their tunnel's.
            match &ev {
                TunnelEvent::LeaseConfirmed { .. } => {}
                TunnelEvent::Promoted { tunnel, .. }
                | TunnelEvent::Demoted { tunnel, .. }
                | TunnelEvent::Reclaimed { tunnel, .. } => self.note_role(tunnel),
            }
            match ev {
                TunnelEvent::LeaseConfirmed {
                    tunnel,
                    spi_out,
                    seq_hw,
                } => {
                    let m = SeqMark {
                        tunnel,
                        spi_out,
                        seq_hw,
                    };
                    if self.fgsp_table.is_some() && self.syncs(&m.tunnel) {
                        self.lease_half(from_fgsp, m);
                    } else {
                        self.grants.push(m);
                    }
                }
                TunnelEvent::Promoted {
                    tunnel,
                    reason,
                    start_seqs,
                } => {
                    let Some((from, ike)) = self.ike_replicas.get(&tunnel) else {
                        tracing::warn!(
                            "{label}: tunnel {tunnel} promoted ({reason:?}) without an IKE SA copy; not taken over"
                        );
                        // The local ikemgr and espd may still hold the tunnel (this hasyncd
                        // restarted while they kept it, and the other member's copy of its
                        // takeover was lost on the link): espd continues each outbound SA
                        // at the start all the same, above what the other member may have
                        // sent (a no-op without the SA). Without it, the fault run's espd
                        // went on below the other member's numbers and the peer dropped
                        // everything as replays.
                        for s in start_seqs
                            .into_iter()
                            .filter(|s| !is_ike_mid_mark(s.spi_out))
                        {
                            tracing::info!(
                                "{label}: {tunnel} outbound {:08x} continues at sequence {} or above if held here{}",
                                s.spi_out,
                                s.first_seq,
                                if s.exact { "" } else { " (unsynced jump)" }
                            );
                            push_skip(&mut self.skips, &tunnel, &s);
                        }
                        continue;
                    };
                    tracing::info!(
                        "{label}: taking over {tunnel} from member {} ({reason:?}; IKE SA {:016x}/{:016x}, message IDs send/recv={}/{})",
                        from.0,
                        ike.spi_i,
                        ike.spi_r,
                        ike.next_request_id,
                        ike.next_expected_id
                    );
                    // An IKE SA's RFC 6311 sync mark rides the lease table under a reserved
                    // SPI (`ike_mid_mark_spi`): its value is the recorded M1 itself, never
                    // a sequence number to jump beyond.
                    let start_seqs: Vec<StartSeq> = start_seqs
                        .into_iter()
                        .map(|mut s| {
                            if is_ike_mid_mark(s.spi_out) && !s.exact {
                                s.first_seq = s.first_seq.saturating_sub(DEFAULT_UNSYNCED_JUMP);
                            }
                            s
                        })
                        .collect();
                    for s in &start_seqs {
                        if is_ike_mid_mark(s.spi_out) {
                            tracing::info!(
                                "{label}: {tunnel}: an RFC 6311 sync of its IKE SA was recorded (M1={}): no other sync",
                                s.first_seq
                            );
                            continue;
                        }
                        tracing::info!(
                            "{label}: {tunnel} outbound {:08x} starts at sequence {}{}",
                            s.spi_out,
                            s.first_seq,
                            if s.exact { "" } else { " (unsynced jump)" }
                        );
                        // The local datapath may still hold this SA at its own counter (this
                        // hasyncd restarted while ikemgr and espd kept the tunnel, and the
                        // partner carried it meanwhile): ikemgr then keeps its established
                        // IKE SA and installs nothing, so espd is told directly to continue
                        // at or above the start (never backwards; no-op without the SA).
                        push_skip(&mut self.skips, &tunnel, s);
                    }
                    self.takeovers.push(TakeoverInfo {
                        ike: ike_record(ike),
                        start_seqs: start_seqs
                            .into_iter()
                            .map(|s| SeqMark {
                                tunnel: tunnel.clone(),
                                spi_out: s.spi_out,
                                seq_hw: s.first_seq,
                            })
                            .collect(),
                        lifetimes: self.lifetimes_left(&tunnel),
                        held_only: false,
                    });
                    metrics::counter!("hasyncd_tunnel_takeovers_total").increment(1);
                    if from_fgsp {
                        // This cluster carries the tunnel now: its primary claims it in
                        // the FGCP table, so the secondary follows its leases.
                        if let Some(t) = self.table.as_mut() {
                            t.local_established(&tunnel);
                            self.local_tunnels.insert(tunnel.clone());
                        }
                    }
                    if self.fgsp_mode() || from_fgsp {
                        // FGSP: this member carries the tunnel now; its records come from
                        // ikemgr, and the standby copies it held are dropped (the takeover
                        // event keeps what ikemgr needs until it confirms).
                        self.ike_replicas.remove(&tunnel);
                        self.replicas.retain(|_, r| r.sa.tunnel != tunnel);
                    }
                }
                TunnelEvent::Demoted { tunnel, owner } => {
                    tracing::info!("{label}: {tunnel} is now carried by member {}", owner.0);
                    self.demotions.push(tunnel);
                }
                TunnelEvent::Reclaimed {
                    tunnel,
                    previous,
                    start_seqs,
                } => {
                    metrics::counter!("hasyncd_sequence_skips_total")
                        .increment(start_seqs.len() as u64);
                    self.reclaimed_mid_marks(&tunnel, previous, &start_seqs, from_fgsp);
                    for s in start_seqs
                        .into_iter()
                        .filter(|s| !is_ike_mid_mark(s.spi_out))
                    {
                        tracing::info!(
                            "{label}: {tunnel} outbound {:08x} continues at sequence {} or above (claimed back from member {} while carried here: its leases plus the unsynced jump)",
                            s.spi_out,
                            s.first_seq,
                            previous.0
                        );
                        push_skip(&mut self.skips, &tunnel, &s);
                    }
                    self.take_later_copy(&tunnel);
                }
            }
        }
    }

    /// `tunnel` was claimed back from `previous` ([`TunnelEvent::Reclaimed`]). A mark of
    /// an IKE SA among the previous owner's records (`start_seqs`) says an RFC 6311 sync
    /// of it was started while the tunnel was not here (a successor's, after this
    /// cluster's FGCP failover outlasted the FGSP loss time). This member must not sync
    /// that SA again (strongSwan deletes an AEAD IKE SA asked twice): the mark is kept as
    /// foreign, a grant of this member's own mark for it is withheld ([`Cluster::take_grants`]),
    /// and ikemgr gets the recorded mark (its value from the table, without the jump),
    /// so it gives up a sync it reserved and continues at or above M1.
    fn reclaimed_mid_marks(
        &mut self,
        tunnel: &str,
        previous: MemberId,
        start_seqs: &[StartSeq],
        from_fgsp: bool,
    ) {
        let table = if from_fgsp {
            self.fgsp_table.as_ref()
        } else {
            self.table.as_ref()
        };
        let marks: Vec<(u32, u64)> = start_seqs
            .iter()
            .filter(|s| is_ike_mid_mark(s.spi_out))
            .filter_map(|s| Some((s.spi_out, table?.seq_hw(tunnel, s.spi_out)?)))
            .collect();
        for (spi, m1) in marks {
            tracing::info!(
                "{tunnel}: member {} recorded an RFC 6311 sync of its IKE SA (mark {spi:08x}, M1={m1}) while it held the tunnel: no other sync here",
                previous.0
            );
            self.foreign_marks.insert((tunnel.to_string(), spi), m1);
            self.tell_recorded_mark(tunnel, spi, m1);
        }
    }

    /// M1 of another member's sync when `m` is a mark of an IKE SA that member synced
    /// while it held the tunnel ([`Cluster::reclaimed_mid_marks`]).
    fn foreign_mark(&self, m: &SeqMark) -> Option<u64> {
        if !is_ike_mid_mark(m.spi_out) {
            return None;
        }
        self.foreign_marks
            .get(&(m.tunnel.clone(), m.spi_out))
            .copied()
    }

    /// Hands ikemgr the recorded RFC 6311 sync mark `m1` of `tunnel`'s IKE SA whose mark
    /// SPI is `spi` (a held-only takeover: it moves an SA held here, restores nothing),
    /// when a record of that SA is known (ikemgr's, or another member's copy).
    fn tell_recorded_mark(&mut self, tunnel: &str, spi: u32, m1: u64) {
        let ike = match self.ike_local.get(tunnel) {
            Some(r) if ike_mid_mark_spi(r.spi_i, r.spi_r) == spi => r.clone(),
            _ => match self.ike_replicas.get(tunnel) {
                Some((_, c)) if ike_mid_mark_spi(c.spi_i, c.spi_r) == spi => ike_record(c),
                _ => return,
            },
        };
        self.takeovers.push(TakeoverInfo {
            ike,
            start_seqs: vec![SeqMark {
                tunnel: tunnel.to_string(),
                spi_out: spi,
                seq_hw: m1,
            }],
            lifetimes: Vec::new(),
            held_only: true,
        });
    }

    /// FGCP: this member turned secondary under `primary` while its ikemgr still holds
    /// IKE SAs: it was primary too (a split brain, or the primary came back and won the
    /// election), and its SAs may be later than the primary's copies. A secondary sends no
    /// stream, and a snapshot goes out only from a member that is primary when the other
    /// joins, so each IKE SA goes to the new primary directly, as it is now (ikemgr drops
    /// them once the role settles), a heartbeat interval apart, until the primary's stream
    /// shows it holds each at least as far ([`primary_holds`]; a lost hand-over left the
    /// primary's message IDs behind the peer's), at most [`IKE_HANDOVER_SENDS`] times. The primary keeps the later of its own and this copy
    /// ([`Cluster::take_later_copy`]); a repeat changes nothing.
    fn hand_ike_sas_to(&mut self, primary: MemberId) {
        self.ike_handover = None;
        if self.fgcp_me().is_some_and(|(me, _)| me == primary) || self.ike_local.is_empty() {
            return;
        }
        tracing::info!(
            "FGCP: secondary now: the {} IKE SAs ikemgr still holds go to primary {} (it keeps them where they are later than its own)",
            self.ike_local.len(),
            primary.0
        );
        let msgs: Vec<Message> = self
            .ike_local
            .values()
            .map(|r| Message::IkeSa(ike_sync(r)))
            .collect();
        self.ike_handover = Some(IkeHandover {
            to: primary,
            msgs,
            sends_left: IKE_HANDOVER_SENDS,
            next_ms: self.now_ms,
        });
        self.repeat_ike_handover(self.now_ms);
    }

    /// Sends the IKE SAs handed to the primary when due (see [`Cluster::hand_ike_sas_to`]);
    /// stops when this member is no longer secondary under that primary.
    fn repeat_ike_handover(&mut self, now_ms: u64) {
        let Some(mut h) = self.ike_handover.take() else {
            return;
        };
        if h.sends_left == 0
            || self.fgcp_role() != Some(HaRole::Secondary)
            || self.fgcp_primary() != Some(h.to)
        {
            return;
        }
        // The primary's stream (its copies here) shows which it holds now: those go no more.
        h.msgs
            .retain(|m| !primary_holds(&self.ike_replicas, h.to, m));
        if h.msgs.is_empty() {
            tracing::debug!("FGCP: primary {} holds every IKE SA handed to it", h.to.0);
            return;
        }
        if now_ms >= h.next_ms {
            for m in &h.msgs {
                self.send_fgcp_to(h.to, m);
            }
            let interval = self
                .fgcp
                .as_ref()
                .map_or(1_000, |s| s.fgcp.config().hb_interval_ms);
            h.sends_left -= 1;
            h.next_ms = now_ms.saturating_add(interval);
        }
        self.ike_handover = Some(h);
    }

    /// This member carries `tunnel` with the IKE SA its ikemgr holds, and another member's
    /// copy of that same IKE SA (its SPIs) is later: that member carried the tunnel for a
    /// while (both were primary in a split brain, or it took the tunnel over and this
    /// member claimed it back) and exchanged messages with the peer meanwhile: an RFC 6311
    /// sync, DPD answers. ikemgr is handed the copy as a takeover: it keeps its SA and
    /// moves its message IDs up to the copy's (never down). Without it, this member's next
    /// request goes out under an ID the peer has already seen and is dropped, and the
    /// peer's next request falls outside this member's window: DPD gives the tunnel up. A
    /// copy that is not later, or of another IKE SA, is left alone.
    fn take_later_copy(&mut self, tunnel: &str) {
        // An FGCP cluster over FGSP carries the tunnel unless its FGSP table gives it to a
        // cluster that showed it carries it (as `tunnel_fgsp_role`: a successor's claim
        // leaves it here, and that successor's RFC 6311 sync, answered to this member,
        // moved the peer's message IDs).
        let carrier = self.fgcp_role().is_none_or(|r| r == HaRole::Primary)
            && self.table.as_ref().and_then(|t| t.role(tunnel)) == Some(TunnelRole::SyncPrimary)
            && !self.fgsp_table.as_ref().is_some_and(|t| {
                t.role(tunnel) == Some(TunnelRole::Standby) && t.owner_carries(tunnel)
            });
        if !carrier {
            return;
        }
        let (Some(here), Some((from, copy))) =
            (self.ike_local.get(tunnel), self.ike_replicas.get(tunnel))
        else {
            return;
        };
        if (here.spi_i, here.spi_r) != (copy.spi_i, copy.spi_r)
            || !ids_later(
                (copy.next_request_id, copy.next_expected_id),
                (here.next_send, here.next_recv),
            )
        {
            return;
        }
        tracing::info!(
            "{tunnel}: member {}'s copy of the IKE SA {:016x}/{:016x} carried here is later (message IDs send/recv={}/{}, here {}/{}): ikemgr continues at its IDs",
            from.0,
            copy.spi_i,
            copy.spi_r,
            copy.next_request_id,
            copy.next_expected_id,
            here.next_send,
            here.next_recv
        );
        metrics::counter!("hasyncd_later_ike_copies_total").increment(1);
        let ike = ike_record(copy);
        // The copy stays: it is the other member's latest state of the SA (with the CHILD
        // SAs it rekeyed), which a takeover here starts from if that member keeps the
        // tunnel and its traffic later comes back (once ikemgr has moved up, the copy is no
        // longer later and nothing repeats; ikemgr's deletion of the SA removes it).
        self.takeovers.push(TakeoverInfo {
            ike,
            start_seqs: Vec::new(),
            lifetimes: self.lifetimes_left(tunnel),
            held_only: true,
        });
    }

    /// Leases espd asks for. With an FGCP link they go through the tunnel table (granted
    /// once every live member acknowledged); without one there is nobody to sync to and
    /// they are granted at once.
    pub fn propose_leases(&mut self, sas: &[SeqMark], now_ms: u64) {
        // ikemgr asks again for a mark of an IKE SA another member synced (until it has
        // that member's mark): it gets the mark, not a grant.
        let kept: Vec<SeqMark>;
        let sas = if self.foreign_marks.is_empty() {
            sas
        } else {
            let mut rest = Vec::with_capacity(sas.len());
            for m in sas {
                match self.foreign_mark(m) {
                    Some(m1) => self.tell_recorded_mark(&m.tunnel, m.spi_out, m1),
                    None => rest.push(m.clone()),
                }
            }
            kept = rest;
            &kept[..]
        };
        if self.fgsp_mode() {
            self.propose_leases_fgsp(sas, now_ms);
            return;
        }
        let primary = self.fgcp_role() == Some(HaRole::Primary);
        if self.table.is_none() {
            self.grants.extend(sas.iter().cloned());
            return;
        }
        if !primary {
            return;
        }
        let contested: BTreeSet<String> = sas
            .iter()
            .filter(|m| self.contested(&m.tunnel))
            .map(|m| m.tunnel.clone())
            .collect();
        let Some(t) = self.table.as_mut() else { return };
        for m in sas {
            if contested.contains(&m.tunnel) {
                // The member that carries it says it is primary: no claim, no lease (see
                // `contested`); asked again after it steps down.
                tracing::debug!("lease for {} refused: contested (split brain)", m.tunnel);
                continue;
            }
            // The FGCP primary carries every tunnel: a lease asked by its own espd for a
            // tunnel the table gives to another member (a stale claim from a moment when
            // that member thought it was primary, and no longer does) is claimed back with
            // a newer generation, or the lease would be refused for ever and the SA would
            // never send.
            if t.role(&m.tunnel) != Some(TunnelRole::SyncPrimary) {
                if let Some((owner, generation)) = t.owner(&m.tunnel) {
                    tracing::info!(
                        "FGCP: {} was claimed by member {} (generation {generation}); the primary claims it",
                        m.tunnel,
                        owner.0
                    );
                }
                t.local_established(&m.tunnel);
                self.local_tunnels.insert(m.tunnel.clone());
            }
            if !t.propose_lease(&m.tunnel, m.spi_out, m.seq_hw, now_ms) {
                tracing::debug!("lease for {} {:08x} refused", m.tunnel, m.spi_out);
            }
        }
        // FGCP cluster over FGSP: a synced tunnel's lease also goes to the FGSP peers (the
        // cluster's FGSP table); espd gets it once both tables confirmed it.
        let synced: Vec<bool> = sas.iter().map(|m| self.syncs(&m.tunnel)).collect();
        if let Some(f) = self.fgsp_table.as_mut() {
            for (m, synced) in sas.iter().zip(synced) {
                if !synced || contested.contains(&m.tunnel) {
                    continue;
                }
                match f.role(&m.tunnel) {
                    None => f.local_established(&m.tunnel),
                    Some(TunnelRole::SyncPrimary) => {}
                    Some(TunnelRole::Standby) if !f.owner_carries(&m.tunnel) => {
                        // Another cluster took the tunnel only as the successor of this
                        // one (it stopped hearing it), and this cluster kept carrying it
                        // (`tunnel_fgsp_role`): its datapath needs the lease, so it claims
                        // the tunnel back, as carrier. Refused, the SA would stop sending
                        // at the end of its lease (a CHILD SA rekey after a cut link
                        // stopped the traffic at once).
                        if let Some((owner, generation)) = f.owner(&m.tunnel) {
                            tracing::info!(
                                "FGSP: {} was taken by FGSP member {} as successor only (generation {generation}); this cluster carries it and claims it back",
                                m.tunnel,
                                owner.0
                            );
                        }
                        f.local_established(&m.tunnel);
                    }
                    Some(TunnelRole::Standby) => {
                        tracing::debug!(
                            "FGSP: lease for {} refused: another FGSP peer carries it",
                            m.tunnel
                        );
                        continue;
                    }
                }
                f.propose_lease(&m.tunnel, m.spi_out, m.seq_hw, now_ms);
            }
        }
        self.run_table(now_ms);
    }

    /// FGSP: a lease of a synced tunnel this member owns goes through the table; a tunnel
    /// not synced (`fgsp-sync disable`) has nobody to sync to and is granted at once.
    fn propose_leases_fgsp(&mut self, sas: &[SeqMark], now_ms: u64) {
        for m in sas {
            if !self.syncs(&m.tunnel) {
                self.grants.push(m.clone());
                continue;
            }
            let Some(t) = self.table.as_mut() else { return };
            match t.role(&m.tunnel) {
                // espd carries an SA ikemgr installed here before hasyncd saw it.
                None => t.local_established(&m.tunnel),
                Some(TunnelRole::SyncPrimary) => {}
                Some(TunnelRole::Standby) => {
                    // Another member took the tunnel: ikemgr drops it here.
                    tracing::debug!("FGSP: lease for {} refused: carried elsewhere", m.tunnel);
                    continue;
                }
            }
            if t.propose_lease(&m.tunnel, m.spi_out, m.seq_hw, now_ms) {
                tracing::debug!(
                    "FGSP: lease {} {:08x} below {} proposed",
                    m.tunnel,
                    m.spi_out,
                    m.seq_hw
                );
            } else {
                tracing::debug!("lease for {} {:08x} refused", m.tunnel, m.spi_out);
            }
        }
        self.run_table(now_ms);
    }

    /// FGSP: traffic for SAs ikemgr/espd do not carry arrived here (espd's unknown SPIs,
    /// ikemgr's IKE requests for unknown IKE SAs). A tunnel this member holds a standby copy
    /// of is promoted: the upstream router moved it here. Returns the tunnels promoted.
    pub fn unknown_traffic(&mut self, u: &UnknownSaTraffic, now_ms: u64) -> Vec<String> {
        let over = self.fgsp_table.is_some() && self.fgcp_role() == Some(HaRole::Primary);
        if !self.fgsp_mode() && !over {
            return Vec::new();
        }
        let mut tunnels: Vec<(String, String)> = Vec::new();
        for spi in &u.esp_spis {
            if let Some(r) = self.replicas.values().find(|r| r.sa.spi_in == *spi) {
                tunnels.push((r.sa.tunnel.clone(), format!("ESP SPI {spi:08x}")));
            }
        }
        for s in &u.ike_spis {
            if let Some((_, r)) = self
                .ike_replicas
                .values()
                .find(|(_, r)| (r.spi_i, r.spi_r) == (s.spi_i, s.spi_r))
            {
                tunnels.push((
                    r.tunnel.clone(),
                    format!("IKE SA {:016x}/{:016x}", s.spi_i, s.spi_r),
                ));
            }
        }
        let mut promoted = Vec::new();
        for (tunnel, what) in tunnels {
            if !self.ike_replicas.contains_key(&tunnel) || !self.syncs(&tunnel) {
                continue;
            }
            let table = if over {
                self.fgsp_table.as_mut()
            } else {
                self.table.as_mut()
            };
            let Some(t) = table else { break };
            if t.traffic_for(&tunnel) {
                tracing::info!(
                    "FGSP: {what} of standby tunnel {tunnel} arrived here: promoting it"
                );
                metrics::counter!("hasyncd_traffic_promotions_total").increment(1);
                promoted.push(tunnel);
            }
        }
        if !promoted.is_empty() {
            self.run_table(now_ms);
        }
        promoted
    }

    /// ESP from the peer reached SAs of `tunnel` that espd carries here (its activity
    /// batches). A tunnel this member (FGSP) or this cluster (FGCP over FGSP, on the
    /// primary) took only as the successor of a member it lost contact with is claimed
    /// again, on that traffic: the previous carrier, alive behind a cut link, kept the
    /// tunnel on that unproven claim and now drops it (`over_fgsp_role`) instead of holding
    /// it until a DPD gives up. Returns whether it did.
    pub fn traffic_here(&mut self, tunnel: &str, now_ms: u64) -> bool {
        if !self.syncs(tunnel) {
            return false;
        }
        let table = if self.fgsp_mode() {
            self.table.as_mut()
        } else if self.fgcp_role() == Some(HaRole::Primary) {
            self.fgsp_table.as_mut()
        } else {
            None
        };
        let Some(t) = table else { return false };
        if !t.traffic_here(tunnel) {
            return false;
        }
        tracing::info!(
            "FGSP: ESP for {tunnel}, taken here as successor, arrived at this member's SAs: it carries the tunnel; telling the FGSP peers"
        );
        metrics::counter!("hasyncd_carrier_claims_total").increment(1);
        self.run_table(now_ms);
        true
    }

    /// Tunnels another member took from this one since the last call.
    pub fn take_demotions(&mut self) -> Vec<String> {
        std::mem::take(&mut self.demotions)
    }

    /// Outbound SAs that must continue at or above a mark (`SeqSkip` for espd) since the
    /// last call.
    /// Skips not yet taken ([`Cluster::take_skips`]).
    pub fn pending_skips(&self) -> &[SeqMark] {
        &self.skips
    }

    pub fn take_skips(&mut self) -> Vec<SeqMark> {
        std::mem::take(&mut self.skips)
    }

    /// FGSP per-tunnel ownership is on: an FGSP link and no FGCP one.
    pub fn fgsp_mode(&self) -> bool {
        self.fgcp.is_none() && self.fgsp.is_some() && self.table.is_some()
    }

    /// `tunnel`'s role may have changed (see `roles_of`).
    fn note_role(&mut self, tunnel: &str) {
        if !self.roles_dirty && !self.roles_of.contains(tunnel) {
            self.roles_of.insert(tunnel.to_string());
        }
    }

    /// The tunnels whose role may have changed since the last call (the whole list when
    /// `roles_dirty` is set instead).
    pub fn take_roles_of(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.roles_of)
    }

    /// FGCP split brain seen from a primary that still hears the other member: `tunnel`
    /// belongs in the FGCP table to another member that is alive and says in its
    /// heartbeats that it is primary. That member stopped hearing this one, made itself
    /// primary and took the tunnel over above this member's leases; the client takes its
    /// packets, and this member's, lower, would arrive behind them and be dropped as
    /// replays. So this member's datapath sends nothing on the tunnel (`SeqHold`), its
    /// leases are neither proposed nor granted, and nothing is claimed back, until the
    /// other member steps down (it hears this one: the primary then claims the tunnel back
    /// above its numbers, `reclaim_stale`) or is lost (a takeover). Neither member hearing
    /// the other cannot be told from a dead partner: both send then.
    pub fn contested(&self, tunnel: &str) -> bool {
        if self.fgsp_mode() {
            return false;
        }
        let (Some(side), Some(t)) = (self.fgcp.as_ref(), self.table.as_ref()) else {
            return false;
        };
        if side.fgcp.role() != HaRole::Primary || t.role(tunnel) != Some(TunnelRole::Standby) {
            return false;
        }
        t.owner(tunnel).is_some_and(|(owner, _)| {
            side.fgcp.hears(owner) && side.peer_roles.get(&owner) == Some(&HaRole::Primary)
        })
    }

    /// Every [`Cluster::contested`] tunnel: none, without a pass over the table, unless
    /// this member is primary and another live member says it is primary too.
    pub fn contested_tunnels(&self) -> BTreeSet<String> {
        let (Some(side), Some(t)) = (self.fgcp.as_ref(), self.table.as_ref()) else {
            return BTreeSet::new();
        };
        let dual = side.fgcp.role() == HaRole::Primary
            && side
                .peer_roles
                .iter()
                .any(|(m, r)| *r == HaRole::Primary && side.fgcp.hears(*m));
        if !dual || self.fgsp_mode() {
            return BTreeSet::new();
        }
        t.roles()
            .filter(|(n, r)| *r == TunnelRole::Standby && self.contested(n))
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// FGSP: this member's role for `tunnel` in the ownership table, if it is there.
    pub fn fgsp_role(&self, tunnel: &str) -> Option<TunnelRole> {
        if !self.fgsp_mode() {
            return None;
        }
        self.table.as_ref().and_then(|t| t.role(tunnel))
    }

    /// The per-tunnel FGSP role this member acts on: in FGSP alone, the ownership table's
    /// ([`Cluster::fgsp_role`]); on the primary of an FGCP cluster over FGSP, the FGSP
    /// table's, which is the cluster's, with one condition for `standby`: the other cluster
    /// showed it carries the tunnel (claimed it on traffic that arrived there, or for a
    /// tunnel established there: `TunnelTable::owner_carries`). A claim the other cluster
    /// made only because this one fell silent on the FGSP link (its hasyncd restarted, the
    /// link was cut) is no reason to drop a tunnel the peer's traffic still reaches here:
    /// the fault run saw a carrier drop all four tunnels that way and the client
    /// renegotiate. None elsewhere (an FGCP secondary carries nothing), for a tunnel not in
    /// the table, and for such an unproven claim (this member then goes by its FGCP role).
    pub fn tunnel_fgsp_role(&self, tunnel: &str) -> Option<TunnelRole> {
        if self.fgsp_mode() {
            return self.fgsp_role(tunnel);
        }
        let t = self
            .fgsp_table
            .as_ref()
            .filter(|_| self.fgcp_role() == Some(HaRole::Primary))?;
        over_fgsp_role(t, tunnel, t.role(tunnel)?)
    }

    /// Every tunnel of the table [`Cluster::tunnel_fgsp_role`] reads, with the role it
    /// gives.
    pub fn tunnel_fgsp_roles(&self) -> Vec<(String, TunnelRole)> {
        if self.fgsp_mode() {
            return self.fgsp_roles();
        }
        self.fgsp_table
            .as_ref()
            .filter(|_| self.fgcp_role() == Some(HaRole::Primary))
            .map(|t| {
                t.roles()
                    .filter_map(|(n, r)| over_fgsp_role(t, n, r).map(|r| (n.to_string(), r)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// FGSP: every tunnel of the ownership table with this member's role.
    pub fn fgsp_roles(&self) -> Vec<(String, TunnelRole)> {
        if !self.fgsp_mode() {
            return Vec::new();
        }
        self.table
            .as_ref()
            .map(|t| t.roles().map(|(n, r)| (n.to_string(), r)).collect())
            .unwrap_or_default()
    }

    /// Whether `tunnel`'s phase1 has `fgsp-sync enable` here.
    fn syncs(&self, tunnel: &str) -> bool {
        phase1_of(tunnel, &self.phase1_names).is_some_and(|p| self.fgsp_sync.contains(p))
    }

    /// Seals `msg` once and sends it to FGSP peer `to`, or to every peer.
    fn send_fgsp(&mut self, to: Option<MemberId>, msg: &Message) {
        let Some(side) = self.fgsp.as_mut().filter(|s| s.active) else {
            return;
        };
        let known = to.is_some_and(|m| side.peers.iter().any(|p| p.id == Some(m)));
        // For one peer: off the stream, so the others see no gap ([`resync`]).
        let sealed = if known {
            side.link.seal_for_one(msg)
        } else {
            side.link.seal(msg)
        };
        let d = match sealed {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("FGSP seal: {e}");
                return;
            }
        };
        for p in side.peers.iter_mut() {
            if known && p.id != to {
                continue;
            }
            match side.sock.send_to(&d, SocketAddr::V4(p.addr)) {
                Ok(()) => {
                    p.sync_sent += 1;
                    count_sent("fgsp", d.len());
                }
                Err(e) => tracing::warn!("FGSP send to {}: {e}", p.addr),
            }
        }
    }

    /// `tunnel`'s IKE SA with SPIs `spi_i`/`spi_r` was replaced (rekeyed: its copy or the
    /// local record now has other SPIs): its RFC 6311 sync mark goes from the tunnel
    /// tables. Otherwise the marks of a long-lived tunnel's past IKE SAs would pile up, and
    /// the next IKE SA whose mark SPI is the same one (`ike_mid_mark_spi` has 255 values)
    /// would count as synchronised already and jump to the old SA's M1 at a takeover,
    /// which the peer never agreed to. The new SA's own mark cannot be recorded yet: it is
    /// asked for only after a takeover or restart of the new SA, which comes after its
    /// record on the same member's stream.
    fn forget_mid_mark(&mut self, tunnel: &str, spi_i: u64, spi_r: u64) {
        let mark = ike_mid_mark_spi(spi_i, spi_r);
        self.foreign_marks.remove(&(tunnel.to_string(), mark));
        for t in [self.table.as_mut(), self.fgsp_table.as_mut()]
            .into_iter()
            .flatten()
        {
            if t.seq_hw(tunnel, mark).is_some() {
                tracing::debug!(
                    "{tunnel}: IKE SA {spi_i:016x}/{spi_r:016x} replaced: its RFC 6311 sync mark is forgotten"
                );
                t.sa_removed(tunnel, mark);
            }
        }
    }

    /// The recorded RFC 6311 sync mark (M1) of `tunnel`'s IKE SA under `spi_out`
    /// (`bus_schema::schema::ike_mid_mark_spi`), in either tunnel table.
    pub fn mid_mark(&self, tunnel: &str, spi_out: u32) -> Option<u64> {
        [self.table.as_ref(), self.fgsp_table.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|t| t.seq_hw(tunnel, spi_out))
            .max()
    }

    /// Leases confirmed for espd, and RFC 6311 sync marks for ikemgr. A mark of an IKE SA
    /// another member synced while it held the tunnel ([`Cluster::reclaimed_mid_marks`]) is
    /// withheld: ikemgr gets that member's mark instead, again each time it asks.
    pub fn take_grants(&mut self) -> Vec<SeqMark> {
        let mut grants = std::mem::take(&mut self.grants);
        if self.foreign_marks.is_empty() {
            return grants;
        }
        let mut foreign = Vec::new();
        grants.retain(|m| match self.foreign_mark(m) {
            Some(m1) => {
                foreign.push((m.tunnel.clone(), m.spi_out, m1));
                false
            }
            None => true,
        });
        for (tunnel, spi, m1) in foreign {
            tracing::info!(
                "{tunnel}: RFC 6311 sync mark {spi:08x} not granted: another member synced this IKE SA (M1={m1}); ikemgr continues at its mark"
            );
            self.tell_recorded_mark(&tunnel, spi, m1);
        }
        grants
    }

    /// Takeovers since the last call.
    pub fn take_takeovers(&mut self) -> Vec<TakeoverInfo> {
        std::mem::take(&mut self.takeovers)
    }

    /// The IKE SAs this member carries now (ikemgr's `sa.ike` table, keyed by tunnel): every
    /// change goes to the other members in full (keys, SPIs, message IDs), removals as
    /// deletions. The changes are found by comparing with the last set
    /// ([`Cluster::update_local_ike_sas`] takes them as they are).
    pub fn set_local_ike_sas(&mut self, now: BTreeMap<String, IkeSaRecord>) {
        let changes = keyed_changes(&self.ike_local, now);
        self.update_local_ike_sas(changes);
    }

    /// What changed in the IKE SAs this member carries, by tunnel (`None`: gone), in key
    /// order; unchanged records need not be listed, so this costs what changed, not what
    /// is held.
    pub fn update_local_ike_sas(&mut self, changes: Vec<(String, Option<IkeSaRecord>)>) {
        let mut msgs = Vec::new();
        let mut rekeyed = Vec::new();
        let mut removed = Vec::new();
        for (k, r) in changes {
            let Some(r) = r else {
                if let Some(old) = self.ike_local.remove(&k) {
                    removed.push(old);
                }
                continue;
            };
            match self.ike_local.get(&k) {
                Some(old) if *old == r => continue,
                Some(old) if (old.spi_i, old.spi_r) != (r.spi_i, r.spi_r) => {
                    rekeyed.push((old.tunnel.clone(), old.spi_i, old.spi_r));
                }
                _ => {}
            }
            msgs.push(Message::IkeSa(ike_sync(&r)));
            self.ike_local.insert(k, r);
        }
        for (tunnel, spi_i, spi_r) in rekeyed {
            self.forget_mid_mark(&tunnel, spi_i, spi_r);
        }
        let mut gone = Vec::new();
        for r in &removed {
            msgs.push(Message::Delete(DeleteSync::IkeSa {
                tunnel: r.tunnel.clone(),
                spi_i: r.spi_i,
                spi_r: r.spi_r,
            }));
            gone.push(r.tunnel.clone());
            self.foreign_marks
                .remove(&(r.tunnel.clone(), ike_mid_mark_spi(r.spi_i, r.spi_r)));
        }
        // A standby copy this member still held of an IKE SA it carried and has now deleted
        // (an FGCP takeover keeps the copies it was made from) describes an SA that no
        // longer exists: it goes with it, and so do the CHILD SA copies of a tunnel this
        // member no longer carries at all. Not on a member that does not carry the tunnel
        // (an FGCP secondary, an FGSP standby): its ikemgr restarted without the SAs the
        // killed one still held, and the copies are the new carrier's, kept for the next
        // takeover.
        let carrier = self.fgcp_role().is_none_or(|r| r == HaRole::Primary);
        for r in &removed {
            // A tunnel another member (FGSP) or cluster (FGCP over FGSP) took: the copies
            // are the new owner's.
            if !carrier || self.tunnel_fgsp_role(&r.tunnel) == Some(TunnelRole::Standby) {
                continue;
            }
            if self
                .ike_replicas
                .get(&r.tunnel)
                .is_some_and(|(_, s)| (s.spi_i, s.spi_r) == (r.spi_i, r.spi_r))
            {
                self.ike_replicas.remove(&r.tunnel);
            }
            // Keyed by tunnel: no IKE SA of the tunnel is left here.
            if !self.ike_local.contains_key(&r.tunnel) {
                self.replicas.retain(|_, c| c.sa.tunnel != r.tunnel);
            }
        }
        if self.fgsp_mode() {
            // FGSP: the owner's tunnel is gone (DPD flush, delete, expiry): every member
            // forgets it (seed 000's `HA send IKE SA del`). A member that lost the tunnel to
            // another one says nothing (`send_sync` skips standby tunnels).
            for tunnel in gone.clone() {
                if self.fgsp_role(&tunnel) == Some(TunnelRole::SyncPrimary) {
                    msgs.push(Message::Delete(DeleteSync::Tunnel {
                        tunnel: tunnel.clone(),
                    }));
                    self.send_sync(&msgs, true, true);
                    msgs.clear();
                    if let Some(t) = self.table.as_mut() {
                        t.handle_delete(&DeleteSync::Tunnel {
                            tunnel: tunnel.clone(),
                        });
                    }
                    self.note_role(&tunnel);
                }
            }
        }
        let primary = self.fgcp_role() == Some(HaRole::Primary);
        let mut deleted = Vec::new();
        if let Some(t) = self.fgsp_table.as_mut().filter(|_| primary) {
            // FGCP cluster over FGSP: the tunnel this cluster carried is gone: every FGSP
            // peer (and the secondaries) forget it.
            for tunnel in gone {
                if t.role(&tunnel) == Some(TunnelRole::SyncPrimary) {
                    let del = DeleteSync::Tunnel {
                        tunnel: tunnel.clone(),
                    };
                    t.handle_delete(&del);
                    msgs.push(Message::Delete(del));
                    deleted.push(tunnel);
                }
            }
        }
        for tunnel in &deleted {
            self.note_role(tunnel);
        }
        self.send_sync_or_snapshot(&msgs);
    }

    /// A sync message from `from`: CHILD SAs and deletions update the standby copies.
    fn apply(&mut self, from: MemberId, link: &'static str, msg: Message) {
        match msg {
            Message::IkeSa(s) => {
                tracing::debug!(
                    "standby copy of IKE SA {} {:016x}/{:016x} send/recv={}/{} from member {}",
                    s.tunnel,
                    s.spi_i,
                    s.spi_r,
                    s.next_request_id,
                    s.next_expected_id,
                    from.0
                );
                let tunnel = s.tunnel.clone();
                let spis = (s.spi_i, s.spi_r);
                if let Some((_, old)) = self.ike_replicas.insert(tunnel.clone(), (from, s)) {
                    if (old.spi_i, old.spi_r) != spis {
                        self.forget_mid_mark(&tunnel, old.spi_i, old.spi_r);
                    }
                }
                self.take_later_copy(&tunnel);
            }
            Message::IkeMsgId(m) => {
                if let Some((_, s)) = self.ike_replicas.get_mut(&m.tunnel) {
                    if (s.spi_i, s.spi_r) == (m.spi_i, m.spi_r) {
                        s.next_request_id = m.next_request_id;
                        s.next_expected_id = m.next_expected_id;
                    }
                }
                self.take_later_copy(&m.tunnel);
            }
            Message::Delete(DeleteSync::IkeSa {
                tunnel,
                spi_i,
                spi_r,
            }) => {
                if self
                    .ike_replicas
                    .get(&tunnel)
                    .is_some_and(|(_, s)| (s.spi_i, s.spi_r) == (spi_i, spi_r))
                {
                    self.ike_replicas.remove(&tunnel);
                }
            }
            Message::ChildSa(sa) => {
                let key = sa_key(&sa.tunnel, sa.spi_in);
                tracing::debug!("standby copy of CHILD SA {key} from member {}", from.0);
                let received_ms = self.now_ms;
                self.replicas.insert(
                    key,
                    Replica {
                        from,
                        link,
                        sa,
                        received_ms,
                    },
                );
            }
            Message::Delete(DeleteSync::ChildSa { tunnel, spi_in }) => {
                if let Some(r) = self.replicas.remove(&sa_key(&tunnel, spi_in)) {
                    self.forget_deleted_lease(from, link, &tunnel, r.sa.spi_out);
                }
            }
            Message::Delete(DeleteSync::Tunnel { tunnel }) => {
                self.replicas.retain(|_, r| r.sa.tunnel != tunnel);
                self.ike_replicas.remove(&tunnel);
            }
            // Ownership and leases: the tunnel table (see `drive`).
            Message::Ownership(_) | Message::SeqLease(_) | Message::SeqLeaseAck(_) => {}
            other => {
                tracing::debug!("sync message {:?} not handled yet", other.msg_type());
            }
        }
    }

    /// The owner of `tunnel` deleted one of its CHILD SAs (a rekey's old SA, an expiry):
    /// the lease record of its outbound SPI goes with the copy. Every copy from another
    /// member registers one (`TunnelTable::sa_added`), and nothing else removed it on the
    /// members that do not carry the tunnel: each rekey left one behind until the tunnel
    /// itself was deleted (the 1 000-tunnel soak's standby members grew about 140 KiB per
    /// 30 s, a record per rekey; a year of hourly rekeys is 8 760 per tunnel, and every
    /// snapshot carried them). A deletion from a member that does not own the tunnel here
    /// (one that dropped its copy after losing the tunnel) leaves the owner's record alone.
    fn forget_deleted_lease(&mut self, from: MemberId, link: &str, tunnel: &str, spi_out: u32) {
        let table = if link == "fgsp" && self.fgsp_table.is_some() {
            self.fgsp_table.as_mut()
        } else {
            self.table.as_mut()
        };
        if let Some(t) = table {
            let me = t.me();
            if t.owner(tunnel)
                .is_some_and(|(owner, _)| owner == from && owner != me)
            {
                t.sa_removed(tunnel, spi_out);
            }
        }
    }

    /// What the standby copies of `tunnel`'s CHILD SAs have left of their lifetimes now
    /// (the carrier sent what was left; the time since each copy arrived is subtracted).
    pub fn lifetimes_left(&self, tunnel: &str) -> Vec<LifetimeLeft> {
        self.replicas
            .values()
            .filter(|r| r.sa.tunnel == tunnel)
            .map(|r| LifetimeLeft {
                spi_out: r.sa.spi_out,
                left: crate::usage::left_now(
                    &r.sa.lifetime,
                    self.now_ms.saturating_sub(r.received_ms),
                ),
            })
            .collect()
    }

    /// The CHILD SAs this member carries now (ikemgr's `sa.child` table): new or changed
    /// records go to the other members, removed ones as deletions. FGCP: only the primary
    /// sends. FGSP: only SAs of phase1s with `fgsp-sync enable`. The changes are found by
    /// comparing with the last set ([`Cluster::update_local_child_sas`] takes them as they
    /// are).
    pub fn set_local_child_sas(&mut self, now: BTreeMap<String, ChildSaSync>) {
        let changes = keyed_changes(&self.local, now);
        self.update_local_child_sas(changes);
    }

    /// What changed in the CHILD SAs this member carries, by key (`None`: gone), in key
    /// order; unchanged records need not be listed, so this costs what changed, not what
    /// is held.
    pub fn update_local_child_sas(&mut self, changes: Vec<(String, Option<ChildSaSync>)>) {
        let mut msgs = Vec::new();
        let mut deletes = Vec::new();
        // (tunnel, outbound SPI) of the records that come and of those that go, each only
        // when no record had (has) it before (after): what the tunnel tables count.
        let mut added = Vec::new();
        let mut replaced = Vec::new();
        let mut effective = Vec::new();
        for (k, sa) in changes {
            let old = self.local.get(&k);
            match &sa {
                Some(sa) if old == Some(sa) => continue,
                Some(sa) => {
                    msgs.push(Message::ChildSa(sa.clone()));
                    if !self
                        .local_out
                        .contains_key(&(sa.tunnel.clone(), sa.spi_out))
                    {
                        added.push((sa.tunnel.clone(), sa.spi_out));
                    }
                }
                None if old.is_none() => continue,
                None => {}
            }
            if let Some(old) = old {
                if sa.is_none() {
                    deletes.push(Message::Delete(DeleteSync::ChildSa {
                        tunnel: old.tunnel.clone(),
                        spi_in: old.spi_in,
                    }));
                }
                replaced.push((old.tunnel.clone(), old.spi_out));
            }
            effective.push((k, sa));
        }
        msgs.extend(deletes);
        for (k, sa) in effective {
            let old = match sa {
                Some(sa) => {
                    *self
                        .local_out
                        .entry((sa.tunnel.clone(), sa.spi_out))
                        .or_default() += 1;
                    self.local.insert(k, sa)
                }
                None => self.local.remove(&k),
            };
            if let Some(old) = old {
                let pair = (old.tunnel, old.spi_out);
                if let Some(n) = self.local_out.get_mut(&pair) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.local_out.remove(&pair);
                    }
                }
            }
        }
        replaced.retain(|pair| !self.local_out.contains_key(pair));
        let primary = self.fgcp_role() == Some(HaRole::Primary);
        if primary && self.fgsp_table.is_some() {
            self.register_local_over_fgsp(&added, &replaced);
        }
        if self.fgsp_mode() {
            self.register_local_fgsp(&added, &replaced);
        } else if let Some(t) = self.table.as_mut() {
            let me = t.me();
            for (tunnel, spi_out) in &added {
                if primary && self.local_tunnels.insert(tunnel.clone()) {
                    t.local_established(tunnel);
                }
                t.sa_added(me, tunnel, *spi_out);
            }
            // A CHILD SA ikemgr no longer carries is gone for good only when this member is
            // the primary that owns its tunnel (a rekey, a delete, a DPD flush). A member
            // that is not primary, or whose tunnel another member took, dropped it because
            // it is carried elsewhere: its lease record stays (the owner's leases keep it
            // current, the owner's deletion removes it), or a later takeover here would
            // find no record of the SA and start it at sequence 1 (the --ha-link fault run:
            // 148 repeated sequence numbers).
            for (tunnel, spi_out) in &replaced {
                if primary && t.role(tunnel) != Some(TunnelRole::Standby) {
                    t.sa_removed(tunnel, *spi_out);
                }
            }
        }
        self.send_sync_or_snapshot(&msgs);
    }

    /// Sends the records that changed, one datagram each; when that is many (ikemgr's
    /// replica arrived whole: a start, a restart, a bus gap), every peer gets a snapshot
    /// instead on the next drive (the same records in a few windowed datagrams): 100 000
    /// sealed datagrams in one call held the daemon for seconds, no heartbeat went out,
    /// and the burst overflowed the receivers' queues anyway.
    ///
    /// A snapshot carries every record, so it is only sent when the change is a large part
    /// of them ([`bulk_by_snapshot`]): hundreds of tunnels deleted at once out of a
    /// thousand (strongSwan tearing its tunnels down, a late tick that saw several batches)
    /// used to send the peers the thousand remaining ones, four times over on every link,
    /// to a member already loaded by the deletions.
    fn send_sync_or_snapshot(&mut self, msgs: &[Message]) {
        let held = self.ike_local.len() + self.local.len();
        if bulk_by_snapshot(msgs.len(), held) {
            tracing::info!(
                "{} records changed at once; the peers get a snapshot instead",
                msgs.len()
            );
            self.bulk_changed = true;
        } else {
            self.send_sync(msgs, true, true);
        }
    }

    /// FGSP: CHILD SAs of synced tunnels ikemgr carries here go into the ownership table (a
    /// new tunnel is claimed); a tunnel the table gives to another member is left alone
    /// (ikemgr drops it). Removed SAs are forgotten only while this member owns the tunnel,
    /// so a demoted member keeps the new owner's marks.
    fn register_local_fgsp(&mut self, added: &[(String, u32)], gone: &[(String, u32)]) {
        let synced: Vec<bool> = added.iter().map(|(t, _)| self.syncs(t)).collect();
        let mut claimed = Vec::new();
        let Some(t) = self.table.as_mut() else { return };
        let me = t.me();
        for ((tunnel, spi_out), synced) in added.iter().zip(synced) {
            if !synced {
                continue;
            }
            match t.role(tunnel) {
                None => {
                    t.local_established(tunnel);
                    claimed.push(tunnel.clone());
                }
                Some(TunnelRole::SyncPrimary) => {}
                Some(TunnelRole::Standby) => continue,
            }
            t.sa_added(me, tunnel, *spi_out);
        }
        for (tunnel, spi_out) in gone {
            if t.role(tunnel) == Some(TunnelRole::SyncPrimary) {
                t.sa_removed(tunnel, *spi_out);
            }
        }
        for tunnel in &claimed {
            self.note_role(tunnel);
        }
    }

    /// FGCP cluster over FGSP, on the primary: CHILD SAs of synced tunnels this cluster
    /// carries go into the FGSP table (a new tunnel is claimed for the cluster's FGSP id).
    fn register_local_over_fgsp(&mut self, added: &[(String, u32)], gone: &[(String, u32)]) {
        let synced: Vec<bool> = added.iter().map(|(t, _)| self.syncs(t)).collect();
        let mut claimed = Vec::new();
        let Some(t) = self.fgsp_table.as_mut() else {
            return;
        };
        let me = t.me();
        for ((tunnel, spi_out), synced) in added.iter().zip(synced) {
            if !synced {
                continue;
            }
            match t.role(tunnel) {
                None => {
                    t.local_established(tunnel);
                    claimed.push(tunnel.clone());
                }
                Some(TunnelRole::SyncPrimary) => {}
                Some(TunnelRole::Standby) => continue,
            }
            t.sa_added(me, tunnel, *spi_out);
        }
        for (tunnel, spi_out) in gone {
            if t.role(tunnel) == Some(TunnelRole::SyncPrimary) {
                t.sa_removed(tunnel, *spi_out);
                self.lease_halves.remove(&(tunnel.clone(), *spi_out));
            }
        }
        for tunnel in &claimed {
            self.note_role(tunnel);
        }
    }

    fn send_sync(&mut self, msgs: &[Message], fgcp: bool, fgsp: bool) {
        let primary = self.fgcp_role().is_none_or(|r| r == HaRole::Primary);
        if !primary {
            return;
        }
        for msg in msgs {
            // FGSP: only the tunnel's owner speaks for it (over FGSP: the owning cluster).
            if msg_tunnel(msg)
                .is_some_and(|t| self.tunnel_fgsp_role(t) == Some(TunnelRole::Standby))
            {
                continue;
            }
            if fgcp {
                if let Some(side) = self.fgcp.as_mut() {
                    match side.link.seal(msg) {
                        Ok(d) => match side.sock.send_to(&d, side.dest) {
                            Ok(()) => count_sent("fgcp", d.len()),
                            Err(e) => tracing::warn!("sync send on {}: {e}", side.hbdev),
                        },
                        Err(e) => tracing::error!("sync seal: {e}"),
                    }
                }
            }
            let phase1 = match msg {
                Message::ChildSa(sa) => Some(sa.phase1.clone()),
                Message::IkeSa(s) => Some(s.phase1.clone()),
                Message::Delete(DeleteSync::ChildSa { tunnel, spi_in }) => self
                    .local
                    .get(&sa_key(tunnel, *spi_in))
                    .map(|sa| sa.phase1.clone()),
                _ => None,
            };
            // A deletion of a record no longer known locally goes to FGSP peers too (FGSP
            // alone: only tunnels synced here).
            let to_fgsp = if self.fgsp_mode() {
                msg_tunnel(msg).is_none_or(|t| self.syncs(t))
            } else {
                phase1.is_none_or(|p| self.fgsp_sync.contains(&p))
            };
            if fgsp && to_fgsp {
                if let Some(side) = self.fgsp.as_mut().filter(|s| s.active) {
                    match side.link.seal(msg) {
                        Ok(d) => {
                            for p in side.peers.iter_mut() {
                                match side.sock.send_to(&d, SocketAddr::V4(p.addr)) {
                                    Ok(()) => {
                                        p.sync_sent += 1;
                                        count_sent("fgsp", d.len());
                                    }
                                    Err(e) => tracing::warn!("sync send to {}: {e}", p.addr),
                                }
                            }
                        }
                        Err(e) => tracing::error!("sync seal: {e}"),
                    }
                }
            }
        }
    }

    /// FGSP: the tunnels this member holds as `standby`, shaped as espd's `tunnel-list`
    /// entries (no key material), for `vpnctl diagnose vpn tunnel list`: the outbound
    /// `seqno` is where a takeover would start (the synced lease mark).
    pub fn standby_tunnels_view(&self) -> Value {
        // FGSP: the peers' tunnels; an FGCP secondary: every tunnel of the primary; an FGCP
        // cluster over FGSP: also the other clusters' tunnels.
        let secondary = matches!(self.fgcp_role(), Some(HaRole::Secondary | HaRole::Hello));
        let tables = [
            self.table
                .as_ref()
                .filter(|_| self.fgsp_mode() || secondary),
            self.fgsp_table.as_ref(),
        ];
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for t in tables.into_iter().flatten() {
            self.standby_tunnels_of(t, &mut seen, &mut out);
        }
        json!({ "tunnels": out })
    }

    fn standby_tunnels_of<'a>(
        &self,
        t: &'a TunnelTable,
        seen: &mut std::collections::BTreeSet<&'a str>,
        out: &mut Vec<Value>,
    ) {
        for (name, role) in t.roles() {
            if role != TunnelRole::Standby || !seen.insert(name) {
                continue;
            }
            let ike = self.ike_replicas.get(name).map(|(_, s)| s);
            let remote: Option<std::net::SocketAddr> = ike.and_then(|s| s.remote_addr.parse().ok());
            let sas: Vec<Value> = self
                .replicas
                .values()
                .filter(|r| r.sa.tunnel == name)
                .map(|r| {
                    let sa = &r.sa;
                    json!({
                        "proxyid": sa.phase2,
                        "src": sa.local_ts,
                        "dst": sa.remote_ts,
                        "replaywin": sa.replay_window,
                        "seqno": t.seq_hw(name, sa.spi_out).unwrap_or(0).max(1),
                        "esn": sa.esn,
                        "outbound": false,
                        "life": { "timeout": sa.lifetime.hard_s },
                        "dec": { "spi": format!("{:08x}", sa.spi_in), "esp": sa.transform },
                        "enc": { "spi": format!("{:08x}", sa.spi_out), "esp": sa.transform },
                    })
                })
                .collect();
            out.push(json!({
                "name": name,
                "phase1": ike.map(|s| s.phase1.clone()).unwrap_or_default(),
                "remote_gw": remote.map(|a| a.ip().to_string()).unwrap_or_default(),
                "remote_port": remote.map(|a| a.port()).unwrap_or(0),
                "role": role.as_str(),
                "owner": t.owner(name).map(|o| o.0 .0),
                "sas": sas,
            }));
        }
    }

    /// Standby copies (no key material), for the `replicas` view.
    pub fn replicas_view(&self) -> Value {
        let v: Vec<Value> = self
            .replicas
            .values()
            .map(|r| {
                json!({
                    "tunnel": r.sa.tunnel,
                    "phase1": r.sa.phase1,
                    "phase2": r.sa.phase2,
                    "spi_in": format!("{:08x}", r.sa.spi_in),
                    "spi_out": format!("{:08x}", r.sa.spi_out),
                    "transform": r.sa.transform,
                    "from": r.from.0,
                    "link": r.link,
                })
            })
            .collect();
        let ike: Vec<Value> = self
            .ike_replicas
            .values()
            .map(|(from, s)| {
                json!({
                    "tunnel": s.tunnel,
                    "phase1": s.phase1,
                    "spi_i": format!("{:016x}", s.spi_i),
                    "spi_r": format!("{:016x}", s.spi_r),
                    "remote": s.remote_addr,
                    "msg_id_send": s.next_request_id,
                    "msg_id_recv": s.next_expected_id,
                    "from": from.0,
                })
            })
            .collect();
        let leases: Vec<Value> = self
            .table
            .as_ref()
            .map(|t| {
                t.roles()
                    .map(|(n, r)| json!({"tunnel": n, "role": r.as_str(), "owner": t.owner(n).map(|o| o.0 .0)}))
                    .collect()
            })
            .unwrap_or_default();
        json!({ "standby": v, "local": self.local.len(), "ike_standby": ike,
                "ike_local": self.ike_local.len(), "tunnels": leases })
    }

    /// `diagnose sys ha status` as JSON.
    pub fn ha_status(&self, now_ms: u64) -> Value {
        let Some(s) = self.fgcp.as_ref() else {
            return json!({ "mode": "standalone", "members": [] });
        };
        let members: Vec<Value> = s
            .fgcp
            .members(now_ms)
            .iter()
            .map(|m| {
                json!({
                    "member_id": m.member.0,
                    "serial": m.serial,
                    "role": if m.primary { "primary" } else { "secondary" },
                    "priority": m.priority,
                    "age_ms": m.age_ms,
                    "monitor_failed": m.monitor_failed,
                    "silent_ms": m.silent_ms,
                    "hostname": if m.member == s.fgcp.config().me {
                        s.hostname.clone()
                    } else {
                        s.hostnames.get(&m.member).cloned().unwrap_or_default()
                    },
                })
            })
            .collect();
        let st = s.link.stats();
        json!({
            "mode": "a-p",
            "group_id": s.group_id,
            "hbdev": s.hbdev,
            "session_pickup": s.session_pickup,
            "port": FGCP_PORT,
            "me": s.fgcp.config().me.0,
            "epoch": s.link.epoch(),
            "role": role_name(s.fgcp.role()),
            "primary": s.fgcp.primary().map(|m| m.0),
            "ha_id_changes": s.ha_id_changes,
            "failovers": self.failovers,
            "hb_interval_ms": s.fgcp.config().hb_interval_ms,
            "hb_lost_threshold": s.fgcp.config().hb_lost_threshold,
            "override": s.fgcp.config().override_,
            "link": {
                "sent": st.sent, "sent_bytes": st.sent_bytes,
                "received": st.received, "received_bytes": st.received_bytes,
                "drops": st.drops_total(),
            },
            "members": members,
        })
    }

    /// `diagnose sys ha standalone-peers` as JSON.
    pub fn standalone_peers(&self) -> Value {
        let Some(s) = self.fgsp.as_ref() else {
            return json!({ "configured": false, "peers": [] });
        };
        let live: Vec<MemberId> = s.live.peers().collect();
        let peers: Vec<Value> = s
            .peers
            .iter()
            .map(|p| {
                json!({
                    "peerip": p.addr.ip().to_string(),
                    "port": p.addr.port(),
                    "standalone_id": p.id.map(|m| m.0),
                    "detected": p.id.is_some_and(|id| live.contains(&id)),
                    "session_send": p.sync_sent,
                    "session_recv": p.sync_recv,
                    "packet_send": 0,
                    "packet_recv": 0,
                })
            })
            .collect();
        json!({
            "configured": true,
            "group": s.group,
            "id": s.me.0,
            "active": s.active,
            "detected_peers": live.len(),
            "hb_interval_ms": s.hb_ms,
            "lost_after_ms": s.lost_ms,
            "peers": peers,
        })
    }
}

/// `(tunnel, outbound SPI)` of CHILD SA records.
/// Whether `changed` records go to the peers as a snapshot of the `held` records this
/// member now carries rather than one datagram each: more than [`BULK_BY_SNAPSHOT`], and
/// either more than [`BULK_SEND_MAX`] or at least half of what the snapshot would carry.
fn bulk_by_snapshot(changed: usize, held: usize) -> bool {
    changed > BULK_BY_SNAPSHOT && (changed > BULK_SEND_MAX || changed.saturating_mul(2) >= held)
}

/// What turns `old` into `now`: changed and new entries, and removed keys (`None`), in key
/// order.
fn keyed_changes<V: PartialEq>(
    old: &BTreeMap<String, V>,
    now: BTreeMap<String, V>,
) -> Vec<(String, Option<V>)> {
    let mut out: Vec<(String, Option<V>)> = old
        .keys()
        .filter(|k| !now.contains_key(*k))
        .map(|k| (k.clone(), None))
        .collect();
    out.extend(
        now.into_iter()
            .filter(|(k, v)| old.get(k) != Some(v))
            .map(|(k, v)| (k, Some(v))),
    );
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// An FGCP cluster over FGSP: the role the FGSP table gives `tunnel` (`role`), as this
/// cluster acts on it. `standby` only when the owning cluster showed it carries the tunnel;
/// otherwise none (the FGCP role decides).
fn over_fgsp_role(t: &TunnelTable, tunnel: &str, role: TunnelRole) -> Option<TunnelRole> {
    match role {
        TunnelRole::Standby if !t.owner_carries(tunnel) => None,
        r => Some(r),
    }
}

/// The tunnel a sync message is about.
fn msg_tunnel(msg: &Message) -> Option<&str> {
    match msg {
        Message::IkeSa(s) => Some(&s.tunnel),
        Message::IkeMsgId(m) => Some(&m.tunnel),
        Message::ChildSa(sa) => Some(&sa.tunnel),
        Message::Delete(
            DeleteSync::IkeSa { tunnel, .. }
            | DeleteSync::ChildSa { tunnel, .. }
            | DeleteSync::Tunnel { tunnel },
        ) => Some(tunnel),
        Message::SeqLease(l) => Some(&l.tunnel),
        Message::SeqLeaseAck(a) => Some(&a.tunnel),
        Message::Ownership(c) => Some(&c.tunnel),
        Message::Heartbeat(_)
        | Message::SnapshotRequest(_)
        | Message::SnapshotChunk(_)
        | Message::ConfigStatus(_)
        | Message::ConfigRequest(_)
        | Message::ConfigChunk(_) => None,
    }
}

/// The phase1 a tunnel belongs to: the phase1 itself, or a dial-up instance
/// `<phase1>_<n>`; the longest matching name wins.
pub fn phase1_of<'a>(tunnel: &str, phase1s: &'a [String]) -> Option<&'a str> {
    phase1s
        .iter()
        .filter(|p| {
            tunnel == p.as_str()
                || tunnel
                    .strip_prefix(p.as_str())
                    .and_then(|rest| rest.strip_prefix('_'))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .max_by_key(|p| p.len())
        .map(String::as_str)
}

/// ikemgr's IKE SA record as an HA sync message.
fn ike_sync(r: &IkeSaRecord) -> IkeSaSync {
    IkeSaSync {
        tunnel: r.tunnel.clone(),
        phase1: r.phase1.clone(),
        spi_i: r.spi_i,
        spi_r: r.spi_r,
        remote_addr: r.remote.clone(),
        next_request_id: r.next_send,
        next_expected_id: r.next_recv,
        msg_id_sync: false,
        state: KeyBytes(r.keys.clone()),
    }
}

/// Queues for the local espd (the daemon's `SeqSkip`) that `tunnel`'s outbound SA
/// `s.spi_out` continues at `s.first_seq` or above: never backwards, a no-op for an SA it
/// does not hold.
fn push_skip(skips: &mut Vec<SeqMark>, tunnel: &str, s: &StartSeq) {
    skips.push(SeqMark {
        tunnel: tunnel.to_string(),
        spi_out: s.spi_out,
        seq_hw: s.first_seq,
    });
}

/// An HA copy of an IKE SA as ikemgr's record (for a takeover).
fn ike_record(ike: &IkeSaSync) -> IkeSaRecord {
    IkeSaRecord {
        tunnel: ike.tunnel.clone(),
        phase1: ike.phase1.clone(),
        spi_i: ike.spi_i,
        spi_r: ike.spi_r,
        next_send: ike.next_request_id,
        next_recv: ike.next_expected_id,
        remote: ike.remote_addr.clone(),
        keys: ike.state.expose().to_vec(),
    }
}

/// Whether message IDs `copy` (next to send, next expected) are later than `here`: none
/// behind, and not the same.
/// Whether the copy `primary` streamed here of the IKE SA in hand-over message `m` shows
/// the primary holds it at least as far: the same SPIs, message IDs no lower on either side.
fn primary_holds(
    replicas: &BTreeMap<String, (MemberId, IkeSaSync)>,
    primary: MemberId,
    m: &Message,
) -> bool {
    let Message::IkeSa(handed) = m else {
        return true;
    };
    replicas.get(&handed.tunnel).is_some_and(|(from, s)| {
        *from == primary
            && (s.spi_i, s.spi_r) == (handed.spi_i, handed.spi_r)
            && s.next_request_id >= handed.next_request_id
            && s.next_expected_id >= handed.next_expected_id
    })
}

fn ids_later(copy: (u32, u32), here: (u32, u32)) -> bool {
    copy != here && copy.0 >= here.0 && copy.1 >= here.1
}

/// Role spelling on the bus and in views.
pub fn role_name(r: HaRole) -> &'static str {
    match r {
        HaRole::Primary => "primary",
        HaRole::Secondary => "secondary",
        HaRole::Hello => "hello",
    }
}

fn start_fgcp(ha: &haven_config::Ha, now_ms: u64, epoch: u64) -> Result<FgcpSide, String> {
    let key = LinkKey::derive(
        ClusterKind::Fgcp,
        ha.group_id,
        secret_of(&ha.password),
        ha_core::link::DEFAULT_PBKDF2_ITERATIONS,
    )
    .map_err(|e| e.to_string())?;
    let hbdev = ha
        .hbdev
        .first()
        .map(|h| h.interface.clone())
        .ok_or("`config system ha` has no `hbdev`; heartbeats need an interface")?;
    let mac = hw_addr(&hbdev).map_err(|e| format!("hbdev {hbdev:?}: {e}"))?;
    // Identity: FortiOS uses the serial number; Haven uses the heartbeat device's MAC,
    // unique on a segment and stable across daemon restarts.
    let serial = format!(
        "HVN{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    );
    let me = MemberId(u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]));
    let mut cfg = FgcpConfig::new(me, serial, ha.priority);
    cfg.override_ = ha.override_;
    cfg.hb_interval_ms = u64::from(ha.hb_interval_ms());
    cfg.hb_lost_threshold = u32::from(ha.hb_lost_threshold);
    let link = hbpump::SharedLink::new(HaLink::new(key, me, epoch).map_err(|e| e.to_string())?);
    let id = LinkIdentity {
        group: ha.group_id,
        me,
    };
    let sock = LinkSocket::bind(FGCP_PORT, Some(&hbdev), id)
        .map_err(|e| format!("heartbeat socket on {hbdev:?} port {FGCP_PORT}: {e}"))?;
    let dest = SocketAddr::from((Ipv4Addr::BROADCAST, FGCP_PORT));
    let pump = start_pump(&sock, &link, "fgcp", vec![dest]);
    // The hello phase starts now that the socket listens: the key derivation above
    // (PBKDF2) can take longer than a whole hello phase on a loaded machine, and a member
    // that hears nobody during its hello elects itself.
    let listening_ms = haven_daemon::now_ns() / 1_000_000;
    let fgcp = Fgcp::new(cfg, now_ms.max(listening_ms)).map_err(|e| e.to_string())?;
    let reported_role = fgcp.role();
    Ok(FgcpSide {
        sock,
        dest,
        link,
        pump,
        fgcp,
        group_id: ha.group_id,
        session_pickup: ha.session_pickup,
        hostname: hostname(),
        hbdev,
        hostnames: Default::default(),
        ha_id_changes: 0,
        peer_roles: BTreeMap::new(),
        now_secondary: Vec::new(),
        stepped_down: false,
        peer_role_changed: false,
        addrs: BTreeMap::new(),
        loss: Default::default(),
        restarted: Vec::new(),
        reported_role,
        fgsp_epoch_out: 0,
        fgsp_epoch_heard: 0,
        fgsp_peers_out: Vec::new(),
        fgsp_peers_heard: BTreeMap::new(),
    })
}

/// The heartbeat thread of a link (None, logged, when it cannot start: heartbeats then go
/// from the tick only).
fn start_pump(
    sock: &LinkSocket,
    link: &hbpump::SharedLink,
    name: &'static str,
    dests: Vec<SocketAddr>,
) -> Option<hbpump::HeartbeatPump> {
    sock.sender()
        .and_then(|sock| {
            hbpump::HeartbeatPump::start(hbpump::PumpIo {
                link: link.clone(),
                name,
                sock,
                dests,
                now_ms: || haven_daemon::now_ns() / 1_000_000,
                sent: count_sent,
            })
        })
        .map_err(|e| {
            tracing::error!("{name} heartbeat thread: {e}; heartbeats go from the tick only")
        })
        .ok()
}

fn start_fgsp(
    sc: &haven_config::StandaloneCluster,
    now_ms: u64,
    epoch: u64,
    active: bool,
) -> Result<FgspSide, String> {
    let key = LinkKey::derive(
        ClusterKind::Fgsp,
        u16::from(sc.standalone_group_id),
        secret_of(&sc.psksecret),
        ha_core::link::DEFAULT_PBKDF2_ITERATIONS,
    )
    .map_err(|e| e.to_string())?;
    let me = MemberId(u32::from(sc.group_member_id));
    let link =
        hbpump::SharedLink::new(HaLink::new(key.clone(), me, epoch).map_err(|e| e.to_string())?);
    let port = sc
        .cluster_peers
        .first()
        .map(|p| p.port)
        .unwrap_or(haven_config::FGSP_PORT);
    let id = LinkIdentity {
        group: key.group(),
        me,
    };
    let sock =
        LinkSocket::bind(port, None, id).map_err(|e| format!("FGSP socket on port {port}: {e}"))?;
    let (hb_ms, lost_ms) = fgsp_timing(&sc.cluster_peers);
    tracing::info!("FGSP: heartbeat every {hb_ms} ms, a peer silent for {lost_ms} ms is lost");
    let dests = sc
        .cluster_peers
        .iter()
        .map(|p| SocketAddr::V4(SocketAddrV4::new(p.peerip, p.port)))
        .collect();
    let pump = start_pump(&sock, &link, "fgsp", dests);
    Ok(FgspSide {
        sock,
        key,
        link,
        pump,
        live: Liveness::new(lost_ms),
        hb_ms,
        lost_ms,
        me,
        group: sc.standalone_group_id,
        peers: sc
            .cluster_peers
            .iter()
            .map(|p| FgspPeer {
                addr: SocketAddrV4::new(p.peerip, p.port),
                id: None,
                sync_sent: 0,
                sync_recv: 0,
            })
            .collect(),
        next_hb_ms: now_ms,
        active,
        loss: Default::default(),
        presumed: BTreeSet::new(),
        restarted: Vec::new(),
    })
}

impl FgcpSide {
    /// Returns the sync messages (not heartbeats) received, with their epoch and counter.
    fn drive(&mut self, now_ms: u64) -> Vec<(MemberId, u64, u64, Message)> {
        let mut out = Vec::new();
        count_drops("fgcp", "queue_full", self.sock.take_queue_full());
        count_drops("fgcp", "socket_buffer", self.sock.take_kernel_drops());
        count_drops(
            "fgcp",
            ha_core::DropReason::Reflected.label(),
            self.sock.take_reflected(),
        );
        for (bytes, from) in self.sock.drain() {
            match self.link.open(&bytes) {
                Err(reason) => count_drop("fgcp", reason.label()),
                Ok(r) => {
                    count_received("fgcp", bytes.len());
                    if r.to_all {
                        self.loss.heard(r.sender, r.epoch, r.stream, now_ms);
                    } else {
                        self.loss.seen_up_to(r.sender, r.epoch, r.stream, now_ms);
                    }
                    self.addrs.insert(r.sender, from);
                    if r.new_epoch {
                        self.restarted.push(r.sender);
                    }
                    if let Message::Heartbeat(hb) = &r.message {
                        let before = self.peer_roles.insert(r.sender, hb.role);
                        if before != Some(hb.role) {
                            self.peer_role_changed = true;
                        }
                        if hb.role == HaRole::Secondary && before != Some(HaRole::Secondary) {
                            self.now_secondary.push(r.sender);
                        }
                        if before == Some(HaRole::Primary) && hb.role != HaRole::Primary {
                            self.stepped_down = true;
                        }
                        self.hostnames.insert(r.sender, hb.serial.clone());
                        self.fgsp_epoch_heard = self.fgsp_epoch_heard.max(hb.fgsp_epoch);
                        let mut peers = hb.fgsp_peers.clone();
                        peers.truncate(MAX_FGSP_PEERS_ANNOUNCED);
                        self.fgsp_peers_heard.insert(r.sender, peers);
                        self.fgcp.handle_heartbeat(r.sender, hb, now_ms);
                    } else {
                        // Alive on any message, as FGSP peers are: a lossy heartbeat link
                        // must not declare lost a member whose leases and snapshot arrive.
                        self.fgcp.handle_alive(r.sender, now_ms);
                        out.push((r.sender, r.epoch, r.counter, r.message));
                    }
                }
            }
        }
        if now_ms >= self.fgcp.poll_timeout() {
            self.fgcp.handle_timeout(now_ms);
        }
        self.send_heartbeats(now_ms);
        out
    }

    /// This member's heartbeats due at `now_ms` (unless the pump sent one within the
    /// interval and this one says nothing new).
    fn send_heartbeats(&mut self, now_ms: u64) {
        let interval_ms = self.fgcp.config().hb_interval_ms;
        while let Some(mut hb) = self.fgcp.poll_transmit(now_ms) {
            hb.fgsp_epoch = self.fgsp_epoch_out;
            hb.fgsp_peers.clone_from(&self.fgsp_peers_out);
            if let Some(p) = &self.pump {
                if !p.tick(now_ms, interval_ms, Some(&hb)) {
                    continue;
                }
            }
            match self.link.seal(&Message::Heartbeat(hb)) {
                Ok(d) => match self.sock.send_to(&d, self.dest) {
                    Ok(()) => count_sent("fgcp", d.len()),
                    Err(e) => tracing::debug!("heartbeat send on {}: {e}", self.hbdev),
                },
                Err(e) => tracing::error!("heartbeat seal: {e}"),
            }
        }
        if let Some(p) = &self.pump {
            p.tick(now_ms, interval_ms, None);
        }
    }
}

impl FgspSide {
    /// Starts to speak for the cluster: `peers`, heard by the member that spoke before, are
    /// presumed alive from `now_ms` (lost after the loss time unless heard). Returns those
    /// not alive here already. Their first message counts as their coming up if their
    /// address is not known yet.
    fn presume<'a>(
        &mut self,
        peers: impl Iterator<Item = &'a MemberId>,
        now_ms: u64,
    ) -> Vec<MemberId> {
        let mut presumed = Vec::new();
        for &m in peers {
            // Alive here already (or listed twice, or itself): its last-heard time stands.
            if m == self.me || self.live.peers().any(|p| p == m) {
                continue;
            }
            self.live.heard(m, now_ms);
            tracing::info!(
                "FGSP peer {} presumed alive (the cluster's previous speaker heard it); leases wait for it until it is heard or lost",
                m.0
            );
            presumed.push(m);
            if !self.peers.iter().any(|p| p.id == Some(m)) {
                self.presumed.insert(m);
            }
        }
        presumed
    }

    /// Returns whether the set of detected peers changed, the sync messages received, and
    /// whether a peer came up.
    #[allow(clippy::type_complexity)]
    fn drive(
        &mut self,
        now_ms: u64,
    ) -> (
        bool,
        Vec<(MemberId, u64, u64, Message)>,
        bool,
        Vec<PeerEvent>,
    ) {
        let mut changed = false;
        let mut events = Vec::new();
        let mut joined = false;
        let mut msgs = Vec::new();
        count_drops("fgsp", "queue_full", self.sock.take_queue_full());
        count_drops("fgsp", "socket_buffer", self.sock.take_kernel_drops());
        count_drops(
            "fgsp",
            ha_core::DropReason::Reflected.label(),
            self.sock.take_reflected(),
        );
        for (bytes, from) in self.sock.drain() {
            if !self.active {
                continue;
            }
            match self.link.open(&bytes) {
                Err(reason) => count_drop("fgsp", reason.label()),
                Ok(r) => {
                    count_received("fgsp", bytes.len());
                    if r.to_all {
                        self.loss.heard(r.sender, r.epoch, r.stream, now_ms);
                    } else {
                        self.loss.seen_up_to(r.sender, r.epoch, r.stream, now_ms);
                    }
                    let peer = self
                        .peers
                        .iter_mut()
                        .find(|p| IpAddr::V4(*p.addr.ip()) == from.ip());
                    if let Some(p) = peer {
                        p.id = Some(r.sender);
                        // Session counters: records, not heartbeats or snapshot transfer.
                        if !matches!(
                            r.message,
                            Message::Heartbeat(_)
                                | Message::SnapshotChunk(_)
                                | Message::SnapshotRequest(_)
                                | Message::ConfigStatus(_)
                                | Message::ConfigRequest(_)
                                | Message::ConfigChunk(_)
                        ) {
                            p.sync_recv += 1;
                        }
                    }
                    if let Some(ev) = self.live.heard(r.sender, now_ms) {
                        changed = true;
                        if let PeerEvent::Up(m) = ev {
                            joined = true;
                            tracing::info!("FGSP peer {} detected ({from})", m.0);
                        }
                        events.push(ev);
                    } else if self.presumed.remove(&r.sender) {
                        // Presumed alive until now: it comes up (a snapshot goes to it).
                        changed = true;
                        joined = true;
                        tracing::info!("FGSP peer {} detected ({from}), as presumed", r.sender.0);
                        events.push(PeerEvent::Up(r.sender));
                    } else if r.new_epoch && !self.restarted.contains(&r.sender) {
                        self.restarted.push(r.sender);
                    }
                    if !matches!(r.message, Message::Heartbeat(_)) {
                        msgs.push((r.sender, r.epoch, r.counter, r.message));
                    }
                }
            }
        }
        for ev in self.live.handle_timeout(now_ms) {
            changed = true;
            if let PeerEvent::Lost(m) = ev {
                metrics::counter!("hasyncd_peers_lost_total", "link" => "fgsp").increment(1);
                if self.presumed.remove(&m) {
                    tracing::warn!(
                        "FGSP peer {} lost (presumed alive, never heard by this member)",
                        m.0
                    );
                } else {
                    tracing::warn!("FGSP peer {} lost", m.0);
                }
            }
            events.push(ev);
        }
        if self.active && now_ms >= self.next_hb_ms {
            self.next_hb_ms = now_ms.saturating_add(self.hb_ms);
            let hb = Heartbeat {
                member: self.me,
                serial: format!("standalone-{}", self.me.0),
                priority: 0,
                override_: false,
                uptime_ms: 0,
                monitor_up: 0,
                monitor_total: 0,
                role: HaRole::Primary,
                primary: Some(self.me),
                fgsp_epoch: 0,
                fgsp_peers: Vec::new(),
            };
            // The pump sent one within the interval: this one can wait.
            let skip = self
                .pump
                .as_ref()
                .is_some_and(|p| !p.tick(now_ms, self.hb_ms, Some(&hb)));
            match (!skip)
                .then(|| self.link.seal(&Message::Heartbeat(hb)))
                .transpose()
            {
                Ok(None) => {}
                Ok(Some(d)) => {
                    for p in &self.peers {
                        match self.sock.send_to(&d, SocketAddr::V4(p.addr)) {
                            Ok(()) => count_sent("fgsp", d.len()),
                            Err(e) => tracing::debug!("FGSP heartbeat to {}: {e}", p.addr),
                        }
                    }
                }
                Err(e) => tracing::error!("FGSP heartbeat seal: {e}"),
            }
        }
        if let Some(p) = &self.pump {
            p.tick(now_ms, self.hb_ms, None);
        }
        if changed {
            metrics::gauge!("hasyncd_fgsp_detected_peers").set(self.live.peers().count() as f64);
        }
        (changed, msgs, joined, events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_core::msg::{ChildLifetime, KeyBytes};

    /// Another member's record of `vpn1_1`'s IKE SA with these SPIs and message IDs.
    fn ike_copy(spi_i: u64, spi_r: u64, send: u32, recv: u32) -> IkeSaSync {
        IkeSaSync {
            tunnel: "vpn1_1".into(),
            phase1: "vpn1".into(),
            spi_i,
            spi_r,
            remote_addr: "192.168.7.2:4500".into(),
            next_request_id: send,
            next_expected_id: recv,
            msg_id_sync: false,
            state: KeyBytes(vec![7; 8]),
        }
    }

    /// `config cluster-peer` `hb-interval` / `hb-lost-threshold`: defaults 200 ms and
    /// 1.2 s; the shortest interval and the longest loss time of the peers.
    #[test]
    fn fgsp_timing_from_the_cluster_peers() {
        assert_eq!(fgsp_timing(&[]), (200, 1_200));
        let text = "config system standalone-cluster\n    set standalone-group-id 1\n    \
                    set group-member-id 1\n    config cluster-peer\n        edit 1\n            \
                    set peerip 172.31.1.2\n        next\n        edit 2\n            \
                    set peerip 172.31.1.3\n            set hb-interval 1\n            \
                    set hb-lost-threshold 4\n        next\n    end\nend\n";
        let sc = haven_config::parse(text)
            .unwrap()
            .config
            .standalone
            .unwrap();
        assert_eq!(fgsp_timing(&sc.cluster_peers[..1]), (200, 1_200));
        assert_eq!(fgsp_timing(&sc.cluster_peers[1..]), (100, 400));
        assert_eq!(fgsp_timing(&sc.cluster_peers), (100, 1_200));
    }

    fn sa(tunnel: &str, spi_in: u32) -> ChildSaSync {
        ChildSaSync {
            tunnel: tunnel.into(),
            phase1: "vpn1".into(),
            phase2: "vpn1".into(),
            ike_spi_i: 0,
            ike_spi_r: 0,
            spi_in,
            spi_out: spi_in + 1,
            transform: "aes128-sha1".into(),
            esn: false,
            keys_in: KeyBytes(vec![1; 36]),
            keys_out: KeyBytes(vec![2; 36]),
            local_ts: vec![],
            remote_ts: vec![],
            routes: vec![],
            lifetime: ChildLifetime {
                soft_s: 0,
                hard_s: 0,
                soft_bytes: 0,
                hard_bytes: 0,
            },
            replay_window: 64,
        }
    }

    #[test]
    fn standby_copies_follow_sync_and_delete_messages() {
        let mut c = Cluster::start(&Config::default(), 0, EpochStore::in_memory());
        c.apply(MemberId(2), "fgcp", Message::ChildSa(sa("vpn1_1", 0x10)));
        c.apply(MemberId(2), "fgcp", Message::ChildSa(sa("vpn1_1", 0x11)));
        c.apply(MemberId(3), "fgsp", Message::ChildSa(sa("vpn1_2", 0x20)));
        assert_eq!(c.replicas.len(), 3);
        c.apply(
            MemberId(2),
            "fgcp",
            Message::Delete(DeleteSync::ChildSa {
                tunnel: "vpn1_1".into(),
                spi_in: 0x10,
            }),
        );
        assert_eq!(c.replicas.len(), 2);
        c.apply(
            MemberId(3),
            "fgsp",
            Message::Delete(DeleteSync::Tunnel {
                tunnel: "vpn1_2".into(),
            }),
        );
        let v = c.replicas_view();
        assert_eq!(v["standby"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["standby"][0]["spi_in"], "00000011");
        // The view never carries keys.
        assert!(!v.to_string().contains("keys"), "{v}");
    }

    /// The owner's deletion of a CHILD SA removes its lease record here with the copy; a
    /// deletion from a member that does not own the tunnel leaves the record.
    #[test]
    fn the_owners_deletion_of_a_child_sa_forgets_its_lease_record() {
        let mut c = Cluster::start(&Config::default(), 0, EpochStore::in_memory());
        c.table = Some(TunnelTable::with_mode(MemberId(1), TableMode::Fgcp));
        let record =
            |c: &Cluster, spi_out: u32| c.table.as_ref().unwrap().seq_hw("vpn1_1", spi_out);
        for spi_in in [0x10, 0x20] {
            let msg = Message::ChildSa(sa("vpn1_1", spi_in));
            c.table.as_mut().unwrap().handle_message(MemberId(2), &msg);
            c.apply(MemberId(2), "fgcp", msg);
        }
        c.table.as_mut().unwrap().handle_lease(
            MemberId(2),
            &ha_core::msg::SeqLease {
                tunnel: "vpn1_1".into(),
                spi_out: 0x11,
                seq_hw: 1 << 20,
            },
        );
        assert_eq!(record(&c, 0x11), Some(1 << 20));
        assert_eq!(record(&c, 0x21), Some(0));
        let del = |spi_in: u32| {
            Message::Delete(DeleteSync::ChildSa {
                tunnel: "vpn1_1".into(),
                spi_in,
            })
        };
        // Member 3 does not own the tunnel: its copy goes, the record stays.
        c.apply(MemberId(3), "fgcp", Message::ChildSa(sa("vpn1_1", 0x10)));
        c.apply(MemberId(3), "fgcp", del(0x10));
        assert_eq!(record(&c, 0x11), Some(1 << 20));
        // The owner deletes it (the old SA of a rekey): copy and record go, the other SA's
        // record stays, and so does the tunnel with its owner.
        c.apply(MemberId(2), "fgcp", Message::ChildSa(sa("vpn1_1", 0x10)));
        c.apply(MemberId(2), "fgcp", del(0x10));
        assert_eq!(record(&c, 0x11), None);
        assert_eq!(record(&c, 0x21), Some(0));
        assert_eq!(
            c.table.as_ref().unwrap().owner("vpn1_1").map(|o| o.0),
            Some(MemberId(2))
        );
        assert_eq!(c.replicas.len(), 1);
    }

    /// A standby copy carries what its lifetimes had left when sent; a takeover hands
    /// ikemgr that minus the time since it arrived (bytes as sent).
    #[test]
    fn takeover_lifetimes_count_from_when_the_copy_arrived() {
        let mut c = Cluster::start(&Config::default(), 0, EpochStore::in_memory());
        c.drive(5_000);
        let mut copy = sa("vpn1_1", 0x10);
        copy.lifetime = ChildLifetime {
            soft_s: 40,
            hard_s: 60,
            soft_bytes: 1_000,
            hard_bytes: 2_000,
        };
        c.apply(MemberId(2), "fgcp", Message::ChildSa(copy));
        c.apply(MemberId(2), "fgcp", Message::ChildSa(sa("vpn1_2", 0x20)));
        c.drive(30_500);
        let left = c.lifetimes_left("vpn1_1");
        assert_eq!(
            left,
            vec![LifetimeLeft {
                spi_out: 0x11,
                left: bus_schema::schema::SaLifetime {
                    soft_secs: 15,
                    hard_secs: 35,
                    soft_bytes: 1_000,
                    hard_bytes: 2_000,
                },
            }]
        );
        // No limits stay no limits.
        assert_eq!(
            c.lifetimes_left("vpn1_2")[0].left,
            bus_schema::schema::SaLifetime::default()
        );
    }

    #[test]
    fn a_tunnel_belongs_to_its_phase1_or_dialup_parent() {
        let p: Vec<String> = ["vpn1", "vpn1_a", "hub"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(phase1_of("vpn1", &p), Some("vpn1"));
        assert_eq!(phase1_of("vpn1_1", &p), Some("vpn1"));
        assert_eq!(phase1_of("vpn1_a", &p), Some("vpn1_a"));
        assert_eq!(phase1_of("vpn1_a_12", &p), Some("vpn1_a"));
        assert_eq!(phase1_of("vpn1_", &p), None);
        assert_eq!(phase1_of("vpn1_x", &p), None);
        assert_eq!(phase1_of("vpn2_1", &p), None);
    }

    /// The primary of an FGCP cluster over FGSP acts on `standby` (its ikemgr drops the
    /// tunnel) only when the other cluster claimed the tunnel on traffic or for a tunnel
    /// established there; a claim made as the successor of this cluster, which it merely
    /// stopped hearing, leaves the tunnel to the FGCP role.
    #[test]
    fn over_fgsp_a_tunnel_is_standby_only_for_a_cluster_that_carries_it() {
        use ha_core::msg::{ClaimReason, OwnershipClaim};
        let mut t = TunnelTable::new(MemberId(1));
        t.local_established("vpn1_1");
        assert_eq!(
            over_fgsp_role(&t, "vpn1_1", TunnelRole::SyncPrimary),
            Some(TunnelRole::SyncPrimary)
        );
        let claim = |generation, reason| OwnershipClaim {
            tunnel: "vpn1_1".into(),
            owner: MemberId(2),
            generation,
            reason,
        };
        t.handle_claim(MemberId(2), &claim(1, ClaimReason::OwnerDead));
        assert_eq!(t.role("vpn1_1"), Some(TunnelRole::Standby));
        assert_eq!(over_fgsp_role(&t, "vpn1_1", TunnelRole::Standby), None);
        t.handle_claim(MemberId(2), &claim(2, ClaimReason::Traffic));
        assert_eq!(
            over_fgsp_role(&t, "vpn1_1", TunnelRole::Standby),
            Some(TunnelRole::Standby)
        );
    }

    /// A takeover also tells the local espd to continue at the start: when this hasyncd
    /// restarted while ikemgr and espd kept the tunnel and the partner carried it meanwhile,
    /// ikemgr keeps its established IKE SA and installs nothing, so only the skip moves
    /// espd's counter above the partner's numbers (an RFC 6311 mark is not a sequence).
    #[test]
    fn a_takeover_skips_the_local_datapath_to_each_start() {
        let mut c = Cluster::start(&Config::default(), 0, EpochStore::in_memory());
        let ike = ike_copy(1, 2, 4, 3);
        c.ike_replicas.insert("vpn1_1".into(), (MemberId(2), ike));
        let mark = bus_schema::schema::ike_mid_mark_spi(1, 2);
        c.table_events(
            vec![TunnelEvent::Promoted {
                tunnel: "vpn1_1".into(),
                reason: ha_core::msg::ClaimReason::OwnerDead,
                start_seqs: vec![
                    StartSeq {
                        spi_out: 0xbc96_c2fc,
                        first_seq: 98_874_369,
                        exact: true,
                    },
                    StartSeq {
                        spi_out: mark,
                        first_seq: 4,
                        exact: true,
                    },
                ],
            }],
            "FGCP",
            false,
        );
        assert_eq!(
            c.take_skips(),
            vec![SeqMark {
                tunnel: "vpn1_1".into(),
                spi_out: 0xbc96_c2fc,
                seq_hw: 98_874_369,
            }]
        );
        let t = c.take_takeovers();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].start_seqs.len(), 2, "ikemgr still gets both marks");
    }

    /// A promotion without a copy of the IKE SA takes nothing over, but still moves the
    /// local espd to each start: this member's ikemgr and espd may hold the tunnel (its
    /// hasyncd restarted, and the other member's copy was lost on the link), and espd's
    /// own counter is below what the other member sent meanwhile.
    #[test]
    fn a_promotion_without_an_ike_copy_still_skips_the_local_datapath() {
        let mut c = Cluster::start(&Config::default(), 0, EpochStore::in_memory());
        let mark = bus_schema::schema::ike_mid_mark_spi(1, 2);
        c.table_events(
            vec![TunnelEvent::Promoted {
                tunnel: "vpn1_18".into(),
                reason: ha_core::msg::ClaimReason::OwnerDead,
                start_seqs: vec![
                    StartSeq {
                        spi_out: 0xf24f_20cc,
                        first_seq: 257_748_737,
                        exact: false,
                    },
                    StartSeq {
                        spi_out: mark,
                        first_seq: 4,
                        exact: true,
                    },
                ],
            }],
            "FGCP",
            false,
        );
        assert!(
            c.take_takeovers().is_empty(),
            "no copy: nothing to take over"
        );
        assert_eq!(
            c.take_skips(),
            vec![SeqMark {
                tunnel: "vpn1_18".into(),
                spi_out: 0xf24f_20cc,
                seq_hw: 257_748_737,
            }]
        );
    }

    /// A rekeyed IKE SA's RFC 6311 mark goes with it, from a copy and from the local
    /// record: else the next IKE SA of the tunnel with the same mark SPI (1 in 255) counts
    /// as synchronised at the old SA's M1.
    #[test]
    fn a_replaced_ike_sas_sync_mark_is_forgotten() {
        let mut c = Cluster::start(&Config::default(), 0, EpochStore::in_memory());
        c.table = Some(TunnelTable::with_mode(MemberId(1), TableMode::Fgcp));
        let copy = |spi_i: u64, spi_r: u64, next: u32| ike_copy(spi_i, spi_r, next, 3);
        let record = |c: &mut Cluster, spi_out: u32, seq_hw: u64| {
            c.table.as_mut().unwrap().handle_lease(
                MemberId(2),
                &ha_core::msg::SeqLease {
                    tunnel: "vpn1_1".into(),
                    spi_out,
                    seq_hw,
                },
            );
        };
        let mark = ike_mid_mark_spi(1, 2);
        // SPIs of a later IKE SA with the same mark SPI.
        let r = (3u64..).find(|r| ike_mid_mark_spi(3, *r) == mark).unwrap();
        c.apply(MemberId(2), "fgcp", Message::IkeSa(copy(1, 2, 4)));
        record(&mut c, mark, 9);
        assert_eq!(c.mid_mark("vpn1_1", mark), Some(9));
        c.apply(MemberId(2), "fgcp", Message::IkeSa(copy(1, 2, 6)));
        assert_eq!(c.mid_mark("vpn1_1", mark), Some(9), "the same SA: kept");
        c.apply(MemberId(2), "fgcp", Message::IkeSa(copy(3, r, 0)));
        assert_eq!(c.mid_mark("vpn1_1", mark), None, "rekeyed: forgotten");
        // The new SA's own mark, recorded after its record, stays.
        record(&mut c, mark, 2);
        c.apply(MemberId(2), "fgcp", Message::IkeSa(copy(3, r, 3)));
        assert_eq!(c.mid_mark("vpn1_1", mark), Some(2));

        // The same on the member that carries the tunnel (ikemgr's own records).
        let rec = |spi_i: u64, spi_r: u64| {
            BTreeMap::from([(
                "vpn1_1".to_string(),
                IkeSaRecord {
                    tunnel: "vpn1_1".into(),
                    phase1: "vpn1".into(),
                    spi_i,
                    spi_r,
                    next_send: 0,
                    next_recv: 0,
                    remote: "192.168.7.2:4500".into(),
                    keys: vec![7; 8],
                },
            )])
        };
        c.set_local_ike_sas(rec(3, r));
        assert_eq!(c.mid_mark("vpn1_1", mark), Some(2));
        let other = ike_mid_mark_spi(5, 6);
        c.set_local_ike_sas(rec(5, 6));
        assert_eq!(c.mid_mark("vpn1_1", mark), None);
        record(&mut c, other, 7);
        c.set_local_ike_sas(rec(5, 6));
        assert_eq!(c.mid_mark("vpn1_1", other), Some(7));
    }

    /// A member that carries a tunnel and gets another member's copy of the same IKE SA
    /// with later message IDs (that member carried it too, in a split brain) hands the
    /// copy to ikemgr; a copy not later, of another IKE SA, or of a tunnel carried
    /// elsewhere is left alone.
    /// The hand-over of a member turned secondary goes on until the primary's stream shows
    /// the primary holds each SA at least as far (a lost hand-over, three datagrams in a
    /// row on a lossy link, used to leave the primary behind the peer's message IDs).
    #[test]
    fn a_handed_ike_sa_is_done_once_the_primary_streams_it_at_least_as_far() {
        let ike = |spi_r: u64, send: u32, recv: u32| ike_copy(1, spi_r, send, recv);
        let handed = Message::IkeSa(ike(2, 5, 3));
        let primary = MemberId(7);
        let mut replicas = BTreeMap::new();
        assert!(!primary_holds(&replicas, primary, &handed), "no copy yet");
        for (from, copy, done) in [
            (primary, ike(2, 4, 3), false),
            (primary, ike(2, 5, 2), false),
            (primary, ike(9, 8, 8), false),
            (MemberId(8), ike(2, 5, 3), false),
            (primary, ike(2, 5, 3), true),
            (primary, ike(2, 6, 4), true),
        ] {
            replicas.insert("vpn1_1".to_string(), (from, copy.clone()));
            assert_eq!(
                primary_holds(&replicas, primary, &handed),
                done,
                "{from:?} {copy:?}"
            );
        }
    }

    #[test]
    fn a_later_copy_of_an_ike_sa_carried_here_goes_to_ikemgr() {
        let mut c = Cluster::start(&Config::default(), 0, EpochStore::in_memory());
        c.table = Some(TunnelTable::with_mode(MemberId(1), TableMode::Fgcp));
        let copy = |spi_r: u64, send: u32, recv: u32| ike_copy(1, spi_r, send, recv);
        c.set_local_ike_sas(BTreeMap::from([(
            "vpn1_1".to_string(),
            IkeSaRecord {
                tunnel: "vpn1_1".into(),
                phase1: "vpn1".into(),
                spi_i: 1,
                spi_r: 2,
                next_send: 2,
                next_recv: 2,
                remote: "192.168.7.2:4500".into(),
                keys: vec![7; 8],
            },
        )]));
        // Carried elsewhere: member 2 claimed the tunnel; its copy is only kept.
        c.table.as_mut().unwrap().handle_message(
            MemberId(2),
            &Message::Ownership(ha_core::msg::OwnershipClaim {
                tunnel: "vpn1_1".into(),
                owner: MemberId(2),
                generation: 1,
                reason: ha_core::msg::ClaimReason::OwnerDead,
            }),
        );
        c.apply(MemberId(2), "fgcp", Message::IkeSa(copy(2, 4, 2)));
        assert!(c.take_takeovers().is_empty(), "carried by member 2");
        // Claimed back while carried here: the copy (RFC 6311 sync: send 2 -> 4) goes.
        c.table.as_mut().unwrap().local_established("vpn1_1");
        c.take_later_copy("vpn1_1");
        let t = c.take_takeovers();
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(
            (t[0].ike.spi_r, t[0].ike.next_send, t[0].ike.next_recv),
            (2, 4, 2)
        );
        assert!(t[0].start_seqs.is_empty());
        // ikemgr moved up; the copy stays (the other member's latest state, for a later
        // takeover here) and, no longer later, goes to ikemgr no more.
        let here = |send, recv| {
            BTreeMap::from([(
                "vpn1_1".to_string(),
                IkeSaRecord {
                    tunnel: "vpn1_1".into(),
                    phase1: "vpn1".into(),
                    spi_i: 1,
                    spi_r: 2,
                    next_send: send,
                    next_recv: recv,
                    remote: "192.168.7.2:4500".into(),
                    keys: vec![7; 8],
                },
            )])
        };
        c.set_local_ike_sas(here(4, 2));
        assert!(c.take_takeovers().is_empty());
        assert_eq!(
            c.ike_replicas.get("vpn1_1").map(|(_, s)| s.next_request_id),
            Some(4)
        );
        // Later IDs arriving afterwards go too.
        c.apply(
            MemberId(2),
            "fgcp",
            Message::IkeMsgId(ha_core::msg::IkeMsgIdSync {
                tunnel: "vpn1_1".into(),
                spi_i: 1,
                spi_r: 2,
                next_request_id: 4,
                next_expected_id: 3,
            }),
        );
        let t = c.take_takeovers();
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!((t[0].ike.next_send, t[0].ike.next_recv), (4, 3));
        c.set_local_ike_sas(here(4, 3));
        c.apply(MemberId(2), "fgcp", Message::IkeSa(copy(2, 4, 3)));
        assert!(c.take_takeovers().is_empty(), "ikemgr holds these IDs");
        // Not later: the same IDs, one behind, or another IKE SA.
        for (spi_r, send, recv) in [(2, 2, 2), (2, 5, 1), (9, 8, 8)] {
            c.apply(MemberId(2), "fgcp", Message::IkeSa(copy(spi_r, send, recv)));
            assert!(c.take_takeovers().is_empty(), "{spi_r} {send}/{recv}");
        }
    }

    #[test]
    fn local_child_sas_are_remembered_without_links() {
        let mut c = Cluster::start(&Config::default(), 0, EpochStore::in_memory());
        let mut m = BTreeMap::new();
        m.insert(sa_key("vpn1", 1), sa("vpn1", 1));
        c.set_local_child_sas(m);
        assert_eq!(c.replicas_view()["local"], 1);
        c.set_local_child_sas(BTreeMap::new());
        assert_eq!(c.replicas_view()["local"], 0);
    }

    /// A tunnel claimed back from a member whose records hold an RFC 6311 sync mark of its
    /// IKE SA (it synced while it held the tunnel): ikemgr gets that mark (held-only, its
    /// recorded M1, not the jumped start), and this member's own mark for that SA is never
    /// granted, whether it was confirmed already or asked for again; ikemgr gets the mark
    /// each time it asks. Other leases go on as before.
    #[test]
    fn a_mark_recorded_by_the_member_a_tunnel_was_claimed_back_from_is_never_granted_here() {
        let mut c = Cluster::start(&Config::default(), 0, EpochStore::in_memory());
        let ike = ike_copy(1, 2, 0, 2);
        c.ike_replicas.insert("vpn1_1".into(), (MemberId(2), ike));
        let mark = ike_mid_mark_spi(1, 2);
        let lease = |spi_out: u32, seq_hw: u64| SeqMark {
            tunnel: "vpn1_1".into(),
            spi_out,
            seq_hw,
        };
        // Member 2 held the tunnel and recorded its sync (M1=4) and a lease.
        let mut t = TunnelTable::with_mode(MemberId(1), TableMode::Fgcp);
        for (spi_out, seq_hw) in [(mark, 4), (0xbc96_c2fc, 2_097_153)] {
            t.handle_lease(
                MemberId(2),
                &ha_core::msg::SeqLease {
                    tunnel: "vpn1_1".into(),
                    spi_out,
                    seq_hw,
                },
            );
        }
        t.local_established("vpn1_1");
        c.table = Some(t);
        let (_, events) = step_table(c.table.as_mut().unwrap(), 0);
        assert!(events
            .iter()
            .any(|e| matches!(e, TunnelEvent::Reclaimed { .. })));
        c.table_events(events, "FGCP", false);
        let told = c.take_takeovers();
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(told[0].held_only);
        assert_eq!(told[0].start_seqs, vec![lease(mark, 4)], "the recorded M1");
        assert_eq!(
            c.take_skips().iter().map(|s| s.spi_out).collect::<Vec<_>>(),
            vec![0xbc96_c2fc],
            "the data SA still skips beyond member 2"
        );
        // A grant of this member's own mark confirmed meanwhile is withheld.
        c.grants.push(lease(mark, 4));
        c.grants.push(lease(0xbc96_c2fc, 3_000_000));
        assert_eq!(c.take_grants(), vec![lease(0xbc96_c2fc, 3_000_000)]);
        assert_eq!(c.take_takeovers().len(), 1, "ikemgr gets the mark instead");
        // Asked again: the mark again, no grant. (No table here: other leases are
        // granted at once.)
        c.table = None;
        c.propose_leases(&[lease(mark, 4), lease(0x1234_5678, 64)], 0);
        assert_eq!(c.take_grants(), vec![lease(0x1234_5678, 64)]);
        let told = c.take_takeovers();
        assert_eq!(told.len(), 1);
        assert_eq!(told[0].start_seqs, vec![lease(mark, 4)]);
        // The SA rekeyed: its mark is forgotten, and a new one may be granted.
        c.forget_mid_mark("vpn1_1", 1, 2);
        c.propose_leases(&[lease(mark, 4)], 0);
        assert_eq!(c.take_grants(), vec![lease(mark, 4)]);
    }

    /// A member that starts to speak for its cluster presumes its predecessor's FGSP peers
    /// alive: its first leases wait for them. A presumed peer whose address was unknown
    /// comes up when first heard (it gets a snapshot then); one never heard is lost after
    /// the loss time, which releases the leases waiting for it.
    #[test]
    fn a_new_speaker_presumes_its_predecessors_fgsp_peers_until_heard_or_lost() {
        let sc = haven_config::StandaloneCluster {
            standalone_group_id: 1,
            group_member_id: 1,
            psksecret: Some(haven_config::Secret::new("presume-test")),
            cluster_peers: vec![haven_config::ClusterPeer {
                port: 0,
                ..haven_config::ClusterPeer::new(1, Ipv4Addr::LOCALHOST)
            }],
            ..Default::default()
        };
        let mut side = start_fgsp(&sc, 0, 1, true).unwrap();
        let lost_ms = side.lost_ms;
        let heard = [MemberId(2), MemberId(1), MemberId(3), MemberId(2)];
        assert_eq!(
            side.presume(heard.iter(), 1_000),
            vec![MemberId(2), MemberId(3)],
            "itself and duplicates are not presumed"
        );
        assert_eq!(
            side.live.peers().collect::<Vec<_>>(),
            [MemberId(2), MemberId(3)]
        );
        assert!(
            side.presume(heard.iter(), 1_100).is_empty(),
            "alive already"
        );
        assert_eq!(side.presumed.len(), 2);

        // A table that presumed member 2 keeps a lease pending until member 2 is lost.
        let mut t = TunnelTable::with_mode(MemberId(1), TableMode::Fgsp);
        t.peer_joined(MemberId(2));
        t.local_established("vpn1_1");
        assert!(t.propose_lease("vpn1_1", 7, 4096, 1_100));
        let (_, events) = step_table(&mut t, 1_100);
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, TunnelEvent::LeaseConfirmed { .. })),
            "the lease waits for the presumed peer"
        );

        let (changed, _, _, events) = side.drive(1_000 + lost_ms);
        assert!(changed);
        assert_eq!(
            events,
            vec![PeerEvent::Lost(MemberId(2)), PeerEvent::Lost(MemberId(3))]
        );
        assert!(side.presumed.is_empty());
        t.peer_lost(MemberId(2));
        let (_, events) = step_table(&mut t, 1_000 + lost_ms);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, TunnelEvent::LeaseConfirmed { spi_out: 7, .. })),
            "confirmed once the presumed peer is lost"
        );
    }

    /// A whole store arriving goes to the peers as a snapshot; a few hundred deletions out
    /// of a thousand tunnels go as deletions (the soak's teardown sent the peers dozens of
    /// snapshots of everything left); a change of most of what is left is a snapshot again.
    #[test]
    fn many_changes_are_a_snapshot_only_when_they_are_most_of_the_records() {
        let mut c = Cluster::start(&Config::default(), 0, EpochStore::in_memory());
        let all: BTreeMap<String, ChildSaSync> = (1..=1000)
            .map(|i| (sa_key(&format!("t{i}"), i), sa(&format!("t{i}"), i)))
            .collect();
        c.set_local_child_sas(all.clone());
        assert!(
            std::mem::take(&mut c.bulk_changed),
            "a whole store is a snapshot"
        );
        let mut left = all;
        left.retain(|_, sa| sa.spi_in > 300);
        c.set_local_child_sas(left.clone());
        assert!(
            !c.bulk_changed,
            "300 deletions of 1000 records go one by one"
        );
        left.retain(|_, sa| sa.spi_in > 900);
        c.set_local_child_sas(left);
        assert!(
            c.bulk_changed,
            "600 deletions leaving 100 records are a snapshot"
        );
        assert!(bulk_by_snapshot(BULK_SEND_MAX + 1, 1_000_000));
        assert!(!bulk_by_snapshot(BULK_BY_SNAPSHOT, 0));
    }
}
