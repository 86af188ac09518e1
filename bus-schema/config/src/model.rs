//! The typed configuration model.
//!
//! Every field documents the FortiOS key it comes from and the FortiOS
//! default Haven applies when the key is not set (or is `unset`). Defaults
//! follow FortiOS 6.4/7.0 (the versions of the seeds).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Serialize, Serializer};

use crate::secret::Secret;

/// FGSP session-synchronisation TCP port (FortiOS uses 708, as the seeds'
/// `diagnose sys ha standalone-peers` output shows: `peerip:port = …:708`).
pub const FGSP_PORT: u16 = 708;

/// Unit of `hb-interval`: FortiOS counts heartbeat intervals in 100 ms ticks.
pub const HB_TICK_MS: u32 = 100;

/// A parsed gateway configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Default)]
pub struct Config {
    /// `config system ha` (FGCP), if present.
    pub ha: Option<Ha>,
    /// `config system standalone-cluster` (FGSP), if present.
    pub standalone: Option<StandaloneCluster>,
    /// `config vpn ipsec phase1-interface` entries, in file order.
    pub phase1: Vec<Phase1>,
    /// `config vpn ipsec phase2-interface` entries, in file order.
    pub phase2: Vec<Phase2>,
    /// `config router static` entries, in file order.
    pub routes: Vec<Route>,
    /// `config vpn ipsec manualkey-interface` entries, in file order.
    pub manualkey: Vec<ManualKey>,
    /// Haven-specific settings FortiOS has no key for.
    pub haven: HavenSettings,
    /// `config system interface` entries (the keys Haven reads), in file order.
    pub interfaces: Vec<Interface>,
}

impl Config {
    /// The `config system interface` entry named `name`.
    pub fn interface(&self, name: &str) -> Option<&Interface> {
        self.interfaces.iter().find(|i| i.name == name)
    }

    /// The phase1 named `name`.
    pub fn phase1(&self, name: &str) -> Option<&Phase1> {
        self.phase1.iter().find(|p| p.name == name)
    }

    /// The phase2 entries whose `phase1name` is `phase1`, in file order.
    pub fn phase2_for<'a>(&'a self, phase1: &'a str) -> impl Iterator<Item = &'a Phase2> + 'a {
        self.phase2.iter().filter(move |p| p.phase1name == phase1)
    }

    /// The manualkey-interface named `name`.
    pub fn manualkey(&self, name: &str) -> Option<&ManualKey> {
        self.manualkey.iter().find(|m| m.name == name)
    }

    /// The static routes whose `device` is `device` (a phase1 name for
    /// routes into a tunnel).
    pub fn routes_via<'a>(&'a self, device: &'a str) -> impl Iterator<Item = &'a Route> + 'a {
        self.routes
            .iter()
            .filter(move |r| r.device.as_deref() == Some(device))
    }
}

/// Extension point for Haven-specific settings that FortiOS has no key for
/// (for example an exponential DPD retry schedule in the PAN-OS style, or a
/// heartbeat interval in milliseconds below FortiOS's 100 ms tick). None is
/// implemented yet. They will be read from a block of their own so that a
/// FortiOS configuration stays loadable unchanged; until then every field
/// here keeps its documented default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Default)]
#[non_exhaustive]
pub struct HavenSettings {}

/// A `config system interface` entry: only `ip` and `type` are read (every other
/// FortiOS interface key is accepted with a warning). On an FGCP member hasyncd holds
/// these addresses on the primary only (the cluster's shared interface addresses,
/// seed 001's table); elsewhere Haven leaves interfaces to the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Interface {
    /// The edit name: the interface, e.g. `port5`.
    pub name: String,
    /// `set ip ADDRESS MASK` (or `ADDRESS/LENGTH`): the address (host bits kept) and
    /// its prefix length. None when unset or `0.0.0.0 0.0.0.0` (FortiOS's default).
    pub ip: Option<(Ipv4Addr, u8)>,
    /// `set type loopback`.
    pub loopback: bool,
}

/// `config system ha` `set mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum HaMode {
    /// `standalone`: no FGCP cluster (FortiOS default).
    #[serde(rename = "standalone")]
    Standalone,
    /// `a-p`: active-passive cluster.
    #[serde(rename = "a-p")]
    ActivePassive,
}

/// One `hbdev` entry: a heartbeat interface and its priority.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HbDev {
    /// Interface name.
    pub interface: String,
    /// Priority 0..=512 (higher is preferred).
    pub priority: u16,
}

/// `config system ha` (FGCP).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ha {
    /// `group-id`, 0..=1023. Default 0.
    pub group_id: u16,
    /// `group-name`, at most 32 characters. Default empty.
    pub group_name: String,
    /// `mode`: `standalone` | `a-p` (`a-a` is rejected). Default `standalone`.
    pub mode: HaMode,
    /// `password`: the cluster secret the HA link keys are derived from.
    /// Default none.
    pub password: Option<Secret>,
    /// `hbdev "port3" 50 "port4" 50`: heartbeat interfaces with priorities.
    /// Default empty.
    pub hbdev: Vec<HbDev>,
    /// `priority`, 0..=255; the highest priority becomes primary. Default 128.
    pub priority: u8,
    /// `override`: a higher-priority member takes the primary role back.
    /// Default disable.
    #[serde(rename = "override")]
    pub override_: bool,
    /// `session-pickup`: synchronise sessions (and IPsec SAs). Default disable.
    pub session_pickup: bool,
    /// `hb-interval` in ticks, 1..=20. Default 2. A tick is
    /// [`HB_TICK_MS`] (100 ms) unless `hb-interval-in-milliseconds 10ms`
    /// (FortiOS 7.x) makes it 10 ms; see [`Ha::hb_interval_ms`].
    pub hb_interval: u8,
    /// Length of an `hb-interval` tick in ms: `hb-interval-in-milliseconds`
    /// `100ms` (default) or `10ms`.
    pub hb_tick_ms: u32,
    /// `hb-lost-threshold`: heartbeats lost before a member is declared
    /// dead, 1..=60. Default 6.
    pub hb_lost_threshold: u8,
    /// `monitor`: interfaces whose failure triggers a failover. Default empty.
    pub monitor: Vec<String>,
    /// `sync-config`: take the FGCP primary's configuration (on a secondary)
    /// and offer it (on the primary). Default enable. Per member: see
    /// [`crate::member`].
    pub sync_config: bool,
}

impl Ha {
    /// `hb-interval` in milliseconds.
    pub fn hb_interval_ms(&self) -> u32 {
        u32::from(self.hb_interval).saturating_mul(self.hb_tick_ms)
    }
}

impl Default for Ha {
    fn default() -> Self {
        Ha {
            group_id: 0,
            group_name: String::new(),
            mode: HaMode::Standalone,
            password: None,
            hbdev: Vec::new(),
            priority: 128,
            override_: false,
            session_pickup: false,
            hb_interval: 2,
            hb_tick_ms: HB_TICK_MS,
            hb_lost_threshold: 6,
            monitor: Vec::new(),
            sync_config: true,
        }
    }
}

/// `config system standalone-cluster` (FGSP). Every FortiOS default is zero,
/// empty or off, so `Default` gives them all.
#[derive(Clone, Debug, PartialEq, Serialize, Default)]
pub struct StandaloneCluster {
    /// `standalone-group-id`, 0..=255. Default 0.
    pub standalone_group_id: u8,
    /// `group-member-id`, 0..=15. Default 0.
    pub group_member_id: u8,
    /// `layer2-connection available|unavailable`. Default unavailable (false).
    pub layer2_connection: bool,
    /// `session-sync-dev`: interfaces carrying session sync. Default empty.
    pub session_sync_dev: Vec<String>,
    /// `encryption`: encrypt session sync. Default disable.
    pub encryption: bool,
    /// `psksecret`: FGSP pre-shared key. Default none.
    pub psksecret: Option<Secret>,
    /// `config cluster-peer`, in file order.
    pub cluster_peers: Vec<ClusterPeer>,
}

/// One `config cluster-peer` edit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterPeer {
    /// The edit number (FortiOS `sync-id`). `edit 0` takes the next free id.
    pub sync_id: u32,
    /// `peerip`: the peer's session-sync address (required).
    pub peerip: Ipv4Addr,
    /// `peervd`: the peer's VDOM. Default `root`.
    pub peervd: String,
    /// Session-sync port: always [`FGSP_PORT`] (708); FortiOS has no key
    /// for it. A Haven override would come through [`HavenSettings`].
    pub port: u16,
    /// `hb-interval`: FGSP heartbeat interval to this peer in ticks of
    /// [`HB_TICK_MS`] (100 ms), 1..=20. Default 2 (200 ms), as `config system
    /// ha`'s.
    pub hb_interval: u8,
    /// `hb-lost-threshold`: heartbeats missed before the peer is lost,
    /// 1..=60. Default 6 (with the default interval: lost after 1.2 s).
    pub hb_lost_threshold: u8,
}

impl ClusterPeer {
    /// A peer at `peerip` with every other key at its default.
    pub fn new(sync_id: u32, peerip: Ipv4Addr) -> ClusterPeer {
        ClusterPeer {
            sync_id,
            peerip,
            peervd: "root".into(),
            port: FGSP_PORT,
            hb_interval: 2,
            hb_lost_threshold: 6,
        }
    }

    /// `hb-interval` in milliseconds.
    pub fn hb_interval_ms(&self) -> u32 {
        u32::from(self.hb_interval).saturating_mul(HB_TICK_MS)
    }

    /// `hb-interval` x `hb-lost-threshold` in milliseconds: silence after which the peer
    /// is lost.
    pub fn lost_after_ms(&self) -> u32 {
        self.hb_interval_ms()
            .saturating_mul(u32::from(self.hb_lost_threshold))
    }
}

/// `set type` of a phase1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase1Type {
    /// `static`: fixed remote gateway (FortiOS default).
    Static,
    /// `dynamic`: dial-up server; each peer gets an instance (`vpn1_1`, …).
    Dynamic,
    /// `ddns`: remote gateway by DNS name (`remotegw-ddns`).
    Ddns,
}

/// `set peertype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerType {
    /// `any`: accept any peer ID (FortiOS default).
    Any,
    /// `one`: accept only `peerid`.
    One,
}

/// `set localid-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalIdType {
    /// `auto` (FortiOS default): FQDN if `localid` is set, else address.
    Auto,
    /// `fqdn`.
    Fqdn,
    /// `user-fqdn`.
    UserFqdn,
    /// `keyid`.
    Keyid,
    /// `address`.
    Address,
    /// `asn1dn`.
    Asn1dn,
}

/// `set dpd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DpdMode {
    /// `disable`: never probe.
    Disable,
    /// `on-idle`: probe when nothing was received for `dpd-retryinterval`.
    OnIdle,
    /// `on-demand`: probe only when we sent and got nothing back (FortiOS
    /// default).
    OnDemand,
    /// `periodic`: probe at a fixed interval whatever the traffic. Not a
    /// FortiOS value: Haven accepts it for the Cisco `periodic` behaviour.
    Periodic,
}

/// `set dpd-action` (a Haven key named after strongSwan's `dpd_action`; Cisco IOS/ASA clear
/// the SAs, Juniper's `establish-tunnels immediately|on-traffic` is restart / hold): what a
/// static tunnel does after a dead verdict. Unset: `restart` when the phase1 initiates
/// (`auto-negotiate enable`, no `passive-mode`), else `hold`. Dial-up instances are always
/// cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DpdAction {
    /// `clear`: flush and stay down until the operator brings it up or the peer initiates.
    Clear,
    /// `hold`: flush and wait for demand (today: `execute vpn ipsec tunnel up`) or the peer.
    Hold,
    /// `restart`: flush and renegotiate at once, with backoff while the peer stays away.
    Restart,
}

/// `set tunnel-monitor-action` (Haven, PAN-OS's tunnel monitor profile action): what a
/// tunnel whose monitor failed `tunnel-monitor-threshold` probes in a row does. Either way
/// its `add-route` routes are withdrawn while it is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MonitorAction {
    /// `wait-recover`: keep the SAs and keep probing; the routes come back with the first
    /// answered probe.
    WaitRecover,
    /// `fail-over`: handled like a dead DPD verdict (flush, then `dpd-action`: the next
    /// `remote-gw`, or the backup phase1 watching this one).
    FailOver,
}

/// The tunnel monitor of a phase1 (`set tunnel-monitor enable`, Haven; PAN-OS's tunnel
/// monitor, Juniper's `vpn-monitor`): an ICMP echo request from `source` to `destination`
/// through the tunnel every `interval_ms`; `threshold` unanswered in a row declare the
/// tunnel down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TunnelMonitor {
    /// `tunnel-monitor-destination-ip`: an address behind the peer (required).
    pub destination: Ipv4Addr,
    /// `tunnel-monitor-source-ip`: an address of this gateway inside the local selector
    /// (required).
    pub source: Ipv4Addr,
    /// `tunnel-monitor-interval` in ms (`SECONDS [MILLISECONDS]`). Default 3 s (PAN-OS).
    pub interval_ms: u32,
    /// `tunnel-monitor-threshold`: unanswered probes in a row, 1..=100. Default 5 (PAN-OS).
    pub threshold: u32,
    /// `tunnel-monitor-action`. Default: `fail-over` when the phase1 has another
    /// `remote-gw` or a backup phase1 (`set monitor`), else `wait-recover`.
    pub action: Option<MonitorAction>,
}

/// The `tunnel-monitor-action` in force for `p` (`None` without a tunnel monitor): the
/// configured one, else `fail-over` when `p` has another `remote-gw` or a backup phase1
/// watches it (`set monitor`), else `wait-recover`.
pub fn tunnel_monitor_action(config: &Config, p: &Phase1) -> Option<MonitorAction> {
    let m = p.tunnel_monitor.as_ref()?;
    Some(m.action.unwrap_or_else(|| {
        let backup = config
            .phase1
            .iter()
            .any(|b| b.monitor.as_deref() == Some(p.name.as_str()));
        if p.remote_gw.len() > 1 || backup {
            MonitorAction::FailOver
        } else {
            MonitorAction::WaitRecover
        }
    }))
}

/// `set dpd-backoff` (a Haven key, not FortiOS): how the probes of one DPD round are
/// spaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DpdBackoff {
    /// `fixed` (default, FortiOS): `dpd-retrycount` probes `dpd-retryinterval` apart.
    Fixed,
    /// `exponential` (PAN-OS, seed 004): a round starts after `dpd-retryinterval` of
    /// silence; `dpd-retrycount` probes, the wait after probe k being
    /// `min(dpd-backoff-initial x 2^(k-1), dpd-backoff-max)`.
    Exponential,
}

/// `set nattraversal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatTraversal {
    /// `enable`: UDP-encapsulate when NAT is detected (FortiOS default).
    Enable,
    /// `disable`.
    Disable,
    /// `forced`: always UDP-encapsulate (RFC 3948).
    Forced,
}

/// `set authmethod`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// `psk`: pre-shared key (FortiOS default).
    Psk,
    /// `signature`: certificate (`certificate`).
    Signature,
}

/// Encryption part of a FortiOS proposal name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encryption {
    /// `null` (phase2 only).
    Null,
    /// `des`.
    Des,
    /// `3des`.
    TripleDes,
    /// `aes128` (CBC).
    Aes128,
    /// `aes192` (CBC).
    Aes192,
    /// `aes256` (CBC).
    Aes256,
    /// `aes128gcm`.
    Aes128Gcm,
    /// `aes256gcm`.
    Aes256Gcm,
    /// `chacha20poly1305`.
    Chacha20Poly1305,
    /// `aria128`.
    Aria128,
    /// `aria192`.
    Aria192,
    /// `aria256`.
    Aria256,
    /// `seed`.
    Seed,
}

impl Encryption {
    /// Every value with its FortiOS spelling.
    pub const ALL: [(&'static str, Encryption); 13] = [
        ("null", Encryption::Null),
        ("des", Encryption::Des),
        ("3des", Encryption::TripleDes),
        ("aes128", Encryption::Aes128),
        ("aes192", Encryption::Aes192),
        ("aes256", Encryption::Aes256),
        ("aes128gcm", Encryption::Aes128Gcm),
        ("aes256gcm", Encryption::Aes256Gcm),
        ("chacha20poly1305", Encryption::Chacha20Poly1305),
        ("aria128", Encryption::Aria128),
        ("aria192", Encryption::Aria192),
        ("aria256", Encryption::Aria256),
        ("seed", Encryption::Seed),
    ];

    /// The FortiOS spelling.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, e)| *e == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    /// True for combined-mode (AEAD) ciphers, which carry no separate
    /// integrity algorithm.
    pub fn is_aead(self) -> bool {
        matches!(
            self,
            Encryption::Aes128Gcm | Encryption::Aes256Gcm | Encryption::Chacha20Poly1305
        )
    }
}

/// Hash part of a FortiOS proposal name: the integrity algorithm (and, in
/// phase1, the PRF); for AEAD phase1 proposals (`aes128gcm-prfsha256`) the
/// PRF alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hash {
    /// `md5`.
    Md5,
    /// `sha1`.
    Sha1,
    /// `sha256`.
    Sha256,
    /// `sha384`.
    Sha384,
    /// `sha512`.
    Sha512,
}

impl Hash {
    /// Every value with its FortiOS spelling.
    pub const ALL: [(&'static str, Hash); 5] = [
        ("md5", Hash::Md5),
        ("sha1", Hash::Sha1),
        ("sha256", Hash::Sha256),
        ("sha384", Hash::Sha384),
        ("sha512", Hash::Sha512),
    ];

    /// The FortiOS spelling.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, h)| *h == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }
}

/// One FortiOS proposal (`aes128-sha1`, `aes256gcm-prfsha384`, `aes128gcm`,
/// `aes128-null`). Serialises as its FortiOS spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proposal {
    /// The cipher.
    pub encryption: Encryption,
    /// Integrity (phase1: integrity and PRF; AEAD phase1: PRF only). `None`
    /// for AEAD phase2 proposals and for `-null` integrity.
    pub hash: Option<Hash>,
    /// True for a phase1 (IKE) proposal, false for phase2 (ESP).
    pub ike: bool,
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.encryption.name())?;
        match (self.hash, self.encryption.is_aead(), self.ike) {
            (Some(h), true, _) => write!(f, "-prf{}", h.name()),
            (Some(h), false, _) => write!(f, "-{}", h.name()),
            (None, true, _) => Ok(()),
            (None, false, _) => f.write_str("-null"),
        }
    }
}

impl Serialize for Proposal {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// An IPv4 prefix. Serialises as `a.b.c.d/len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    /// Network address (host bits are cleared when parsed).
    pub addr: Ipv4Addr,
    /// Prefix length 0..=32.
    pub prefix_len: u8,
}

impl Ipv4Net {
    /// `0.0.0.0/0`.
    pub const ANY: Ipv4Net = Ipv4Net {
        addr: Ipv4Addr::UNSPECIFIED,
        prefix_len: 0,
    };

    /// The netmask as an address.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(prefix_mask(self.prefix_len))
    }

    /// True when `ip` is inside the prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let m = prefix_mask(self.prefix_len);
        u32::from(ip) & m == u32::from(self.addr) & m
    }
}

/// The mask of a prefix length (lengths above 32 act as 32).
pub(crate) fn prefix_mask(len: u8) -> u32 {
    match len {
        0 => 0,
        l if l >= 32 => u32::MAX,
        l => u32::MAX << (32 - u32::from(l)),
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// `config vpn ipsec phase1-interface` / `edit NAME`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Phase1 {
    /// The edit name (at most 15 characters: it names an interface).
    pub name: String,
    /// `type`. Default `static`.
    #[serde(rename = "type")]
    pub kind: Phase1Type,
    /// `interface`: the outgoing interface (required).
    pub interface: String,
    /// `ike-version`: always 2 in a loaded configuration. FortiOS's default
    /// is 1, but Haven implements only IKEv2: an explicit `set ike-version
    /// 1` is an error, an unset key is read as 2 with a warning.
    pub ike_version: u8,
    /// `local-gw`; `0.0.0.0` (the default) means the interface address.
    pub local_gw: Option<Ipv4Addr>,
    /// `remote-gw`: the peer, then backup peers tried in order. FortiOS
    /// takes one address; Haven accepts a list. Required for `static`.
    pub remote_gw: Vec<Ipv4Addr>,
    /// `remotegw-ddns`: the peer's DNS name for `type ddns`.
    pub remotegw_ddns: Option<String>,
    /// `keylife`: IKE SA lifetime in seconds, 120..=172800. Default 86400.
    pub keylife: u32,
    /// `peertype any|one`. Default `any`.
    pub peertype: PeerType,
    /// `peerid`: the accepted peer ID for `peertype one`.
    pub peerid: Option<String>,
    /// `localid`: our IKE ID. Default none (`''`).
    pub localid: Option<String>,
    /// `localid-type`. Default `auto`.
    pub localid_type: LocalIdType,
    /// `proposal`. Default `aes128-sha256 aes256-sha256 aes128-sha1
    /// aes256-sha1`.
    pub proposal: Vec<Proposal>,
    /// `dhgrp`: Diffie-Hellman groups (IANA numbers). Default `14 5`.
    pub dhgrp: Vec<u16>,
    /// `dpd`. Default `on-demand`.
    pub dpd: DpdMode,
    /// `dpd-retrycount`, 0..=10. Default 3.
    pub dpd_retrycount: u8,
    /// `dpd-retryinterval` in milliseconds. FortiOS writes seconds
    /// (1..=3600, default 20, so 20000 here); Haven also accepts a second
    /// number of milliseconds (`set dpd-retryinterval 1 500` = 1500 ms).
    pub dpd_retryinterval_ms: u32,
    /// `dpd-backoff fixed|exponential` (Haven). Default `fixed`.
    pub dpd_backoff: DpdBackoff,
    /// `dpd-backoff-initial`: first wait of an exponential round, in ms (written as
    /// `SECONDS [MILLISECONDS]` like `dpd-retryinterval`). Default 1 s.
    pub dpd_backoff_initial_ms: u32,
    /// `dpd-backoff-max`: longest wait of an exponential round, in ms. Default 64 s.
    pub dpd_backoff_max_ms: u32,
    /// `fgsp-sync`: synchronise this tunnel to FGSP peers. Default disable.
    pub fgsp_sync: bool,
    /// `ha-sync-esp-seqno`: synchronise outbound ESP sequence numbers.
    /// Default enable.
    pub ha_sync_esp_seqno: bool,
    /// `nattraversal`. Default `enable`.
    pub nattraversal: NatTraversal,
    /// `psksecret`. Default none (required for `authmethod psk`).
    pub psksecret: Option<Secret>,
    /// `net-device`: one interface per dial-up instance. Default disable.
    pub net_device: bool,
    /// `add-route`: add routes to the peer's selectors. Default enable.
    pub add_route: bool,
    /// `auto-negotiate`: bring the tunnel up without traffic. Default enable.
    pub auto_negotiate: bool,
    /// `monitor`: the primary phase1 this one backs up. Default none.
    pub monitor: Option<String>,
    /// `passive-mode`: never initiate. Default disable.
    pub passive_mode: bool,
    /// `dpd-action clear|hold|restart` (Haven). Default unset (see [`DpdAction`]).
    pub dpd_action: Option<DpdAction>,
    /// `authmethod`. Default `psk`.
    pub authmethod: AuthMethod,
    /// `tunnel-monitor enable` and its `tunnel-monitor-*` keys (Haven, after PAN-OS's
    /// tunnel monitor): ICMP echo through the tunnel. Default none (disable).
    pub tunnel_monitor: Option<TunnelMonitor>,
    /// `remote-gw-preempt-interval` (Haven): while a later `remote-gw` carries the
    /// tunnel, try the earlier ones this often (seconds) and move back to the first that
    /// answers; 0 disables. Default 60.
    pub remote_gw_preempt_interval: u32,
    /// `certificate`: local certificate names for `authmethod signature`.
    pub certificate: Vec<String>,
    /// `rekey`: rekey the IKE SA before it expires. Default enable.
    pub rekey: bool,
    /// `comments`. Default empty.
    pub comments: String,
    /// `ip-version 6`: the gateways are IPv6 (`local-gw6`, `remote-gw6`), and
    /// `local_gw`/`remote_gw` are unused. Default 4.
    pub ipv6: bool,
    /// `local-gw6` with `ip-version 6`; `None` (unset or `::`) means the
    /// address the route to the peer picks.
    pub local_gw6: Option<std::net::Ipv6Addr>,
    /// `remote-gw6` with `ip-version 6`: the peer, then backup peers, as
    /// `remote_gw`. Required for `static` then.
    pub remote_gw6: Vec<std::net::Ipv6Addr>,
}

impl Phase1 {
    /// The peers in order: `remote-gw6` with `ip-version 6`, else `remote-gw`.
    pub fn remote_addrs(&self) -> Vec<std::net::IpAddr> {
        if self.ipv6 {
            self.remote_gw6.iter().map(|a| (*a).into()).collect()
        } else {
            self.remote_gw.iter().map(|a| (*a).into()).collect()
        }
    }

    /// The local gateway address of the phase1's family, if set.
    pub fn local_addr(&self) -> Option<std::net::IpAddr> {
        if self.ipv6 {
            self.local_gw6.map(Into::into)
        } else {
            self.local_gw.map(Into::into)
        }
    }

    /// A phase1 named `name` with every FortiOS default (except
    /// `ike_version`, 2; see the field) and an empty `interface`, which
    /// validation requires to be set.
    pub fn new(name: impl Into<String>) -> Self {
        use Encryption::*;
        let p = |encryption, hash| Proposal {
            encryption,
            hash: Some(hash),
            ike: true,
        };
        Phase1 {
            name: name.into(),
            kind: Phase1Type::Static,
            interface: String::new(),
            ike_version: 2,
            local_gw: None,
            remote_gw: Vec::new(),
            remotegw_ddns: None,
            keylife: 86400,
            peertype: PeerType::Any,
            peerid: None,
            localid: None,
            localid_type: LocalIdType::Auto,
            proposal: vec![
                p(Aes128, Hash::Sha256),
                p(Aes256, Hash::Sha256),
                p(Aes128, Hash::Sha1),
                p(Aes256, Hash::Sha1),
            ],
            dhgrp: vec![14, 5],
            dpd: DpdMode::OnDemand,
            dpd_retrycount: 3,
            dpd_retryinterval_ms: 20_000,
            dpd_backoff: DpdBackoff::Fixed,
            dpd_backoff_initial_ms: 1_000,
            dpd_backoff_max_ms: 64_000,
            fgsp_sync: false,
            ha_sync_esp_seqno: true,
            nattraversal: NatTraversal::Enable,
            psksecret: None,
            net_device: false,
            add_route: true,
            auto_negotiate: true,
            monitor: None,
            passive_mode: false,
            dpd_action: None,
            authmethod: AuthMethod::Psk,
            tunnel_monitor: None,
            remote_gw_preempt_interval: 60,
            certificate: Vec::new(),
            rekey: true,
            comments: String::new(),
            ipv6: false,
            local_gw6: None,
            remote_gw6: Vec::new(),
        }
    }
}

/// `set keylife-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeylifeType {
    /// `seconds` (FortiOS default).
    Seconds,
    /// `kbs`.
    Kbs,
    /// `both`: whichever comes first.
    Both,
}

/// A phase2 traffic selector (`src-addr-type` with its addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selector {
    /// `subnet` with `src-subnet`/`dst-subnet` (FortiOS default, `0.0.0.0/0`).
    Subnet(Ipv4Net),
    /// `range` with `*-start-ip` and `*-end-ip`.
    Range {
        /// First address.
        start: Ipv4Addr,
        /// Last address.
        end: Ipv4Addr,
    },
    /// `ip` with `*-start-ip`.
    Ip(Ipv4Addr),
    /// `subnet6` with `src-subnet6`/`dst-subnet6` (an IPv6 prefix; host bits cleared),
    /// or `ip6` with `*-start-ip6` (a /128).
    Subnet6 {
        /// Network address.
        addr: Ipv6Addr,
        /// Prefix length 0..=128.
        prefix_len: u8,
    },
}

/// `config vpn ipsec phase2-interface` / `edit NAME`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Phase2 {
    /// The edit name.
    pub name: String,
    /// `phase1name` (required; must name a phase1).
    pub phase1name: String,
    /// `proposal`. Default `aes128-sha1 aes256-sha1 aes128-sha256
    /// aes256-sha256 aes128gcm aes256gcm chacha20poly1305`.
    pub proposal: Vec<Proposal>,
    /// `pfs`. Default enable.
    pub pfs: bool,
    /// `dhgrp` for PFS. Default `14 5`.
    pub dhgrp: Vec<u16>,
    /// `keylife-type`. Default `seconds`.
    pub keylife_type: KeylifeType,
    /// `keylifeseconds`, 120..=172800. Default 43200.
    pub keylifeseconds: u32,
    /// `keylifekbs`, 5120..=4294967295. Default 5120.
    pub keylifekbs: u32,
    /// Local selector (`src-addr-type`, `src-subnet`, …). Default `0.0.0.0/0`.
    pub src: Selector,
    /// Remote selector (`dst-addr-type`, `dst-subnet`, …). Default `0.0.0.0/0`.
    pub dst: Selector,
    /// `protocol`, 0..=255 (0 = any). Default 0.
    pub protocol: u8,
    /// `src-port`, 0..=65535 (0 = any). Default 0.
    pub src_port: u16,
    /// `dst-port`, 0..=65535 (0 = any). Default 0.
    pub dst_port: u16,
    /// `auto-negotiate`. Default disable.
    pub auto_negotiate: bool,
    /// `keepalive` (autokey keep-alive: rekey without traffic). Default
    /// disable.
    pub keepalive: bool,
    /// `replay`: anti-replay detection. Default enable.
    pub replay: bool,
    /// `comments`. Default empty.
    pub comments: String,
}

impl Phase2 {
    /// A phase2 with every FortiOS default and the given names.
    pub fn new(name: impl Into<String>, phase1name: impl Into<String>) -> Self {
        use Encryption::*;
        let p = |encryption, hash| Proposal {
            encryption,
            hash,
            ike: false,
        };
        Phase2 {
            name: name.into(),
            phase1name: phase1name.into(),
            proposal: vec![
                p(Aes128, Some(Hash::Sha1)),
                p(Aes256, Some(Hash::Sha1)),
                p(Aes128, Some(Hash::Sha256)),
                p(Aes256, Some(Hash::Sha256)),
                p(Aes128Gcm, None),
                p(Aes256Gcm, None),
                p(Chacha20Poly1305, None),
            ],
            pfs: true,
            dhgrp: vec![14, 5],
            keylife_type: KeylifeType::Seconds,
            keylifeseconds: 43200,
            keylifekbs: 5120,
            src: Selector::Subnet(Ipv4Net::ANY),
            dst: Selector::Subnet(Ipv4Net::ANY),
            protocol: 0,
            src_port: 0,
            dst_port: 0,
            auto_negotiate: false,
            keepalive: false,
            replay: true,
            comments: String::new(),
        }
    }
}

/// Smallest SPI a manual-key tunnel may use: RFC 4303 §2.1 reserves 1..=255
/// for IANA and 0 for local use, so neither may appear on the wire.
pub const MANUALKEY_MIN_SPI: u32 = 0x100;

/// UDP port of UDP-encapsulated ESP (RFC 3948 §2.1: the port IKE uses for
/// NAT traversal, 4500 per RFC 7296 §2.23).
pub const NAT_T_PORT: u16 = 4500;

/// How the ESP packets of a manual-key tunnel travel (the Haven extension
/// key `encapsulation` of `config vpn ipsec manualkey-interface`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ManualEncap {
    /// `none`: raw IP protocol 50 (the default).
    None,
    /// `udp`: UDP-encapsulated ESP (RFC 3948) from and to port
    /// [`NAT_T_PORT`] (4500).
    Udp,
}

/// `config vpn ipsec manualkey-interface` / `edit NAME`: an ESP tunnel with
/// fixed SPIs and keys, and no IKE. The edit name is also the name of the
/// tunnel's interface (FortiOS creates an interface named after it), so it
/// cannot also be a phase1-interface name.
///
/// FortiOS keys: `interface`, `ip-version` (4, or 6 with `local-gw6` and
/// `remote-gw6` for the gateway addresses), `addr-type` (inner family, 4 or 6),
/// `remote-gw`, `local-gw`, `auth-alg`, `enc-alg`, `auth-key`, `enc-key`,
/// `local-spi`, `remote-spi`; `npu-offload` is accepted and ignored with a
/// warning.
///
/// Haven extension keys (FortiOS has no equivalent; a FortiGate rejects
/// them): `enc-alg aes128gcm|aes256gcm|chacha20poly1305` (combined-mode
/// ciphers, which take no `auth-alg`), `encapsulation none|udp`,
/// `replay enable|disable`, `src-subnet` and `dst-subnet` (with `addr-type 4`),
/// `src-subnet6` and `dst-subnet6` (with `addr-type 6`).
///
/// The same keys serve both directions, as on FortiOS: the peer's
/// configuration mirrors this one (its `local-spi` is our `remote-spi` and
/// the other way round; keys and algorithms are equal).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ManualKey {
    /// The edit name, 1 to 15 characters: the tunnel and its interface.
    pub name: String,
    /// `interface`: the outgoing interface (required).
    pub interface: String,
    /// `local-gw`; `0.0.0.0` (the default) means the address of `interface`.
    pub local_gw: Option<Ipv4Addr>,
    /// `remote-gw`: the peer (required, not `0.0.0.0`); `0.0.0.0` with
    /// `ip-version 6`, where [`ManualKey::remote_gw6`] is the peer.
    pub remote_gw: Ipv4Addr,
    /// `enc-alg` and `auth-alg` as one phase2-style proposal: `aes128-sha1`,
    /// `aes256-sha256`, `aes128gcm`… (its spelling is the transform name
    /// the ESP datapath understands). Haven implements `enc-alg` `aes128`,
    /// `aes256` (CBC) with `auth-alg` `sha1`, `sha256` or `sha512`, and the
    /// extensions `aes128gcm`, `aes256gcm`, `chacha20poly1305` with no
    /// `auth-alg` (or `auth-alg null`). FortiOS's defaults (`null`) are not
    /// implemented, so both keys must be set for CBC, `enc-alg` for AEAD.
    pub proposal: Proposal,
    /// `enc-key`, decoded from hex: exactly the key length of `enc-alg`
    /// (aes128 16 bytes, aes256 32; aes128gcm 20 and aes256gcm 36, the key
    /// then the 4-byte salt, RFC 4106 §8.1; chacha20poly1305 36, RFC 7634
    /// §4). FortiOS writes 16-digit groups joined by `-`
    /// (`0102030405060708-1112131415161718`); dashes and a `0x` prefix are
    /// optional.
    pub enc_key: Secret,
    /// `auth-key`, decoded from hex like `enc-key`: sha1 20 bytes, sha256
    /// 32, sha512 64 (RFC 2404 §3, RFC 4868 §2.1.1). `None` for AEAD
    /// ciphers.
    pub auth_key: Option<Secret>,
    /// `local-spi`: the SPI of inbound packets, hex (`0x1001` or `1001`),
    /// at least [`MANUALKEY_MIN_SPI`]. Required; unique among the
    /// manual-key tunnels of a gateway.
    pub local_spi: u32,
    /// `remote-spi`: the SPI of outbound packets (the peer's `local-spi`),
    /// same format and range. Required.
    pub remote_spi: u32,
    /// `encapsulation` (Haven extension). Default `none` (raw ESP).
    pub encapsulation: ManualEncap,
    /// `replay` (Haven extension): anti-replay checking of inbound packets
    /// (RFC 4303 §3.4.3). Default enable.
    pub replay: bool,
    /// `src-subnet` (Haven extension): the local traffic selector,
    /// `ADDRESS MASK` or `ADDRESS/LENGTH`. Default `0.0.0.0/0`.
    pub src_subnet: Ipv4Net,
    /// `dst-subnet` (Haven extension): the remote traffic selector. Default
    /// `0.0.0.0/0`.
    pub dst_subnet: Ipv4Net,
    /// `local-gw6` with `ip-version 6`; `None` (unset or `::`) means the
    /// address of `interface`.
    pub local_gw6: Option<std::net::Ipv6Addr>,
    /// `remote-gw6`: the peer with `ip-version 6` (required then, not `::`);
    /// `None` with `ip-version 4`.
    pub remote_gw6: Option<std::net::Ipv6Addr>,
    /// With `addr-type 6` (inner IPv6): `src-subnet6` and `dst-subnet6` (Haven extension,
    /// `ADDRESS/LENGTH`, default `::/0`), the local and remote selectors in place of
    /// `src-subnet`/`dst-subnet`; `None` with `addr-type 4`.
    pub subnets6: Option<((Ipv6Addr, u8), (Ipv6Addr, u8))>,
}

impl ManualKey {
    /// The peer's address: `remote-gw6` with `ip-version 6`, else `remote-gw`.
    pub fn remote_addr(&self) -> std::net::IpAddr {
        match self.remote_gw6 {
            Some(a) => a.into(),
            None => self.remote_gw.into(),
        }
    }

    /// The local gateway address, in the family of [`ManualKey::remote_addr`]; `None`
    /// for the address of `interface`.
    pub fn local_addr(&self) -> Option<std::net::IpAddr> {
        match self.remote_gw6 {
            Some(_) => self.local_gw6.map(Into::into),
            None => self.local_gw.map(Into::into),
        }
    }

    /// The local and remote traffic selectors as prefixes (`10.1.0.0/24`,
    /// `fd00:1::/64`): `src-subnet6`/`dst-subnet6` with `addr-type 6`, else
    /// `src-subnet`/`dst-subnet`.
    pub fn selectors(&self) -> (String, String) {
        match self.subnets6 {
            Some(((s, sl), (d, dl))) => (format!("{s}/{sl}"), format!("{d}/{dl}")),
            None => (self.src_subnet.to_string(), self.dst_subnet.to_string()),
        }
    }

    /// The ESP key block of one direction, in the order of RFC 7296 §2.17:
    /// the encryption key (salt included) followed by the integrity key, if
    /// any. Manual keys are the same in both directions.
    pub fn keymat(&self) -> Secret {
        let mut v =
            Vec::with_capacity(self.enc_key.len() + self.auth_key.as_ref().map_or(0, Secret::len));
        v.extend_from_slice(self.enc_key.expose_bytes());
        if let Some(a) = &self.auth_key {
            v.extend_from_slice(a.expose_bytes());
        }
        Secret::new(v)
    }
}

/// `config router static` / `edit N`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    /// The edit number (`seq-num`). `edit 0` takes the next free number.
    pub seq_num: u32,
    /// `status`. Default enable.
    pub status: bool,
    /// `dst`. Default `0.0.0.0/0`.
    pub dst: Ipv4Net,
    /// `gateway`; `0.0.0.0` (the default) means none.
    pub gateway: Option<Ipv4Addr>,
    /// `device`: outgoing interface or phase1 name.
    pub device: Option<String>,
    /// `distance`, 1..=255. Default 10.
    pub distance: u8,
    /// `priority`, 0..=65535. Default 0.
    pub priority: u32,
    /// `blackhole`. Default disable.
    pub blackhole: bool,
    /// `comment`. Default empty.
    pub comment: String,
}

impl Route {
    /// A route with every FortiOS default.
    pub fn new(seq_num: u32) -> Self {
        Route {
            seq_num,
            status: true,
            dst: Ipv4Net::ANY,
            gateway: None,
            device: None,
            distance: 10,
            priority: 0,
            blackhole: false,
            comment: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposal_spelling() {
        let p = Proposal {
            encryption: Encryption::Aes256Gcm,
            hash: Some(Hash::Sha384),
            ike: true,
        };
        assert_eq!(p.to_string(), "aes256gcm-prfsha384");
        let p = Proposal {
            encryption: Encryption::Aes128Gcm,
            hash: None,
            ike: false,
        };
        assert_eq!(p.to_string(), "aes128gcm");
        let p = Proposal {
            encryption: Encryption::Aes128,
            hash: None,
            ike: false,
        };
        assert_eq!(p.to_string(), "aes128-null");
    }

    #[test]
    fn net_helpers() {
        let n = Ipv4Net {
            addr: Ipv4Addr::new(10, 1, 0, 0),
            prefix_len: 16,
        };
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 0, 0));
        assert!(n.contains(Ipv4Addr::new(10, 1, 2, 3)));
        assert!(!n.contains(Ipv4Addr::new(10, 2, 0, 0)));
        assert!(Ipv4Net::ANY.contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(n.to_string(), "10.1.0.0/16");
    }

    #[test]
    fn hb_interval_unit() {
        let ha = Ha::default();
        assert_eq!(ha.hb_interval_ms(), 200);
    }
}
