//! hasyncd: Haven's HA (FGCP) and FGSP sync daemon.
//!
//! What it does: runs the HA links of `config system ha` (FGCP, heartbeats on `hbdev`,
//! UDP 703, see [`io`]) and `config system standalone-cluster` (FGSP, UDP 708 to every
//! `peerip`), every datagram sealed and opened by ha-core's `HaLink` with a key from the
//! cluster `password` / `psksecret` (no secret: that link is not started, one log line,
//! the daemon runs standalone). The FGCP election (ha-core `Fgcp`) is driven from the
//! daemon tick ([`Hasyncd::TICK_MS`]); its result is published as `ha.member` (role
//! `primary`/`secondary`/`hello`) and a role per tunnel ikemgr publishes (`ha.role`):
//! `sync-primary` on the FGCP primary (or on a member without FGCP), `standby` elsewhere.
//! CHILD SAs (`sa.child`) and IKE SAs (`sa.ike`, ikemgr's full record after every
//! exchange) ikemgr publishes are sent by the FGCP primary over the FGCP link (CHILD SAs
//! also over the FGSP link for phase1s with `fgsp-sync enable`); a member that (re)joins
//! gets all of them again. Received ones are kept as standby copies (view `replicas`,
//! without keys). On the FGCP link an ha-core `TunnelTable` keeps per-tunnel ownership and
//! espd's outbound sequence leases (`esp.lease` requests, granted on `ha.lease` once every
//! live member acknowledged); when this member becomes primary it takes every tunnel over
//! (`ha.takeover` to ikemgr, with each outbound SA's start at the last acknowledged lease)
//! and holds the shared addresses ([`vip`]). See README.md.
//! Views: `ha-status`, `checksum`, `standalone-peers`, `roles`, `member`, `replicas`.
//!
//! FGCP configuration sync ([`cfgsync`]): the primary's configuration reaches the
//! secondaries over the FGCP link, but for haven-config's per-member keys.
//!
//! FGSP alone (no FGCP link): the same tunnel table runs per tunnel over the FGSP link
//! (phase1s with `fgsp-sync enable`): the member that established a tunnel owns it, the
//! others hold standby copies; `sa.unknown` from espd/ikemgr (traffic for a standby
//! tunnel arrived here) or the owner's death promotes it (`ha.takeover`), and a member that
//! lost a tunnel publishes it `standby` (ikemgr drops it).
//!
//! ikemgr's own records are kept as published whatever the mode (standalone included) and
//! handed to a restarted ikemgr with the `ike-restore` command.
//!
//! A member that joins gets a windowed, acknowledged snapshot ([`cluster`]'s `snapshot`);
//! so do all peers when many local records change at once.
//!
//! Each link start takes an epoch above the wall clock and above every epoch this member
//! used before, kept in the run-dir (`cluster::EpochStore`).
//!
//! Not yet: FGSP per-tunnel ownership between FGCP clusters (see README.md).

mod cfgsync;
mod cluster;
mod io;
mod lag;
mod usage;
mod vip;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::ExitCode;

use cluster::{role_name, Cluster};
use ha_core::msg::HaRole;

use bus_schema::schema::table;
use bus_schema::schema::{
    ike_mid_mark_spi, ChildSaInfo, IkeSaRecord, SeqMark, TakeoverInfo, TunnelActivity,
};
use bus_schema::{Body, DaemonKind, HaMemberInfo, StateStore};
use ha_core::msg::ChildSaSync;
use haven_config::Config;
use haven_daemon::{diff_keyed, DaemonLogic, Outbox};
use serde_json::json;

struct Hasyncd {
    member: Option<HaMemberInfo>,
    member_published: bool,
    roles: BTreeMap<String, String>,
    /// How many of `roles` are `sync-primary` (for the `hasyncd_tunnels` gauges).
    roles_primary: usize,
    /// Tunnels ikemgr publishes.
    tunnels: BTreeSet<String>,
    /// CHILD SAs ikemgr publishes (`sa.child`), as sync records, by `tunnel/spi_in`.
    child_sas: BTreeMap<String, ChildSaSync>,
    /// espd's SA ages and bytes, for the lifetimes left in `child_sas`.
    usage: usage::UsageSync,
    /// The configuration the links were started from (restart on change).
    ha_config: Option<(
        Option<haven_config::Ha>,
        Option<haven_config::StandaloneCluster>,
    )>,
    pending_config: Option<Config>,
    cluster: Option<Cluster>,
    now_ms: u64,
    /// The FGCP shared addresses (held while primary).
    vip: vip::SharedAddrs,
    /// Takeovers announced to ikemgr and not yet confirmed by its `sa.ike` record:
    /// tunnel -> (event, next repeat in ms, give up at ms).
    takeovers: BTreeMap<String, (TakeoverInfo, u64, u64)>,
    /// ikemgr's IKE SAs (`sa.ike`) by tunnel: SPIs.
    ike_spis: BTreeMap<String, (u64, u64)>,
    /// The local replica of ikemgr's own SAs, kept exactly as published (`sa.ike` by
    /// tunnel, `sa.child` by `tunnel/spi_in`): what a restarted ikemgr continues from
    /// (command `ike-restore`).
    own_ike: BTreeMap<String, IkeSaRecord>,
    own_children: BTreeMap<String, ChildSaInfo>,
    /// The copy of ikemgr's store `on_replica_copy` read last: the next copy's changes are
    /// told from it, so an update costs what changed, not the number of tunnels.
    ikemgr_store: StateStore,
    /// FGCP configuration sync (primary to secondaries).
    cfgsync: cfgsync::ConfigSync,
    /// The run-dir (the HA link epochs are kept there).
    run_dir: std::path::PathBuf,
    /// Skips sent to espd for SAs it still holds (tunnels whose IKE SA the local ikemgr
    /// kept established): the shared addresses are announced once espd asked for a lease
    /// above each (its counter moved), once ikemgr no longer has the tunnel, or after
    /// [`GARP_HOLD_MS`]. With when the wait began (ms).
    garp_wait: Vec<SeqMark>,
    garp_wait_since: u64,
    /// Skips of SAs espd holds (the local ikemgr has their CHILD SA), sent again every
    /// [`SKIP_REPEAT_MS`] until espd asks for a lease above each: a bus event sent right
    /// after hasyncd started can be lost (espd's subscription to the new publisher is not
    /// connected yet). With when the repeats give up (ms) and when the next is due.
    skip_resend: Vec<SeqMark>,
    skip_resend_until: u64,
    skip_resend_next: u64,
    /// When this hasyncd started, and when each tunnel was last handed to ikemgr as a
    /// takeover (wall clock, ns since the epoch, as espd's activity times): ESP received
    /// after that shows the peer's traffic reaches this member (`Cluster::traffic_here`).
    started_ns: u64,
    carried_since_ns: BTreeMap<String, u64>,
    /// Tunnels another member, still heard, carries while it says it is primary
    /// (`Cluster::contested`): espd holds their outbound SAs (`SeqHold`, sent again every
    /// [`SKIP_REPEAT_MS`] while it lasts), and no lease of theirs is granted here.
    held: BTreeSet<String>,
    held_next_ms: u64,
}

/// Wall-clock time in ns since the epoch (espd's activity times are).
fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The longest the shared addresses' announcement waits for espd after a skip: only a
/// stalled espd (which sends nothing anyway) or an SA that goes away meanwhile takes that
/// long; espd confirms within tens of ms (its mark is persisted with fsync first, which a
/// loaded disk can stretch).
const GARP_HOLD_MS: u64 = 3_000;

/// How often unconfirmed skips go to espd again (they give up with the takeovers).
const SKIP_REPEAT_MS: u64 = 250;

/// How often an unconfirmed takeover is announced again, and for how long.
const TAKEOVER_REPEAT_MS: u64 = 500;
const TAKEOVER_GIVE_UP_MS: u64 = 30_000;

/// Whether espd's lease request `sas` shows skip `w` done: a lease asked above it.
fn skip_confirmed(w: &SeqMark, sas: &[SeqMark]) -> bool {
    sas.iter()
        .any(|m| m.tunnel == w.tunnel && m.spi_out == w.spi_out && m.seq_hw > w.seq_hw)
}

/// Keeps the skips of `skips` whose CHILD SA is in `children` (ikemgr's, which espd holds
/// at its own counter).
fn retain_held(skips: &mut Vec<SeqMark>, children: &BTreeMap<String, ChildSaInfo>) {
    if skips.is_empty() {
        return;
    }
    let held: BTreeSet<(&str, u32)> = children
        .values()
        .map(|c| (c.tunnel.as_str(), c.spi_out))
        .collect();
    skips.retain(|m| held.contains(&(m.tunnel.as_str(), m.spi_out)));
}

/// Whether ikemgr holds a CHILD SA of `tunnel` with outbound SPI `spi_out` (`children` is
/// keyed `tunnel/spi_in`: a lookup of the tunnel's SAs, not a scan).
fn holds_outbound(children: &BTreeMap<String, ChildSaInfo>, tunnel: &str, spi_out: u32) -> bool {
    let prefix = format!("{tunnel}/");
    children
        .range::<str, _>((
            std::ops::Bound::Included(prefix.as_str()),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(k, _)| k.starts_with(&prefix))
        .any(|(_, c)| c.tunnel == tunnel && c.spi_out == spi_out)
}

/// Whether ikemgr's record `now` shows the takeover of `copy` done: the copy's IKE SPIs
/// with its message IDs or later ones. The SPIs alone are not enough: a take-back of a
/// tunnel whose IKE SA ikemgr kept established has them before ikemgr acts, while the copy
/// may be later (the partner rekeyed a CHILD SA, an exchange its message IDs count), and
/// ikemgr moves its IDs up to the copy's when it continues it (never down).
fn takeover_done(copy: &IkeSaRecord, now: &IkeSaRecord) -> bool {
    same_ike_sa(copy, now) && now.next_send >= copy.next_send && now.next_recv >= copy.next_recv
}

/// Whether records `a` and `b` are of the same IKE SA (its SPIs).
fn same_ike_sa(a: &IkeSaRecord, b: &IkeSaRecord) -> bool {
    (a.spi_i, a.spi_r) == (b.spi_i, b.spi_r)
}

/// A tunnel's role on this member: `sync-primary` on the FGCP primary or on a member
/// without FGCP (each FGSP member carries what it established), `standby` on a secondary
/// or while still in the hello phase.
fn tunnel_role(fgcp: Option<HaRole>) -> &'static str {
    match fgcp {
        None | Some(HaRole::Primary) => "sync-primary",
        Some(HaRole::Secondary | HaRole::Hello) => "standby",
    }
}

impl Hasyncd {
    /// The heartbeats due now, in the middle of long work ([`Cluster::keep_heartbeats`]).
    fn keep_heartbeats(&mut self) {
        if let Some(c) = self.cluster.as_mut() {
            c.keep_heartbeats();
        }
    }

    /// The FGCP role, or `None` when this member is in no FGCP cluster.
    fn fgcp_role(&self) -> Option<HaRole> {
        self.cluster.as_ref().and_then(Cluster::fgcp_role)
    }

    fn publish_member(&mut self, out: &mut Outbox) {
        let Some(mut m) = self.member.clone() else {
            return;
        };
        m.role = self.fgcp_role().map_or("primary", role_name).to_string();
        if self.member.as_ref() != Some(&m) || !self.member_published {
            out.push(Body::HaMember(m.clone()));
            self.member = Some(m);
            self.member_published = true;
        }
    }

    fn publish_roles(&mut self, out: &mut Outbox) {
        // A hasyncd in its hello phase (just restarted) does not know yet whether this
        // member carries the tunnels: it says nothing. A `standby` now made ikemgr drop
        // every IKE SA of a primary whose hasyncd alone restarted, although nobody else
        // had taken them (the partner had not declared it lost); the election's outcome
        // follows within hb-interval x hb-lost-threshold.
        if self.fgcp_role() == Some(HaRole::Hello) {
            return;
        }
        let desired = self.desired_roles();
        diff_keyed(
            &self.roles,
            &desired,
            |tunnel, role| Body::TunnelRole { tunnel, role },
            |tunnel| Body::TunnelRoleRemoved { tunnel },
            out,
        );
        self.roles = desired;
        self.roles_primary = self.roles.values().filter(|r| *r == "sync-primary").count();
        self.role_gauges();
    }

    /// Every tunnel's role, from ikemgr's tunnels and the cluster's tables.
    fn desired_roles(&self) -> BTreeMap<String, String> {
        let role = tunnel_role(self.fgcp_role());
        let cluster = self.cluster.as_ref();
        let mut desired: BTreeMap<String, String> = self
            .tunnels
            .iter()
            .map(|t| {
                // FGSP: the ownership table's role, and on the primary of an FGCP cluster
                // over FGSP the cluster's (ikemgr's tunnels not in the table, such as
                // phase1 templates and tunnels without fgsp-sync, are carried here).
                let r = cluster
                    .and_then(|c| c.tunnel_fgsp_role(t))
                    .map_or(role, |r| r.as_str());
                (t.clone(), r.to_string())
            })
            .collect();
        if let Some(c) = cluster {
            // Synced tunnels other members (clusters) carry: standby here.
            for (t, r) in c.tunnel_fgsp_roles() {
                desired.insert(t, r.as_str().to_string());
            }
        }
        desired
    }

    /// [`Hasyncd::publish_roles`] for `tunnels` only: ikemgr's tunnels that came or went,
    /// and those whose entry in the cluster's tables changed (`Cluster::take_roles_of`),
    /// while nothing changed every role (this member's FGCP role, a peer joined or lost).
    /// Each gets the role the whole list would give it, without a pass over every tunnel
    /// (100 000 tunnels: a new list of them per dial-up client coming or going, and per
    /// lease of a new or rekeyed CHILD SA). Debug builds (the multi-process tests) check
    /// after each call that the roles kept equal the whole list's.
    fn publish_roles_of<'a>(
        &mut self,
        tunnels: impl IntoIterator<Item = &'a String>,
        out: &mut Outbox,
    ) {
        if self.fgcp_role() == Some(HaRole::Hello) {
            return;
        }
        let role = tunnel_role(self.fgcp_role());
        let cluster = self.cluster.as_ref();
        for t in tunnels {
            let want = match cluster.and_then(|c| c.tunnel_fgsp_role(t)) {
                Some(r) => Some(r.as_str()),
                None if self.tunnels.contains(t) => Some(role),
                None => None,
            };
            let had = self.roles.get(t).map(String::as_str);
            if had == want {
                continue;
            }
            if had == Some("sync-primary") {
                self.roles_primary -= 1;
            }
            match want {
                Some(r) => {
                    if r == "sync-primary" {
                        self.roles_primary += 1;
                    }
                    self.roles.insert(t.clone(), r.to_string());
                    out.push(Body::TunnelRole {
                        tunnel: t.clone(),
                        role: r.to_string(),
                    });
                }
                None => {
                    self.roles.remove(t);
                    out.push(Body::TunnelRoleRemoved { tunnel: t.clone() });
                }
            }
        }
        self.role_gauges();
        #[cfg(debug_assertions)]
        {
            let whole = self.desired_roles();
            if whole != self.roles {
                let differ: Vec<_> = whole
                    .iter()
                    .filter(|(t, r)| self.roles.get(*t) != Some(*r))
                    .chain(self.roles.iter().filter(|(t, _)| !whole.contains_key(*t)))
                    .take(8)
                    .collect();
                panic!("roles kept by changes differ from the whole list: {differ:?}");
            }
        }
    }

    fn role_gauges(&self) {
        let standby = self.roles.len() - self.roles_primary;
        metrics::gauge!("hasyncd_tunnels", "role" => "sync-primary").set(self.roles_primary as f64);
        metrics::gauge!("hasyncd_tunnels", "role" => "standby").set(standby as f64);
    }
}

/// `changes` (by key; `None`: removed) applied to `map`.
fn apply_changes<V: Clone>(map: &mut BTreeMap<String, V>, changes: &[(String, Option<V>)]) {
    for (k, v) in changes {
        match v {
            Some(v) => {
                map.insert(k.clone(), v.clone());
            }
            None => {
                map.remove(k);
            }
        }
    }
}

fn member_of(config: &Config) -> HaMemberInfo {
    let mode = match (&config.ha, &config.standalone) {
        (Some(_), Some(_)) => "fgcp+fgsp",
        (Some(_), None) => "fgcp",
        (None, Some(_)) => "fgsp",
        (None, None) => "standalone",
    };
    HaMemberInfo {
        member_id: config
            .standalone
            .as_ref()
            .map(|s| u32::from(s.group_member_id))
            .unwrap_or(0),
        group_id: config
            .ha
            .as_ref()
            .map(|h| u32::from(h.group_id))
            .unwrap_or(0),
        mode: mode.to_string(),
        role: "primary".to_string(),
        peers: config
            .standalone
            .as_ref()
            .map(|s| {
                s.cluster_peers
                    .iter()
                    .map(|p| format!("{}:{}", p.peerip, p.port))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

impl DaemonLogic for Hasyncd {
    const KIND: DaemonKind = DaemonKind::Hasyncd;
    const FOLLOWS: &'static [DaemonKind] = &[DaemonKind::Ikemgr, DaemonKind::Espd];
    /// The HA links are driven from the tick: 20 ms keeps heartbeat jitter well under the
    /// smallest FortiOS `hb-interval` (100 ms; 10 ms ticks are not met to the tick).
    const TICK_MS: u64 = 20;
    /// `on_replica` reads ikemgr's whole store (a few ms per thousand tunnels, hundreds of
    /// ms on a loaded machine): at most a quarter of the daemon's time, the rest for the
    /// HA links' ticks and the lease requests.
    const REPLICA_SPACING: u32 = 3;

    fn new(_config: &Config, run_dir: &Path) -> Self {
        cluster::describe_metrics();
        lag::describe_metrics();
        cfgsync::describe_metrics();
        Hasyncd {
            member: None,
            member_published: false,
            roles: BTreeMap::new(),
            roles_primary: 0,
            tunnels: BTreeSet::new(),
            ikemgr_store: StateStore::default(),
            child_sas: BTreeMap::new(),
            usage: usage::UsageSync::default(),
            ha_config: None,
            pending_config: None,
            cluster: None,
            now_ms: 0,
            vip: vip::SharedAddrs::default(),
            takeovers: BTreeMap::new(),
            ike_spis: BTreeMap::new(),
            own_ike: BTreeMap::new(),
            own_children: BTreeMap::new(),
            cfgsync: cfgsync::ConfigSync::new(run_dir),
            run_dir: run_dir.to_path_buf(),
            garp_wait: Vec::new(),
            garp_wait_since: 0,
            skip_resend: Vec::new(),
            skip_resend_until: 0,
            skip_resend_next: 0,
            started_ns: wall_ns(),
            carried_since_ns: BTreeMap::new(),
            held: BTreeSet::new(),
            held_next_ms: 0,
        }
    }

    fn set_config_path(&mut self, path: &Path) {
        self.cfgsync.set_path(path);
    }

    fn on_config(&mut self, config: &Config, out: &mut Outbox) {
        self.cfgsync.on_config(config);
        let m = member_of(config);
        if self
            .member
            .as_ref()
            .map(|o| (o.member_id, o.group_id, &o.mode, &o.peers))
            != Some((m.member_id, m.group_id, &m.mode, &m.peers))
        {
            self.member = Some(m);
            self.member_published = false;
        }
        if let Some(c) = self.cluster.as_mut() {
            c.set_fgsp_sync(config);
        }
        self.vip.configure(vip::from_config(config), self.now_ms);
        let wanted = (config.ha.clone(), config.standalone.clone());
        if self.ha_config.as_ref() != Some(&wanted) {
            // The links start on the next tick, which brings `now`.
            self.pending_config = Some(config.clone());
            self.ha_config = Some(wanted);
        }
        self.publish_member(out);
    }

    fn on_replica(&mut self, src: DaemonKind, store: &StateStore, out: &mut Outbox) {
        self.on_replica_copy(src, store.clone(), out);
    }

    /// ikemgr's store changed: only what differs from the copy read last is looked at
    /// (tunnels, IKE SAs, CHILD SAs), and only that reaches the cluster. Rebuilding every
    /// map from the whole store took about 0.5 s per update with 100 000 tunnels.
    fn on_replica_copy(&mut self, src: DaemonKind, store: StateStore, out: &mut Outbox) {
        if src != DaemonKind::Ikemgr {
            return;
        }
        let old = std::mem::take(&mut self.ikemgr_store);
        // The store keys IKE SAs by tunnel and CHILD SAs by `tunnel/spi_in`
        // (`ChildSaInfo::key_of`), as the maps here do.
        let tunnels = store.changes_since(&old, table::TUNNEL);
        let mut tunnel_gone = false;
        let mut changed_tunnels = Vec::with_capacity(tunnels.len());
        for (name, body) in tunnels {
            if body.is_some() {
                self.tunnels.insert(name.clone());
            } else {
                self.tunnels.remove(&name);
                tunnel_gone = true;
            }
            changed_tunnels.push(name);
        }
        let mut ike_changes = Vec::new();
        for (key, body) in store.changes_since(&old, table::IKE_SA) {
            match body {
                Some(Body::IkeSa(r)) => {
                    self.ike_spis.insert(key.clone(), (r.spi_i, r.spi_r));
                    self.own_ike.insert(key.clone(), r.clone());
                    ike_changes.push((key, Some(r.clone())));
                }
                _ => {
                    self.ike_spis.remove(&key);
                    self.own_ike.remove(&key);
                    ike_changes.push((key, None));
                }
            }
        }
        let mut changed_children = Vec::new();
        for (key, body) in store.changes_since(&old, table::CHILD_SA) {
            match body {
                Some(Body::ChildSa(c)) => {
                    self.own_children.insert(key.clone(), c.clone());
                }
                _ => {
                    self.own_children.remove(&key);
                }
            }
            changed_children.push(key);
        }
        self.keep_heartbeats();
        haven_daemon::drop_later(old);
        self.ikemgr_store = store;
        // A skip whose CHILD SA ikemgr no longer has has nothing left to move.
        retain_held(&mut self.skip_resend, &self.own_children);
        let child_changes = self
            .usage
            .update(&self.own_children, changed_children, self.now_ms);
        apply_changes(&mut self.child_sas, &child_changes);
        // Done, or (another member's later copy of an SA carried here) no longer held:
        // ikemgr ignores such a copy, and repeating it would only end in a give-up.
        let ike = &self.own_ike;
        let pending = self.takeovers.len();
        self.takeovers.retain(|t, (info, _, _)| {
            let now = ike.get(t);
            !now.is_some_and(|r| takeover_done(&info.ike, r))
                && (!info.held_only || now.is_some_and(|r| same_ike_sa(&info.ike, r)))
        });
        if (tunnel_gone || self.takeovers.len() < pending) && !self.carried_since_ns.is_empty() {
            let known = &self.tunnels;
            let takeovers = &self.takeovers;
            self.carried_since_ns
                .retain(|t, _| known.contains(t) || takeovers.contains_key(t));
        }
        if let Some(c) = self.cluster.as_mut() {
            c.update_local_ike_sas(ike_changes);
            c.keep_heartbeats();
            c.update_local_child_sas(child_changes);
            c.keep_heartbeats();
        }
        // The roles follow the tunnels and the cluster's tables (a tunnel established here
        // enters them): the whole list when every role may have changed, else the roles of
        // ikemgr's tunnels that changed and of those the tables changed, nothing when
        // neither changed.
        let dirty = self.cluster.as_ref().is_some_and(|c| c.roles_dirty);
        let mut of = self
            .cluster
            .as_mut()
            .map(Cluster::take_roles_of)
            .unwrap_or_default();
        if dirty {
            self.publish_roles(out);
        } else {
            of.extend(changed_tunnels);
            if !of.is_empty() {
                self.publish_roles_of(&of, out);
            }
        }
    }

    fn on_event(&mut self, src: DaemonKind, body: &Body, out: &mut Outbox) {
        if let (DaemonKind::Espd, Body::EspActivity { tunnels }) = (src, body) {
            self.on_activity(tunnels, out);
            return;
        }
        if let Body::UnknownSaTraffic(u) = body {
            if let Some(c) = self.cluster.as_mut() {
                if !c.unknown_traffic(u, self.now_ms).is_empty() {
                    // Roles first, then the takeover: ikemgr must not see the tunnel it
                    // restores still marked standby.
                    self.collect(out);
                }
            }
            return;
        }
        if let (DaemonKind::Espd, Body::EspSeq { usage, .. }) = (src, body) {
            self.usage.note(usage, self.now_ms);
            return;
        }
        // espd's sequence leases, and ikemgr's RFC 6311 sync marks of AEAD IKE SAs (an
        // SPI RFC 4303 reserves, see `bus_schema::schema::ike_mid_mark_spi`): the same
        // acknowledged path, so a mark is granted only once every live member holds it.
        if let (DaemonKind::Espd | DaemonKind::Ikemgr, Body::SeqLeaseRequest { sas }) = (src, body)
        {
            if src == DaemonKind::Espd && !self.skip_resend.is_empty() {
                self.skip_resend.retain(|w| !skip_confirmed(w, sas));
            }
            if src == DaemonKind::Espd && !self.garp_wait.is_empty() {
                self.skips_confirmed(sas);
            }
            if let Some(c) = self.cluster.as_mut() {
                c.propose_leases(sas, self.now_ms);
                let grants = c.take_grants();
                if !grants.is_empty() {
                    out.push(Body::SeqLeaseGranted { sas: grants });
                }
            } else {
                // No cluster: nothing to sync the marks to.
                out.push(Body::SeqLeaseGranted { sas: sas.clone() });
            }
        }
    }

    fn tick(&mut self, now_ns: u64, out: &mut Outbox) {
        self.now_ms = now_ns / 1_000_000;
        if let Some(config) = self.pending_config.take() {
            // Election parameters only (priority, override, intervals): in place, the role
            // and the links are kept (ha-core re-elects at once).
            if let Some(c) = self.cluster.as_mut() {
                if c.reconfigure_in_place(&config, self.now_ms) {
                    self.publish_member(out);
                    self.publish_roles(out);
                    return;
                }
            }
            // Anything else restarts the links. Drop the old ones first: it frees their
            // ports.
            self.cluster = None;
            let mut c = Cluster::start(
                &config,
                self.now_ms,
                cluster::EpochStore::open(&self.run_dir),
            );
            // What the local ikemgr carries may have arrived before the links started (a
            // restarted hasyncd reads the bus before its configuration): without it the
            // partner would get snapshots without the IKE SAs, drop the copies it held,
            // and have nothing to take over from; a take-back would also not see the IKE
            // SA kept here.
            c.set_local_ike_sas(self.own_ike.clone());
            c.set_local_child_sas(self.child_sas.clone());
            self.cluster = Some(c);
            self.publish_member(out);
            self.publish_roles(out);
        }
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if self.usage.due(self.now_ms) {
            // The SAs whose bytes moved: their records, if they changed, and nothing else.
            let changes = self
                .usage
                .update(&self.own_children, Vec::new(), self.now_ms);
            apply_changes(&mut self.child_sas, &changes);
            cluster.update_local_child_sas(changes);
        }
        let ch = cluster.drive(self.now_ms);
        self.cfgsync.tick(cluster, self.now_ms);
        let role = cluster.fgcp_role();
        // A tunnel taken (back) while the local ikemgr kept its IKE SA established: espd
        // still holds its SAs at their own counters, below what another member sent, until
        // the skips below reach it. Traffic the announcement moves here before that would
        // leave below the peer's window (replay drops there).
        // Only the outbound SAs ikemgr holds here: espd carries those and confirms their
        // skips. A mark of an SA gone from here (a rekeyed one whose lease record the other
        // member kept) is never confirmed, and waiting for it held the announcements back
        // for the whole GARP_HOLD_MS on every take-back: in an `--ha-link` fault run the
        // router kept sending to the partner for 3 s, twice, around a link flap, and the
        // client's DPD gave up.
        let children = &self.own_children;
        let held: Vec<SeqMark> = cluster
            .pending_skips()
            .iter()
            .filter(|m| {
                self.ike_spis.contains_key(&m.tunnel)
                    && holds_outbound(children, &m.tunnel, m.spi_out)
            })
            .cloned()
            .collect();
        if !held.is_empty() && role == Some(HaRole::Primary) {
            tracing::info!(
                "FGCP: {} outbound SAs kept here continue above the other member: the shared addresses are announced once espd moved them (at most {GARP_HOLD_MS} ms)",
                held.len()
            );
            self.vip.quiet(self.now_ms.saturating_add(GARP_HOLD_MS));
            if self.garp_wait.is_empty() {
                self.garp_wait_since = self.now_ms;
            }
            self.garp_wait.extend(held);
        }
        if ch.role_changed {
            match role {
                Some(HaRole::Primary) => self.vip.hold(self.now_ms),
                Some(_) => self.vip.release(),
                None => {}
            }
            self.publish_member(out);
            self.publish_roles(out);
        } else if (ch.fgcp_peer_joined || ch.fgcp_peer_stepped_down)
            && role == Some(HaRole::Primary)
        {
            // A member that comes back after missed heartbeats, or that steps down after
            // a split brain (it missed this member's heartbeats while this one heard it),
            // may have been primary meanwhile and announced the shared addresses: the
            // upstream router then sends their traffic to a member that no longer holds
            // them.
            self.vip.reannounce(self.now_ms);
        }
        self.collect(out);
        if !self.garp_wait.is_empty() {
            // A tunnel or SA ikemgr dropped meanwhile has nothing left to move.
            let spis = &self.ike_spis;
            let children = &self.own_children;
            self.garp_wait.retain(|w| {
                spis.contains_key(&w.tunnel) && holds_outbound(children, &w.tunnel, w.spi_out)
            });
            if self.garp_wait.is_empty() {
                self.skips_confirmed(&[]);
            } else if !self.vip.is_quiet() {
                tracing::warn!(
                    "FGCP: espd did not confirm {} skips within {GARP_HOLD_MS} ms; shared addresses announced",
                    self.garp_wait.len()
                );
                self.garp_wait.clear();
            }
        }
        self.vip.tick(self.now_ms);
        self.repeat_skips(out);
        let now = self.now_ms;
        self.takeovers.retain(|tunnel, (_, _, give_up)| {
            let keep = now < *give_up;
            if !keep {
                tracing::error!("HA: ikemgr did not take over {tunnel}; giving up");
            }
            keep
        });
        for (t, next, _) in self.takeovers.values_mut() {
            if now >= *next {
                *next = now.saturating_add(TAKEOVER_REPEAT_MS);
                out.push(Body::Takeover(t.clone()));
            }
        }
    }

    /// `ike-restore`: the local replica of ikemgr's IKE SAs and CHILD SAs, keys included,
    /// as ikemgr last published them. A restarted ikemgr asks for it before it publishes
    /// anything (so this is still the previous ikemgr's state) and continues those SAs
    /// instead of dropping them (DESIGN.md §3.3). The control socket is root-only
    /// (run-dir 0700), like the bus that carried these keys in the first place.
    fn command(
        &mut self,
        name: &str,
        _args: &[String],
        _out: &mut Outbox,
    ) -> Result<serde_json::Value, String> {
        match name {
            "ike-restore" => {
                // Only what this member still carries: an FGCP member that is not primary
                // (demoted, or just restarted and in its hello phase) and an FGSP member
                // whose tunnel another member (or cluster) took hand nothing back. The previous ikemgr
                // may have been killed before it dropped them, and continuing such an SA
                // restarted its outbound sequence numbers below what the new carrier sent
                // (the --ha-link fault run: 55 replays at strongSwan) and asked the peer
                // for a second RFC 6311 sync, which strongSwan refuses on AEAD SAs.
                let primary = self
                    .cluster
                    .as_ref()
                    .and_then(|c| c.fgcp_role())
                    .is_none_or(|r| r == ha_core::msg::HaRole::Primary);
                let carried = |tunnel: &str| {
                    primary
                        && self.cluster.as_ref().is_none_or(|c| {
                            c.tunnel_fgsp_role(tunnel) != Some(ha_core::TunnelRole::Standby)
                        })
                };
                let ike: BTreeMap<String, IkeSaRecord> = self
                    .own_ike
                    .iter()
                    .filter(|(_, r)| carried(&r.tunnel))
                    .map(|(k, r)| (k.clone(), r.clone()))
                    .collect();
                let children: BTreeMap<String, ChildSaInfo> = self
                    .own_children
                    .iter()
                    .filter(|(_, c)| carried(&c.tunnel))
                    .map(|(k, c)| (k.clone(), c.clone()))
                    .collect();
                tracing::info!(
                    "local replica to the restarted ikemgr: {} IKE SAs, {} CHILD SAs ({} and {} held back: not carried here)",
                    ike.len(),
                    children.len(),
                    self.own_ike.len() - ike.len(),
                    self.own_children.len() - children.len()
                );
                // The RFC 6311 sync marks this member recorded for those IKE SAs (the
                // replica's record can be older than the mark: ikemgr must not sync again).
                let marks: Vec<SeqMark> = ike
                    .values()
                    .filter_map(|r| {
                        let spi_out = ike_mid_mark_spi(r.spi_i, r.spi_r);
                        let seq_hw = self.cluster.as_ref()?.mid_mark(&r.tunnel, spi_out)?;
                        Some(SeqMark {
                            tunnel: r.tunnel.clone(),
                            spi_out,
                            seq_hw,
                        })
                    })
                    .collect();
                let mut set = restore_set(&ike, &children);
                set["marks"] = json!(marks);
                Ok(set)
            }
            "config-sync" => self.cfgsync.force(self.cluster.as_ref()),
            other => Err(format!(
                "unknown command {other:?}: hasyncd has: ike-restore, config-sync"
            )),
        }
    }

    fn view(&self, name: &str, _args: &[String]) -> Result<serde_json::Value, String> {
        self.view_inner(name)
    }

    fn poll_timeout(&self) -> Option<u64> {
        self.cluster
            .as_ref()
            .and_then(|c| c.poll_timeout(self.now_ms))
    }
}

impl Hasyncd {
    /// What the cluster produced: lease grants for espd, takeovers for ikemgr (announced at
    /// once, then repeated by `tick` until ikemgr confirms), tunnels lost to another member
    /// (their takeovers cancelled) and, when they changed, the roles.
    fn collect(&mut self, out: &mut Outbox) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let mut grants = cluster.take_grants();
        let contested = cluster.contested_tunnels();
        if !contested.is_empty() {
            // A lease confirmed for a tunnel that is contested now (proposed before) would
            // release what espd holds.
            grants.retain(|m| !contested.contains(&m.tunnel));
        }
        let fresh = cluster.take_takeovers();
        let demoted = cluster.take_demotions();
        let skips = cluster.take_skips();
        let roles_dirty = std::mem::take(&mut cluster.roles_dirty);
        let roles_of = cluster.take_roles_of();
        // Before any grant: espd moves the counter, then leases above it.
        if !skips.is_empty() {
            self.resend_skips_until_confirmed(&skips);
            out.push(Body::SeqSkip { sas: skips });
        }
        if !grants.is_empty() {
            metrics::counter!("hasyncd_sequence_leases_granted_total")
                .increment(grants.len() as u64);
            out.push(Body::SeqLeaseGranted { sas: grants });
        }
        for t in demoted {
            self.takeovers.remove(&t);
        }
        self.hold_contested(contested, out);
        if roles_dirty {
            self.publish_roles(out);
        } else if !roles_of.is_empty() {
            self.publish_roles_of(&roles_of, out);
        }
        for t in fresh {
            self.send_takeover(t, out);
        }
    }

    /// espd's activity batch: ESP received on a tunnel since this member took it over (or
    /// since this hasyncd started) may show that a tunnel taken as a successor is carried
    /// here ([`Cluster::traffic_here`]); the claim goes out at once.
    fn on_activity(&mut self, tunnels: &[TunnelActivity], out: &mut Outbox) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let mut claimed = false;
        for a in tunnels {
            let since = self
                .carried_since_ns
                .get(&a.tunnel)
                .copied()
                .unwrap_or(self.started_ns);
            if a.last_rx_ns > since && c.traffic_here(&a.tunnel, self.now_ms) {
                claimed = true;
            }
        }
        if claimed {
            self.collect(out);
        }
    }

    /// Sends a takeover to ikemgr, then again every [`TAKEOVER_REPEAT_MS`] until ikemgr's
    /// record shows it done (`on_replica`).
    fn send_takeover(&mut self, t: TakeoverInfo, out: &mut Outbox) {
        let now = self.now_ms;
        if t.held_only
            && !self
                .own_ike
                .get(&t.ike.tunnel)
                .is_some_and(|r| same_ike_sa(&t.ike, r))
        {
            // A later copy of an SA ikemgr no longer holds: nothing to move up.
            return;
        }
        if !t.held_only {
            self.carried_since_ns
                .insert(t.ike.tunnel.clone(), wall_ns());
        }
        out.push(Body::Takeover(t.clone()));
        // ikemgr already holds the copy as it is (kept here while the other member carried
        // the tunnel and exchanged nothing with the peer): its record will not change, and
        // waiting for it to would end in a false give-up.
        if self
            .own_ike
            .get(&t.ike.tunnel)
            .is_some_and(|r| takeover_done(&t.ike, r))
        {
            return;
        }
        self.takeovers.insert(
            t.ike.tunnel.clone(),
            (
                t,
                now.saturating_add(TAKEOVER_REPEAT_MS),
                now.saturating_add(TAKEOVER_GIVE_UP_MS),
            ),
        );
    }

    /// Notes `skips` (just sent to espd) to send again until espd confirms them: those of
    /// CHILD SAs the local ikemgr has, which espd holds at its own counter. The others
    /// reach espd with the CHILD SA ikemgr installs from the takeover.
    /// espd holds the outbound SAs of `contested` tunnels (`Cluster::contested`): told at
    /// once when the set grows, and again every [`SKIP_REPEAT_MS`] while it is not empty
    /// (a bus event can be lost; a restarted espd must hold them too). Released by espd on
    /// the next grant, after the claim back.
    fn hold_contested(&mut self, contested: BTreeSet<String>, out: &mut Outbox) {
        let grew = contested.iter().any(|t| !self.held.contains(t));
        for t in contested.difference(&self.held) {
            tracing::warn!(
                "FGCP: {t} is carried by another member that still says it is primary (it stopped hearing this one: split brain); this member's outbound SAs of it are held until it steps down"
            );
        }
        for t in self.held.difference(&contested) {
            tracing::info!("FGCP: {t} no longer contested");
        }
        if !contested.is_empty() && (grew || self.now_ms >= self.held_next_ms) {
            self.held_next_ms = self.now_ms.saturating_add(SKIP_REPEAT_MS);
            out.push(Body::SeqHold {
                tunnels: contested.iter().cloned().collect(),
            });
        }
        if contested.len() != self.held.len() || grew {
            metrics::gauge!("hasyncd_tunnels_held").set(contested.len() as f64);
        }
        self.held = contested;
    }

    fn resend_skips_until_confirmed(&mut self, skips: &[SeqMark]) {
        let mut fresh = skips.to_vec();
        retain_held(&mut fresh, &self.own_children);
        if fresh.is_empty() {
            return;
        }
        for m in fresh {
            self.skip_resend
                .retain(|w| (&w.tunnel, w.spi_out) != (&m.tunnel, m.spi_out));
            self.skip_resend.push(m);
        }
        self.skip_resend_next = self.now_ms.saturating_add(SKIP_REPEAT_MS);
        self.skip_resend_until = self.now_ms.saturating_add(TAKEOVER_GIVE_UP_MS);
    }

    /// Sends the unconfirmed skips again when due; gives up on them after
    /// [`TAKEOVER_GIVE_UP_MS`] (`on_replica` drops those whose CHILD SA ikemgr no longer
    /// has).
    fn repeat_skips(&mut self, out: &mut Outbox) {
        if self.skip_resend.is_empty() {
            return;
        }
        if self.now_ms >= self.skip_resend_until {
            tracing::error!(
                "HA: espd did not continue above {} skips (outbound {:08x?}); giving up",
                self.skip_resend.len(),
                self.skip_resend
                    .iter()
                    .map(|m| m.spi_out)
                    .collect::<Vec<_>>()
            );
            self.skip_resend.clear();
            return;
        }
        if self.now_ms >= self.skip_resend_next {
            self.skip_resend_next = self.now_ms.saturating_add(SKIP_REPEAT_MS);
            metrics::counter!("hasyncd_sequence_skips_repeated_total")
                .increment(self.skip_resend.len() as u64);
            tracing::debug!(
                "HA: {} skips sent to espd again (no lease asked above them yet)",
                self.skip_resend.len()
            );
            out.push(Body::SeqSkip {
                sas: self.skip_resend.clone(),
            });
        }
    }

    /// espd asked for leases `sas`: a request above a skip means that SA's counter moved;
    /// once every held skip is confirmed the shared addresses are announced.
    fn skips_confirmed(&mut self, sas: &[SeqMark]) {
        self.garp_wait.retain(|w| !skip_confirmed(w, sas));
        if self.garp_wait.is_empty() && self.vip.is_quiet() {
            let now = (haven_daemon::now_ns() / 1_000_000).max(self.now_ms);
            tracing::info!(
                "FGCP: espd continues above the other member on every SA kept here (after {} ms): announcing the shared addresses",
                now.saturating_sub(self.garp_wait_since)
            );
            self.vip.speak(now);
        }
    }

    fn view_inner(&self, name: &str) -> Result<serde_json::Value, String> {
        match name {
            "roles" => Ok(json!(self.roles)),
            "replicas" => Ok(self
                .cluster
                .as_ref()
                .map(Cluster::replicas_view)
                .unwrap_or_else(|| json!({ "standby": [], "local": 0 }))),
            "member" => Ok(json!(self.member)),
            "standby-tunnels" => Ok(self
                .cluster
                .as_ref()
                .map(Cluster::standby_tunnels_view)
                .unwrap_or_else(|| json!({ "tunnels": [] }))),
            "ha-status" => {
                let mut v = self
                    .cluster
                    .as_ref()
                    .map(|c| c.ha_status(self.now_ms))
                    .unwrap_or_else(|| json!({ "mode": "standalone", "members": [] }));
                if let Some(o) = v.as_object_mut() {
                    o.insert("shared_addresses".into(), json!(self.vip.list()));
                    o.insert("holds_shared_addresses".into(), json!(self.vip.held()));
                }
                Ok(v)
            }
            "checksum" => Ok(self.cfgsync.view(self.cluster.as_ref(), self.now_ms)),
            "standalone-peers" => Ok(self
                .cluster
                .as_ref()
                .map(Cluster::standalone_peers)
                .unwrap_or_else(|| json!({ "configured": false, "peers": [] }))),
            other => Err(format!(
                "unknown view {other:?}: hasyncd has: roles, member, ha-status, checksum, standalone-peers, replicas, standby-tunnels"
            )),
        }
    }
}

/// The reply of `ike-restore`: `{"ike": [IkeSaRecord], "child": [ChildSaInfo]}` in the
/// bus's own serde form (byte strings as hex).
fn restore_set(
    ike: &BTreeMap<String, IkeSaRecord>,
    children: &BTreeMap<String, ChildSaInfo>,
) -> serde_json::Value {
    json!({
        "ike": ike.values().collect::<Vec<_>>(),
        "child": children.values().collect::<Vec<_>>(),
    })
}

fn main() -> ExitCode {
    haven_daemon::run::<Hasyncd>()
}

/// A reproducible random number below `n` per call (xorshift64, seeded), for the tests
/// that play random sequences of changes.
#[cfg(test)]
fn test_rng(mut state: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_schema::samples::{child_sa, ike_sa};

    #[test]
    fn tunnel_roles_follow_the_fgcp_role() {
        assert_eq!(tunnel_role(None), "sync-primary");
        assert_eq!(tunnel_role(Some(HaRole::Primary)), "sync-primary");
        assert_eq!(tunnel_role(Some(HaRole::Secondary)), "standby");
        assert_eq!(tunnel_role(Some(HaRole::Hello)), "standby");
    }

    #[test]
    fn roles_are_published_per_tunnel_and_withdrawn() {
        let config = Config::default();
        let mut d = Hasyncd::new(&config, Path::new("/nonexistent"));
        let mut out = Outbox::new();
        d.tunnels = ["vpn1".to_string(), "vpn2".to_string()].into();
        d.publish_roles(&mut out);
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|b| matches!(b, Body::TunnelRole { role, .. } if role == "sync-primary")));
        out.clear();
        d.tunnels = ["vpn2".to_string()].into();
        d.publish_roles(&mut out);
        assert!(matches!(out.as_slice(), [Body::TunnelRoleRemoved { tunnel }] if tunnel == "vpn1"));
    }

    #[test]
    fn the_local_replica_of_ikemgr_is_served_back_whole_for_a_restart() {
        let config = Config::default();
        let mut d = Hasyncd::new(&config, Path::new("/nonexistent"));
        let rec = ike_sa();
        let child = child_sa();
        let mut store = StateStore::default();
        store.apply(&Body::IkeSa(rec.clone()));
        store.apply(&Body::ChildSa(child.clone()));
        let mut out = Outbox::new();
        d.on_replica(DaemonKind::Ikemgr, &store, &mut out);
        let v = d.command("ike-restore", &[], &mut out).unwrap();
        let ike: Vec<IkeSaRecord> = serde_json::from_value(v["ike"].clone()).unwrap();
        let children: Vec<ChildSaInfo> = serde_json::from_value(v["child"].clone()).unwrap();
        assert_eq!(ike, vec![rec]);
        assert_eq!(children, vec![child]);
        // ikemgr removed them: nothing is served.
        d.on_replica(DaemonKind::Ikemgr, &StateStore::default(), &mut out);
        let v = d.command("ike-restore", &[], &mut out).unwrap();
        assert_eq!(v["ike"], json!([]));
        assert_eq!(v["child"], json!([]));
    }

    /// A restarted hasyncd hears ikemgr on the bus before its links start (it reads its
    /// configuration after): the IKE SAs carried here must still be in what the partner
    /// gets. In the `--ha-link` fault run they were not: the partner applied snapshots
    /// without the IKE SA, dropped its copy, and when it took over it had nothing to take
    /// over from (strongSwan renegotiated).
    #[test]
    fn ike_sas_heard_before_the_links_started_are_synced() {
        let config = Config::default();
        let mut d = Hasyncd::new(&config, Path::new("/nonexistent"));
        let mut store = StateStore::default();
        store.apply(&Body::IkeSa(ike_sa()));
        store.apply(&Body::ChildSa(child_sa()));
        let mut out = Outbox::new();
        d.on_replica(DaemonKind::Ikemgr, &store, &mut out);
        assert!(d.cluster.is_none(), "no links before the configuration");
        d.on_config(&config, &mut out);
        d.tick(1_000_000_000, &mut out);
        let v = d.view_inner("replicas").unwrap();
        assert_eq!(v["ike_local"], 1, "the IKE SA carried here: {v}");
        assert_eq!(v["local"], 1, "the CHILD SA carried here: {v}");
    }

    /// A take-back of an IKE SA ikemgr kept as it is (the other member exchanged nothing
    /// with the peer meanwhile): ikemgr's record will not change, so the takeover is done
    /// at once instead of being repeated for 30 s and reported as given up.
    #[test]
    fn a_takeover_of_the_ike_sa_ikemgr_holds_as_it_is_is_done_at_once() {
        let config = Config::default();
        let mut d = Hasyncd::new(&config, Path::new("/nonexistent"));
        let kept = ike_sa();
        let mut store = StateStore::default();
        store.apply(&Body::IkeSa(kept.clone()));
        let mut out = Outbox::new();
        d.on_replica(DaemonKind::Ikemgr, &store, &mut out);
        out.clear();
        let info = |ike: IkeSaRecord| TakeoverInfo {
            ike,
            start_seqs: Vec::new(),
            lifetimes: Vec::new(),
            held_only: false,
        };
        d.send_takeover(info(kept.clone()), &mut out);
        assert!(
            matches!(out.as_slice(), [Body::Takeover(t)] if t.ike == kept),
            "{out:?}"
        );
        assert!(d.takeovers.is_empty(), "nothing left to wait for");
        // A copy the other member moved on is waited for (and repeated).
        let later = IkeSaRecord {
            next_recv: kept.next_recv + 1,
            ..kept.clone()
        };
        d.send_takeover(info(later), &mut out);
        assert!(d.takeovers.contains_key(&kept.tunnel));
    }

    /// Another member's later copy of an SA carried here goes to ikemgr only while ikemgr
    /// holds that SA, and is no longer repeated once it does not (a DPD flush): repeating
    /// it would bring the SA back on a member the peer no longer talks to.
    #[test]
    fn a_later_copy_is_sent_only_while_ikemgr_holds_the_sa() {
        let config = Config::default();
        let mut d = Hasyncd::new(&config, Path::new("/nonexistent"));
        let kept = ike_sa();
        let later = TakeoverInfo {
            ike: IkeSaRecord {
                next_send: kept.next_send + 2,
                ..kept.clone()
            },
            start_seqs: Vec::new(),
            lifetimes: Vec::new(),
            held_only: true,
        };
        let mut out = Outbox::new();
        d.send_takeover(later.clone(), &mut out);
        assert!(out.is_empty(), "ikemgr holds no SA: {out:?}");
        let mut store = StateStore::default();
        store.apply(&Body::IkeSa(kept.clone()));
        d.on_replica(DaemonKind::Ikemgr, &store, &mut out);
        out.clear();
        d.send_takeover(later.clone(), &mut out);
        assert!(matches!(out.as_slice(), [Body::Takeover(t)] if t.held_only));
        assert!(
            d.takeovers.contains_key(&kept.tunnel),
            "repeated until done"
        );
        // ikemgr flushed the SA before it took the copy: not repeated any more.
        d.on_replica(DaemonKind::Ikemgr, &StateStore::default(), &mut out);
        assert!(d.takeovers.is_empty());
    }

    /// A take-back of an IKE SA ikemgr kept: its record has the takeover's SPIs from the
    /// start, but the takeover is repeated until ikemgr's message IDs reach the copy's.
    #[test]
    fn a_takeover_is_repeated_until_ikemgr_has_the_copys_message_ids() {
        let config = Config::default();
        let mut d = Hasyncd::new(&config, Path::new("/nonexistent"));
        let kept = ike_sa();
        // The partner answered a CHILD rekey while it carried the tunnel.
        let copy = IkeSaRecord {
            next_recv: kept.next_recv + 1,
            ..kept.clone()
        };
        let info = TakeoverInfo {
            ike: copy.clone(),
            start_seqs: Vec::new(),
            lifetimes: Vec::new(),
            held_only: false,
        };
        d.cluster = Some(Cluster::start(&config, 0, cluster::EpochStore::in_memory()));
        d.takeovers.insert(
            "vpn1_1".into(),
            (info, TAKEOVER_REPEAT_MS, TAKEOVER_GIVE_UP_MS),
        );
        let with = |r: &IkeSaRecord| {
            let mut store = StateStore::default();
            store.apply(&Body::IkeSa(r.clone()));
            store
        };
        let mut out = Outbox::new();
        d.on_replica(DaemonKind::Ikemgr, &with(&kept), &mut out);
        assert!(d.takeovers.contains_key("vpn1_1"), "kept SA taken as done");
        out.clear();
        d.tick(TAKEOVER_REPEAT_MS * 1_000_000, &mut out);
        assert!(
            out.iter()
                .any(|b| matches!(b, Body::Takeover(t) if t.ike == copy)),
            "{out:?}"
        );
        // Another IKE SA on the tunnel (its SPIs) does not confirm it either.
        let other = IkeSaRecord {
            spi_r: 0x5566,
            next_send: 9,
            next_recv: 9,
            ..kept.clone()
        };
        d.on_replica(DaemonKind::Ikemgr, &with(&other), &mut out);
        assert!(d.takeovers.contains_key("vpn1_1"));
        // ikemgr continued the copy: done.
        d.on_replica(DaemonKind::Ikemgr, &with(&copy), &mut out);
        assert!(d.takeovers.is_empty());
    }

    /// A skip of an SA espd holds goes again until espd asks for a lease above it (the
    /// first can be lost on the bus right after hasyncd started); other skips go once.
    #[test]
    fn skips_of_held_sas_are_repeated_until_espd_leases_above_them() {
        let config = Config::default();
        let mut d = Hasyncd::new(&config, Path::new("/nonexistent"));
        d.cluster = Some(Cluster::start(&config, 0, cluster::EpochStore::in_memory()));
        let child = child_sa();
        let held = child.spi_out;
        let mut store = StateStore::default();
        store.apply(&Body::ChildSa(child));
        let mut out = Outbox::new();
        d.on_replica(DaemonKind::Ikemgr, &store, &mut out);
        let skip = |spi_out: u32, seq_hw: u64| SeqMark {
            tunnel: "vpn1_1".into(),
            spi_out,
            seq_hw,
        };
        d.resend_skips_until_confirmed(&[skip(held, 5000), skip(0xdead, 7000)]);
        let sent = |out: &Outbox| -> Vec<SeqMark> {
            out.iter()
                .filter_map(|b| match b {
                    Body::SeqSkip { sas } => Some(sas.clone()),
                    _ => None,
                })
                .flatten()
                .collect()
        };
        out.clear();
        d.tick(SKIP_REPEAT_MS * 1_000_000, &mut out);
        assert_eq!(sent(&out), vec![skip(held, 5000)], "{out:?}");
        // A lease request below the skip does not confirm it; one above does.
        let lease = |seq_hw: u64| Body::SeqLeaseRequest {
            sas: vec![skip(held, seq_hw)],
        };
        d.on_event(DaemonKind::Espd, &lease(4000), &mut out);
        out.clear();
        d.tick(2 * SKIP_REPEAT_MS * 1_000_000, &mut out);
        assert_eq!(sent(&out), vec![skip(held, 5000)]);
        d.on_event(DaemonKind::Espd, &lease(5000 + (1 << 20)), &mut out);
        out.clear();
        d.tick(3 * SKIP_REPEAT_MS * 1_000_000, &mut out);
        assert!(sent(&out).is_empty(), "{out:?}");
        // Unconfirmed, they give up with the takeovers.
        d.resend_skips_until_confirmed(&[skip(held, 9000)]);
        out.clear();
        d.tick(
            (3 * SKIP_REPEAT_MS + TAKEOVER_GIVE_UP_MS) * 1_000_000,
            &mut out,
        );
        assert!(sent(&out).is_empty());
        assert!(d.skip_resend.is_empty());
    }

    #[test]
    fn member_mode_from_config() {
        let mut config = Config::default();
        assert_eq!(member_of(&config).mode, "standalone");
        config.standalone = Some(haven_config::StandaloneCluster {
            group_member_id: 3,
            ..Default::default()
        });
        let m = member_of(&config);
        assert_eq!((m.mode.as_str(), m.member_id), ("fgsp", 3));
    }

    /// The take-back's announcement waits only for SAs espd carries: ikemgr's CHILD SAs of
    /// the tunnel with that outbound SPI (a tunnel whose name starts another's is another
    /// tunnel).
    #[test]
    fn an_outbound_sa_is_held_only_if_ikemgr_has_it_under_its_tunnel() {
        let mut children = BTreeMap::new();
        for (tunnel, spi_in, spi_out) in [("vpn1_1", 1, 0x11), ("vpn1_10", 2, 0x22)] {
            let mut c = child_sa();
            c.tunnel = tunnel.into();
            c.spi_in = spi_in;
            c.spi_out = spi_out;
            children.insert(ChildSaInfo::key_of(tunnel, spi_in), c);
        }
        assert!(holds_outbound(&children, "vpn1_1", 0x11));
        assert!(holds_outbound(&children, "vpn1_10", 0x22));
        assert!(
            !holds_outbound(&children, "vpn1_1", 0x22),
            "another tunnel's SA"
        );
        assert!(
            !holds_outbound(&children, "vpn1_1", 0x77),
            "a rekeyed-away SA"
        );
        assert!(!holds_outbound(&children, "vpn1", 0x11));
        assert!(!holds_outbound(&BTreeMap::new(), "vpn1_1", 0x11));
    }

    fn tunnel_body(name: &str) -> Body {
        let mut t = bus_schema::samples::tunnel();
        t.name = name.into();
        Body::Tunnel(t)
    }

    /// ikemgr's store as `n` dial-up tunnels, each with its IKE SA and one CHILD SA.
    fn store_of(n: usize) -> StateStore {
        let mut store = StateStore::default();
        for i in 0..n {
            let tunnel = format!("dial_{i}");
            let mut r = ike_sa();
            r.tunnel = tunnel.clone();
            r.spi_i = i as u64 + 1;
            store.apply(&Body::IkeSa(r));
            let mut c = child_sa();
            c.tunnel = tunnel.clone();
            c.spi_in = i as u32 + 1;
            c.spi_out = i as u32 + 1_000_000;
            store.apply(&Body::ChildSa(c));
            store.apply(&tunnel_body(&tunnel));
        }
        store
    }

    /// What `on_replica` keeps of ikemgr's store.
    fn kept(d: &Hasyncd) -> String {
        format!(
            "{:?} {:?} {:?} {:?} {:?} {:?} {}",
            d.tunnels, d.own_ike, d.ike_spis, d.own_children, d.child_sas, d.roles, d.roles_primary
        )
    }

    /// Updates read as changes from the copy read before leave hasyncd with what a fresh
    /// hasyncd reads from the whole store, through tunnels, IKE SAs and CHILD SAs coming,
    /// changing (message IDs, rekeys) and going; and a store rebuilt from the same bodies
    /// (a snapshot after a bus gap) changes nothing.
    #[test]
    fn an_update_read_as_changes_keeps_what_the_whole_store_gives() {
        let config = Config::default();
        let mut d = Hasyncd::new(&config, Path::new("/nonexistent"));
        let mut store = store_of(20);
        let mut out = Outbox::new();
        let mut next = crate::test_rng(0x9e37_79b9_7f4a_7c15);
        for step in 0..400 {
            for _ in 0..=next(4) {
                let tunnel = format!("dial_{}", next(30));
                let body = match next(7) {
                    0 => Body::TunnelRemoved {
                        name: tunnel.clone(),
                    },
                    1 => Body::IkeSaRemoved {
                        tunnel: tunnel.clone(),
                    },
                    2 => Body::ChildSaRemoved {
                        tunnel: tunnel.clone(),
                        spi_in: next(40) as u32,
                    },
                    3 => tunnel_body(&tunnel),
                    4 => {
                        let mut r = ike_sa();
                        r.tunnel = tunnel.clone();
                        r.spi_i = next(3);
                        r.next_send = next(1000) as u32;
                        Body::IkeSa(r)
                    }
                    _ => {
                        let mut c = child_sa();
                        c.tunnel = tunnel.clone();
                        c.spi_in = next(40) as u32;
                        c.spi_out = next(1000) as u32;
                        Body::ChildSa(c)
                    }
                };
                store.apply(&body);
            }
            d.on_replica_copy(DaemonKind::Ikemgr, store.clone(), &mut out);
            let mut fresh = Hasyncd::new(&config, Path::new("/nonexistent"));
            fresh.on_replica(DaemonKind::Ikemgr, &store, &mut Outbox::new());
            // The roles from the whole list (`d` publishes only the changed tunnels').
            fresh.publish_roles(&mut Outbox::new());
            assert_eq!(kept(&d), kept(&fresh), "step {step}");
        }
        let before = kept(&d);
        let mut rebuilt = StateStore::default();
        for b in store.items() {
            rebuilt.apply(b);
        }
        out.clear();
        d.on_replica_copy(DaemonKind::Ikemgr, rebuilt, &mut out);
        assert_eq!(kept(&d), before);
        assert!(out.is_empty(), "{out:?}");
    }

    /// Benchmark (prints figures, asserts nothing about time): one IKE SA's message IDs
    /// changing in ikemgr's store of `n` tunnels, read as changes, beside a fresh hasyncd
    /// reading the whole store (what every update cost before), in the same run.
    /// `cargo test --release -p hasyncd --bin hasyncd on_replica_bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn on_replica_bench() {
        for n in [1_000usize, 10_000, 100_000] {
            let config = Config::default();
            let mut d = Hasyncd::new(&config, Path::new("/nonexistent"));
            let mut store = store_of(n);
            let mut out = Outbox::new();
            let t = std::time::Instant::now();
            d.on_replica_copy(DaemonKind::Ikemgr, store.clone(), &mut out);
            let whole = t.elapsed();
            let runs = 20u32;
            let mut update = std::time::Duration::ZERO;
            for k in 0..runs {
                let mut r = ike_sa();
                r.tunnel = format!("dial_{k}");
                r.spi_i = u64::from(k) + 1;
                r.next_send = 100 + k;
                store.apply(&Body::IkeSa(r));
                let copy = store.clone();
                let t = std::time::Instant::now();
                d.on_replica_copy(DaemonKind::Ikemgr, copy, &mut out);
                update += t.elapsed();
            }
            eprintln!(
                "{n:>7} tunnels: one IKE SA changed, read as changes {:>9.2?} (mean of {runs}); reference, the whole store read {:>9.2?}",
                update / runs,
                whole
            );
            // A dial-up client coming: its tunnel, IKE SA and CHILD SA in one update.
            let (mut came, mut list) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
            for k in 0..runs {
                let tunnel = format!("new_{k}");
                let mut r = ike_sa();
                r.tunnel = tunnel.clone();
                store.apply(&Body::IkeSa(r));
                let mut c = child_sa();
                c.tunnel = tunnel.clone();
                c.spi_in = 0x4000_0000 + k;
                store.apply(&Body::ChildSa(c));
                store.apply(&tunnel_body(&tunnel));
                let copy = store.clone();
                let t = std::time::Instant::now();
                d.on_replica_copy(DaemonKind::Ikemgr, copy, &mut out);
                came += t.elapsed();
                let t = std::time::Instant::now();
                d.publish_roles(&mut out);
                list += t.elapsed();
            }
            eprintln!(
                "{n:>7} tunnels: a tunnel came, read as changes {:>9.2?} (mean of {runs}); reference, the whole role list {:>9.2?}",
                came / runs,
                list / runs
            );
        }
    }
}
