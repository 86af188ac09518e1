//! The bus vocabulary: daemons, the envelope, message bodies and their topics.

use serde::{Deserialize, Serialize};

/// Version of the envelope and body layout this build writes and reads.
///
/// Adding an optional field or a new body variant keeps the version (old readers ignore unknown
/// fields and count unknown variants); changing the meaning or type of an existing field bumps it.
/// A frame with a larger version is refused with [`crate::DecodeError::NewerSchema`].
pub const SCHEMA_VERSION: u16 = 1;

/// The programs that talk on the bus.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum DaemonKind {
    Ikemgr,
    Dpdmon,
    Hasyncd,
    Espd,
    Vpnctl,
}

impl DaemonKind {
    /// The four daemons that publish, in their metrics-port order (9701..9704).
    pub const DAEMONS: [DaemonKind; 4] = [
        DaemonKind::Ikemgr,
        DaemonKind::Dpdmon,
        DaemonKind::Hasyncd,
        DaemonKind::Espd,
    ];

    /// Program name, also the wire spelling and the socket file stem.
    pub fn name(self) -> &'static str {
        match self {
            DaemonKind::Ikemgr => "ikemgr",
            DaemonKind::Dpdmon => "dpdmon",
            DaemonKind::Hasyncd => "hasyncd",
            DaemonKind::Espd => "espd",
            DaemonKind::Vpnctl => "vpnctl",
        }
    }

    /// Inverse of [`DaemonKind::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        [
            DaemonKind::Ikemgr,
            DaemonKind::Dpdmon,
            DaemonKind::Hasyncd,
            DaemonKind::Espd,
            DaemonKind::Vpnctl,
        ]
        .into_iter()
        .find(|k| k.name() == s)
    }

    /// The FortiOS `diagnose debug application <app>` name served by this program.
    pub fn debug_app(self) -> &'static str {
        match self {
            DaemonKind::Ikemgr => "ike",
            DaemonKind::Dpdmon => "dpd",
            DaemonKind::Hasyncd => "ha",
            DaemonKind::Espd => "esp",
            DaemonKind::Vpnctl => "vpnctl",
        }
    }

    /// Inverse of [`DaemonKind::debug_app`] for the four daemons.
    pub fn from_debug_app(s: &str) -> Option<Self> {
        DaemonKind::DAEMONS.into_iter().find(|k| k.debug_app() == s)
    }
}

impl std::str::FromStr for DaemonKind {
    type Err = UnknownDaemon;

    /// Accepts the program name (`ikemgr`) or the FortiOS debug app name (`ike`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DaemonKind::from_name(s)
            .or_else(|| DaemonKind::from_debug_app(s))
            .ok_or_else(|| UnknownDaemon(s.to_owned()))
    }
}

/// A name that is neither a program nor a debug application name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown daemon `{0}` (expected ikemgr, dpdmon, hasyncd, espd or ike, dpd, ha, esp)")]
pub struct UnknownDaemon(pub String);

impl std::fmt::Display for DaemonKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One bus message: frame 2 of the multipart message (frame 1 is `body.topic()`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema: u16,
    /// The publishing daemon.
    pub src: DaemonKind,
    /// Random per process start; a new value means "my state restarted".
    #[serde(with = "crate::boot::serde_u128")]
    pub boot: u128,
    /// Per publisher and boot, +1 per message (the first message is 1).
    pub seq: u64,
    /// Publisher's wall clock at stamping, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    pub body: Body,
}

/// Topic constants: ASCII, dot-separated, prefix-filterable. A table's removal topic extends
/// its state topic where possible, so a prefix subscription sees both puts and deletes.
pub mod topic {
    pub const HEARTBEAT: &str = "sys.heartbeat";
    pub const TUNNEL_STATE: &str = "tunnel.state";
    pub const TUNNEL_REMOVED: &str = "tunnel.removed";
    pub const DPD_STATE: &str = "dpd.state";
    pub const DPD_REMOVED: &str = "dpd.removed";
    pub const ESP_TUNNEL: &str = "esp.tunnel";
    pub const ESP_TUNNEL_REMOVED: &str = "esp.tunnel.removed";
    pub const HA_MEMBER: &str = "ha.member";
    pub const HA_MEMBER_REMOVED: &str = "ha.member.removed";
    pub const HA_ROLE: &str = "ha.role";
    pub const HA_ROLE_REMOVED: &str = "ha.role.removed";
    pub const CHILD_SA: &str = "sa.child";
    pub const CHILD_SA_REMOVED: &str = "sa.child.removed";
    pub const ESP_ACTIVITY: &str = "esp.activity";
    pub const ESP_SEQ: &str = "esp.seq";
    pub const ESP_EXPIRE: &str = "esp.expire";
    pub const DPD_PROBE: &str = "dpd.probe";
    pub const IKE_PROBE: &str = "ike.probe";
    pub const IKE_ACTIVITY: &str = "ike.activity";
    pub const IKE_SA: &str = "sa.ike";
    pub const IKE_SA_REMOVED: &str = "sa.ike.removed";
    pub const ESP_LEASE: &str = "esp.lease";
    pub const HA_LEASE: &str = "ha.lease";
    pub const HA_TAKEOVER: &str = "ha.takeover";
    pub const ESP_ACQUIRE: &str = "esp.acquire";
    pub const SA_UNKNOWN: &str = "sa.unknown";
    pub const DPD_MONITOR: &str = "dpd.monitor";
    pub const DPD_MONITOR_REMOVED: &str = "dpd.monitor.removed";
    pub const HA_SEQ_SKIP: &str = "ha.seq.skip";
    pub const HA_SEQ_HOLD: &str = "ha.seq.hold";

    /// Every topic this build knows, for validation and tools.
    pub const ALL: &[&str] = &[
        HEARTBEAT,
        TUNNEL_STATE,
        TUNNEL_REMOVED,
        DPD_STATE,
        DPD_REMOVED,
        ESP_TUNNEL,
        ESP_TUNNEL_REMOVED,
        HA_MEMBER,
        HA_MEMBER_REMOVED,
        HA_ROLE,
        HA_ROLE_REMOVED,
        CHILD_SA,
        CHILD_SA_REMOVED,
        ESP_ACTIVITY,
        ESP_SEQ,
        ESP_EXPIRE,
        DPD_PROBE,
        IKE_PROBE,
        IKE_ACTIVITY,
        IKE_SA,
        IKE_SA_REMOVED,
        ESP_LEASE,
        HA_LEASE,
        HA_TAKEOVER,
        ESP_ACQUIRE,
        SA_UNKNOWN,
        DPD_MONITOR,
        DPD_MONITOR_REMOVED,
        HA_SEQ_SKIP,
        HA_SEQ_HOLD,
    ];
}

/// Key-value tables of the replicated state (the Clone pattern's model).
pub mod table {
    pub const TUNNEL: &str = "tunnel";
    pub const DPD: &str = "dpd";
    pub const ESP_TUNNEL: &str = "esp.tunnel";
    pub const HA_MEMBER: &str = "ha.member";
    pub const HA_ROLE: &str = "ha.role";
    pub const CHILD_SA: &str = "sa.child";
    pub const IKE_SA: &str = "sa.ike";
    pub const DPD_MONITOR: &str = "dpd.monitor";
}

/// Message bodies. Encoded adjacently tagged: `{"type": "<Variant>", "data": <fields>}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", content = "data")]
pub enum Body {
    /// Sent once per second by every publisher so gaps and restarts show while idle.
    Heartbeat {
        uptime_ms: u64,
    },
    /// ikemgr: a configured or instantiated tunnel.
    Tunnel(TunnelInfo),
    TunnelRemoved {
        name: String,
    },
    /// dpdmon: per-tunnel DPD state machine.
    Dpd(DpdTunnelState),
    DpdRemoved {
        tunnel: String,
    },
    /// espd: datapath view of a tunnel.
    EspTunnel(EspTunnelInfo),
    EspTunnelRemoved {
        tunnel: String,
    },
    /// hasyncd: a cluster member.
    HaMember(HaMemberInfo),
    HaMemberRemoved {
        member_id: u32,
    },
    /// hasyncd: this member's role for one tunnel.
    TunnelRole {
        tunnel: String,
        role: String,
    },
    TunnelRoleRemoved {
        tunnel: String,
    },
    /// ikemgr: an installed CHILD SA pair, keys included (the bus is local and root-only).
    ChildSa(ChildSaInfo),
    ChildSaRemoved {
        tunnel: String,
        spi_in: u32,
    },
    /// espd: per-tunnel traffic since the last batch (event; only tunnels that changed).
    EspActivity {
        tunnels: Vec<TunnelActivity>,
    },
    /// espd: outbound sequence high-water marks (event; for HA sync and restarts), and the
    /// age and inner bytes of the SAs whose byte counts moved since the previous batch
    /// (`usage`, added later: hasyncd syncs what their lifetimes have left).
    EspSeq {
        sas: Vec<SeqMark>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        usage: Vec<SaUsage>,
    },
    /// espd: an SA reached a soft or hard lifetime (event; soft asks ikemgr to rekey).
    EspExpire(SaExpiry),
    /// dpdmon: ask ikemgr to send an IKEv2 liveness check (empty INFORMATIONAL) on a
    /// tunnel (event). Retries of one probe carry the same `round`; ikemgr retransmits the
    /// same request (same message ID) for them.
    ProbeRequest {
        tunnel: String,
        round: u64,
        attempt: u32,
    },
    /// ikemgr: what became of a probe (event): `sent` (with its message ID), `reply`,
    /// `timeout` or `failed`.
    ProbeResult {
        tunnel: String,
        round: u64,
        msg_id: u32,
        outcome: String,
    },
    /// ikemgr: last authenticated message from each peer that changed since the previous
    /// batch (event; proof of life for dpdmon).
    IkeActivity {
        tunnels: Vec<IkeActivityMark>,
    },
    /// ikemgr: an established IKE SA as hasyncd replicates it (keys included, in `state`).
    IkeSa(IkeSaRecord),
    IkeSaRemoved {
        tunnel: String,
    },
    /// espd: asks hasyncd to lease outbound sequence numbers below each `seq_hw` (event);
    /// in a cluster espd sends nothing at or above the last granted mark.
    SeqLeaseRequest {
        sas: Vec<SeqMark>,
    },
    /// hasyncd: every live cluster member stored these marks; espd may use numbers below
    /// them (event).
    SeqLeaseGranted {
        sas: Vec<SeqMark>,
    },
    /// hasyncd: this member now carries `ike.tunnel`: ikemgr restores the IKE SA from the
    /// record and installs its CHILD SAs with outbound sequence numbers from `start_seqs`
    /// (event; repeated until ikemgr publishes the IKE SA itself).
    Takeover(TakeoverInfo),
    /// espd: outbound packets routed into a tunnel's TUN device found no outbound SA
    /// (event; at most one per phase1 and phase2 per second, never one per packet): ikemgr
    /// negotiates the missing IKE or CHILD SA (traffic-triggered negotiation).
    Acquire(AcquireInfo),
    /// espd or ikemgr: traffic arrived for SAs this member does not carry (event): ESP with
    /// unknown inbound SPIs (espd), IKE requests for unknown IKE SAs (ikemgr). An FGSP
    /// member holding a standby copy of the tunnel promotes it: the upstream router moved
    /// the tunnel here.
    UnknownSaTraffic(UnknownSaTraffic),
    /// dpdmon: the tunnel monitor of one tunnel (ICMP echo through it; `set tunnel-monitor
    /// enable`): `state` `init`, `up` or `down`; ikemgr withdraws the tunnel's routes while
    /// it is `down` (and fails over with `fail-over`).
    TunnelMonitor(TunnelMonitorState),
    TunnelMonitorRemoved {
        tunnel: String,
    },
    /// hasyncd: the FGCP primary claimed back a tunnel its datapath kept while another
    /// member carried it (a split brain): each outbound SA continues at or above `seq_hw`
    /// (the other member's recorded leases plus the unsynced jump), never backwards, and
    /// leases again before sending (event).
    SeqSkip {
        sas: Vec<SeqMark>,
    },
    /// hasyncd: an FGCP split brain in which the other member, still heard, says it is
    /// primary and carries these tunnels: their outbound SAs send nothing (held, their
    /// packets counted as `seq_lease` drops) until hasyncd grants a lease again, after the
    /// primary claimed them back above the other member's numbers (`SeqSkip` first). Repeated
    /// while it lasts (event).
    SeqHold {
        tunnels: Vec<String>,
    },
}

/// What a body does to the replicated store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateOp {
    Put { table: &'static str, key: String },
    Del { table: &'static str, key: String },
}

impl Body {
    /// Every variant name as written in the `type` field. Keep in step with [`Body::variant`].
    pub const VARIANTS: &'static [&'static str] = &[
        "Heartbeat",
        "Tunnel",
        "TunnelRemoved",
        "Dpd",
        "DpdRemoved",
        "EspTunnel",
        "EspTunnelRemoved",
        "HaMember",
        "HaMemberRemoved",
        "TunnelRole",
        "TunnelRoleRemoved",
        "ChildSa",
        "ChildSaRemoved",
        "EspActivity",
        "EspSeq",
        "EspExpire",
        "ProbeRequest",
        "ProbeResult",
        "IkeActivity",
        "IkeSa",
        "IkeSaRemoved",
        "SeqLeaseRequest",
        "SeqLeaseGranted",
        "Takeover",
        "Acquire",
        "UnknownSaTraffic",
        "TunnelMonitor",
        "TunnelMonitorRemoved",
        "SeqSkip",
        "SeqHold",
    ];

    /// The `type` tag of this body.
    pub fn variant(&self) -> &'static str {
        match self {
            Body::Heartbeat { .. } => "Heartbeat",
            Body::Tunnel(_) => "Tunnel",
            Body::TunnelRemoved { .. } => "TunnelRemoved",
            Body::Dpd(_) => "Dpd",
            Body::DpdRemoved { .. } => "DpdRemoved",
            Body::EspTunnel(_) => "EspTunnel",
            Body::EspTunnelRemoved { .. } => "EspTunnelRemoved",
            Body::HaMember(_) => "HaMember",
            Body::HaMemberRemoved { .. } => "HaMemberRemoved",
            Body::TunnelRole { .. } => "TunnelRole",
            Body::TunnelRoleRemoved { .. } => "TunnelRoleRemoved",
            Body::ChildSa(_) => "ChildSa",
            Body::ChildSaRemoved { .. } => "ChildSaRemoved",
            Body::EspActivity { .. } => "EspActivity",
            Body::EspSeq { .. } => "EspSeq",
            Body::EspExpire(_) => "EspExpire",
            Body::ProbeRequest { .. } => "ProbeRequest",
            Body::ProbeResult { .. } => "ProbeResult",
            Body::IkeActivity { .. } => "IkeActivity",
            Body::IkeSa(_) => "IkeSa",
            Body::IkeSaRemoved { .. } => "IkeSaRemoved",
            Body::SeqLeaseRequest { .. } => "SeqLeaseRequest",
            Body::SeqLeaseGranted { .. } => "SeqLeaseGranted",
            Body::Takeover(_) => "Takeover",
            Body::Acquire(_) => "Acquire",
            Body::UnknownSaTraffic(_) => "UnknownSaTraffic",
            Body::TunnelMonitor(_) => "TunnelMonitor",
            Body::TunnelMonitorRemoved { .. } => "TunnelMonitorRemoved",
            Body::SeqSkip { .. } => "SeqSkip",
            Body::SeqHold { .. } => "SeqHold",
        }
    }

    /// Frame 1 of the multipart message.
    pub fn topic(&self) -> &'static str {
        match self {
            Body::Heartbeat { .. } => topic::HEARTBEAT,
            Body::Tunnel(_) => topic::TUNNEL_STATE,
            Body::TunnelRemoved { .. } => topic::TUNNEL_REMOVED,
            Body::Dpd(_) => topic::DPD_STATE,
            Body::DpdRemoved { .. } => topic::DPD_REMOVED,
            Body::EspTunnel(_) => topic::ESP_TUNNEL,
            Body::EspTunnelRemoved { .. } => topic::ESP_TUNNEL_REMOVED,
            Body::HaMember(_) => topic::HA_MEMBER,
            Body::HaMemberRemoved { .. } => topic::HA_MEMBER_REMOVED,
            Body::TunnelRole { .. } => topic::HA_ROLE,
            Body::TunnelRoleRemoved { .. } => topic::HA_ROLE_REMOVED,
            Body::ChildSa(_) => topic::CHILD_SA,
            Body::ChildSaRemoved { .. } => topic::CHILD_SA_REMOVED,
            Body::EspActivity { .. } => topic::ESP_ACTIVITY,
            Body::EspSeq { .. } => topic::ESP_SEQ,
            Body::EspExpire(_) => topic::ESP_EXPIRE,
            Body::ProbeRequest { .. } => topic::DPD_PROBE,
            Body::ProbeResult { .. } => topic::IKE_PROBE,
            Body::IkeActivity { .. } => topic::IKE_ACTIVITY,
            Body::IkeSa(_) => topic::IKE_SA,
            Body::IkeSaRemoved { .. } => topic::IKE_SA_REMOVED,
            Body::SeqLeaseRequest { .. } => topic::ESP_LEASE,
            Body::SeqLeaseGranted { .. } => topic::HA_LEASE,
            Body::Takeover(_) => topic::HA_TAKEOVER,
            Body::Acquire(_) => topic::ESP_ACQUIRE,
            Body::UnknownSaTraffic(_) => topic::SA_UNKNOWN,
            Body::TunnelMonitor(_) => topic::DPD_MONITOR,
            Body::TunnelMonitorRemoved { .. } => topic::DPD_MONITOR_REMOVED,
            Body::SeqSkip { .. } => topic::HA_SEQ_SKIP,
            Body::SeqHold { .. } => topic::HA_SEQ_HOLD,
        }
    }

    /// The store operation of a stateful body; `None` for events.
    pub fn state_op(&self) -> Option<StateOp> {
        let put = |table, key: &str| {
            Some(StateOp::Put {
                table,
                key: key.to_owned(),
            })
        };
        let del = |table, key: &str| {
            Some(StateOp::Del {
                table,
                key: key.to_owned(),
            })
        };
        match self {
            Body::Heartbeat { .. } => None,
            Body::Tunnel(t) => put(table::TUNNEL, &t.name),
            Body::TunnelRemoved { name } => del(table::TUNNEL, name),
            Body::Dpd(d) => put(table::DPD, &d.tunnel),
            Body::DpdRemoved { tunnel } => del(table::DPD, tunnel),
            Body::EspTunnel(e) => put(table::ESP_TUNNEL, &e.tunnel),
            Body::EspTunnelRemoved { tunnel } => del(table::ESP_TUNNEL, tunnel),
            Body::HaMember(m) => put(table::HA_MEMBER, &m.member_id.to_string()),
            Body::HaMemberRemoved { member_id } => del(table::HA_MEMBER, &member_id.to_string()),
            Body::TunnelRole { tunnel, .. } => put(table::HA_ROLE, tunnel),
            Body::TunnelRoleRemoved { tunnel } => del(table::HA_ROLE, tunnel),
            Body::ChildSa(c) => put(table::CHILD_SA, &ChildSaInfo::key_of(&c.tunnel, c.spi_in)),
            Body::ChildSaRemoved { tunnel, spi_in } => {
                del(table::CHILD_SA, &ChildSaInfo::key_of(tunnel, *spi_in))
            }
            Body::IkeSa(r) => put(table::IKE_SA, &r.tunnel),
            Body::IkeSaRemoved { tunnel } => del(table::IKE_SA, tunnel),
            Body::TunnelMonitor(m) => put(table::DPD_MONITOR, &m.tunnel),
            Body::TunnelMonitorRemoved { tunnel } => del(table::DPD_MONITOR, tunnel),
            Body::EspActivity { .. }
            | Body::SeqLeaseRequest { .. }
            | Body::SeqLeaseGranted { .. }
            | Body::Takeover(_)
            | Body::Acquire(_)
            | Body::EspSeq { .. }
            | Body::EspExpire(_)
            | Body::ProbeRequest { .. }
            | Body::ProbeResult { .. }
            | Body::IkeActivity { .. }
            | Body::UnknownSaTraffic(_)
            | Body::SeqSkip { .. }
            | Body::SeqHold { .. } => None,
        }
    }
}

/// How a tunnel came to exist.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TunnelKind {
    Static,
    Dynamic,
    DialupInstance,
}

/// Coarse tunnel state as shown by `get vpn ipsec tunnel summary`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TunnelState {
    Down,
    Connecting,
    Up,
}

/// DPD settings of a phase1-interface.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct DpdSettings {
    /// `on-idle`, `on-demand` or `disable` (FortiOS spelling).
    pub mode: String,
    pub retry_count: u32,
    pub retry_interval_ms: u64,
}

/// ikemgr's view of one tunnel (`tunnel.state`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TunnelInfo {
    /// Tunnel instance name (`vpn1`, `vpn1_1`...).
    pub name: String,
    /// The phase1-interface it was built from.
    pub phase1: String,
    pub kind: TunnelKind,
    pub local_gw: Option<String>,
    pub remote_gw: Option<String>,
    pub interface: Option<String>,
    pub state: TunnelState,
    /// Names of the phase2-interfaces bound to it.
    pub phase2: Vec<String>,
    pub dpd: DpdSettings,
}

/// dpdmon's per-tunnel DPD state (`dpd.state`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DpdTunnelState {
    pub tunnel: String,
    pub mode: String,
    pub on: bool,
    pub idle_ms: u64,
    pub retry: u32,
    pub count: u32,
    pub seqno: u32,
    pub state: String,
    /// Time from the start of a peer's silence until it is declared dead (dpd-core's
    /// `dead_after_ms`: idle interval + every wait of one probe round); 0 when DPD is off.
    /// Added after the first schema-1 records: absent (0) in records from older dpdmons.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dead_after_ms: u64,
    /// The probe schedule: `fixed`, or `exponential initial=<ms>ms max=<ms>ms`; empty when
    /// DPD is off (or in older records).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub schedule: String,
}

/// dpdmon's tunnel monitor of one tunnel (`dpd.monitor`): an ICMP echo request from
/// `source` to `destination` through the tunnel every `interval_ms`; `threshold`
/// unanswered in a row make it `down`, one answer `up` again. Republished when `state` or
/// `misses` changes (not per probe: counters are in dpdmon's view and metrics).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TunnelMonitorState {
    pub tunnel: String,
    pub phase1: String,
    pub destination: String,
    pub source: String,
    pub interval_ms: u64,
    pub threshold: u32,
    /// Unanswered probes in a row.
    pub misses: u32,
    /// `init` (no answer yet), `up`, `down`.
    pub state: String,
    /// `wait-recover` or `fail-over`: what ikemgr does while it is `down`.
    pub action: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// espd's per-tunnel datapath view (`esp.tunnel`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EspTunnelInfo {
    pub tunnel: String,
    pub device: String,
    pub sa_in: u32,
    pub sa_out: u32,
    pub rx_pkts: u64,
    pub tx_pkts: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// hasyncd's view of one cluster member (`ha.member`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HaMemberInfo {
    pub member_id: u32,
    pub group_id: u32,
    pub mode: String,
    pub role: String,
    pub peers: Vec<String>,
}

/// How ESP packets of a CHILD SA travel.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum EspEncap {
    /// Raw IP protocol 50.
    None,
    /// UDP-encapsulated (RFC 3948), between these ports.
    Udp { local_port: u16, remote_port: u16 },
}

/// Lifetimes of a CHILD SA; 0 means no limit of that kind.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SaLifetime {
    pub soft_secs: u64,
    pub hard_secs: u64,
    pub soft_bytes: u64,
    pub hard_bytes: u64,
}

/// One CHILD SA pair as ikemgr installs it into espd (`sa.child`).
///
/// Key material per direction is the ESP key block of RFC 7296 §2.17 for that direction:
/// the encryption key (with the 4-byte salt at its end for AES-GCM and ChaCha20-Poly1305,
/// RFC 4106 §8.1 / RFC 7634 §4) followed by the integrity key, if any. `transform` is the
/// FortiOS proposal spelling understood by `esp-proto` (`aes128gcm`, `aes128-sha1`,
/// `chacha20poly1305`…). Make-before-break: a rekeyed SA is first published with
/// `outbound: false` (inbound only), then with `outbound: true`, then the old one removed.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct ChildSaInfo {
    /// Tunnel instance (`vpn1`, `vpn1_1`); espd sends its traffic through the TUN device
    /// of `phase1`.
    pub tunnel: String,
    pub phase1: String,
    /// phase2-interface (proxy id) name.
    pub phase2: String,
    pub spi_in: u32,
    pub spi_out: u32,
    pub transform: String,
    pub esn: bool,
    #[serde(with = "crate::boot::serde_bin")]
    pub keys_in: Vec<u8>,
    #[serde(with = "crate::boot::serde_bin")]
    pub keys_out: Vec<u8>,
    /// Outer addresses (our gateway, the peer).
    pub local: String,
    pub remote: String,
    pub encap: EspEncap,
    /// Traffic selectors as CIDR prefixes (`10.0.1.0/24`, `0.0.0.0/0`).
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
    /// Anti-replay window in packets; 0 disables replay checking.
    pub replay_window: u32,
    pub lifetime: SaLifetime,
    /// First outbound sequence number to use (1 normally; beyond the synced lease after an HA
    /// takeover).
    pub initial_seq: u64,
    /// Whether espd may send with this SA (false while only the inbound half is installed).
    pub outbound: bool,
}

impl ChildSaInfo {
    /// Store key of a CHILD SA: `<tunnel>/<spi_in as 8 hex digits>`.
    pub fn key_of(tunnel: &str, spi_in: u32) -> String {
        format!("{tunnel}/{spi_in:08x}")
    }
}

impl std::fmt::Debug for ChildSaInfo {
    /// Keys are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSaInfo")
            .field("tunnel", &self.tunnel)
            .field("phase2", &self.phase2)
            .field("spi_in", &format_args!("{:08x}", self.spi_in))
            .field("spi_out", &format_args!("{:08x}", self.spi_out))
            .field("transform", &self.transform)
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("encap", &self.encap)
            .field("outbound", &self.outbound)
            .field("keys", &"<redacted>")
            .finish()
    }
}

/// Traffic of one tunnel since the previous batch (`esp.activity`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TunnelActivity {
    pub tunnel: String,
    /// Wall-clock time of the last packet received/sent, ns since the epoch (0: never).
    pub last_rx_ns: u64,
    pub last_tx_ns: u64,
    pub rx_pkts: u64,
    pub tx_pkts: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// An outbound SA's sequence high-water mark (`esp.seq`): no packet was or will be sent
/// with a sequence number at or above `seq_hw` before the next mark is published.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SeqMark {
    pub tunnel: String,
    pub spi_out: u32,
    pub seq_hw: u64,
}

/// The SPI under which an IKE SA's RFC 6311 synchronisation mark travels as a [`SeqMark`]
/// (`seq_hw` = the M1 of the synchronisation): ikemgr asks hasyncd to lease it
/// (`SeqLeaseRequest`) before sending the synchronisation, hasyncd grants it once every live
/// member recorded it, and a takeover hands it back in `TakeoverInfo::start_seqs`. It is in
/// 1..=255, which RFC 4303 §2.1 reserves: no CHILD SA has such an SPI, so espd ignores it.
/// Two IKE SAs of one tunnel share it with probability 1/255, so hasyncd forgets an IKE
/// SA's mark when the SA is replaced (a rekey: its record or copy has other SPIs). A member
/// that missed the replacing record on the link (down then, and not resynchronised since)
/// may keep the old mark; if the new SA has the same mark SPI, it then counts there as
/// synchronised already (no synchronisation sent, never a second one).
pub fn ike_mid_mark_spi(spi_i: u64, spi_r: u64) -> u32 {
    let x = spi_i ^ spi_r.rotate_left(32);
    let folded = (x ^ (x >> 32)) as u32;
    1 + folded % 255
}

/// Whether a [`SeqMark`]'s SPI is an IKE SA's synchronisation mark ([`ike_mid_mark_spi`]).
pub fn is_ike_mid_mark(spi_out: u32) -> bool {
    (1..=255).contains(&spi_out)
}

/// An established IKE SA (`sa.ike`), published by ikemgr after every exchange that changed
/// its SPIs, message IDs or CHILD SAs, and replicated by hasyncd to the other members.
/// `keys` is ikemgr's own encoding of the whole SA (keys, algorithms, identities, CHILD
/// SAs); only ikemgr reads it, and tools redact it like `keys_in`/`keys_out`. The plain
/// fields are what the other daemons and views need; `next_send`/`next_recv` are
/// authoritative over the ones inside `keys`.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct IkeSaRecord {
    pub tunnel: String,
    pub phase1: String,
    pub spi_i: u64,
    pub spi_r: u64,
    /// Message ID of our next request, and the one expected on the peer's next request
    /// (RFC 7296 §2.2).
    pub next_send: u32,
    pub next_recv: u32,
    /// The peer's address and port.
    pub remote: String,
    #[serde(with = "crate::boot::serde_blob")]
    pub keys: Vec<u8>,
}

impl std::fmt::Debug for IkeSaRecord {
    /// The state (with the keys) is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IkeSaRecord")
            .field("tunnel", &self.tunnel)
            .field("spi_i", &format_args!("{:016x}", self.spi_i))
            .field("spi_r", &format_args!("{:016x}", self.spi_r))
            .field("next_send", &self.next_send)
            .field("next_recv", &self.next_recv)
            .field("remote", &self.remote)
            .field("keys", &"<redacted>")
            .finish()
    }
}

/// A tunnel this member takes over (`ha.takeover`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TakeoverInfo {
    pub ike: IkeSaRecord,
    /// First outbound sequence number per outbound SPI (`seq_hw` = first number to send).
    pub start_seqs: Vec<SeqMark>,
    /// What each CHILD SA's lifetimes have left now, per outbound SPI (added later; empty
    /// from a member that does not sync it: the SA then starts with its full lifetimes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lifetimes: Vec<LifetimeLeft>,
    /// Only for an IKE SA with these SPIs established here: its message IDs (and, when the
    /// copy rekeyed a CHILD SA, its SAs) move up to the copy's; nothing is restored when the
    /// SA is not held (any more). Set for another member's later copy of an SA this member
    /// carries (after a split brain), which must never bring back an SA dropped meanwhile.
    #[serde(default, skip_serializing_if = "is_false")]
    pub held_only: bool,
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// An SA's age and inner bytes (`esp.seq`'s `usage`): milliseconds since it was installed
/// and the larger of its inbound and outbound inner byte counts (each direction is held
/// to the volume limits on its own).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SaUsage {
    pub tunnel: String,
    pub spi_in: u32,
    pub age_ms: u64,
    pub bytes: u64,
}

/// What the lifetimes of the CHILD SA sending on `spi_out` have left (each 0 where the SA
/// has no such limit, at least 1 where it has one, even if it is used up).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LifetimeLeft {
    pub spi_out: u32,
    pub left: SaLifetime,
}

/// Traffic for SAs this member does not carry (`sa.unknown`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct UnknownSaTraffic {
    /// Inbound ESP SPIs with no installed SA (RFC 4303 §3.4.2), each reported at most once
    /// per batch.
    pub esp_spis: Vec<u32>,
    /// IKE SAs (initiator SPI, responder SPI) a request arrived for (RFC 7296 §2.6).
    pub ike_spis: Vec<IkeSpis>,
}

/// The SPI pair of an IKE SA.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct IkeSpis {
    pub spi_i: u64,
    pub spi_r: u64,
}

/// Last authenticated IKE message from a tunnel's peer (`ike.activity`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct IkeActivityMark {
    pub tunnel: String,
    /// Wall-clock time, ns since the epoch.
    pub last_rx_ns: u64,
}

/// A lifetime event of one SA (`esp.expire`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SaExpiry {
    pub tunnel: String,
    pub spi_in: u32,
    /// false: soft (rekey now); true: hard (the SA is gone from the datapath).
    pub hard: bool,
    /// bytes, packets, time or seq_space.
    pub reason: String,
    /// Packets the SA carried in both directions since it was installed (0: idle, the
    /// `keepalive disable` test of a soft expiry). Added after the first schema-1 records:
    /// absent (0) in events from older espds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub packets: u64,
}

/// Outbound traffic that found no SA (`esp.acquire`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AcquireInfo {
    /// The phase1 whose TUN device the packet was routed to.
    pub phase1: String,
    /// The phase2 of that phase1 whose selectors hold the packet's addresses (first in
    /// configuration order); empty when none does.
    pub phase2: String,
    /// Inner source and destination of the latest such packet (IPv4 or IPv6 literals).
    pub src: String,
    pub dst: String,
    /// Packets dropped for want of an SA on this device since espd's previous `Acquire`
    /// for it.
    pub dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_names_round_trip() {
        for k in DaemonKind::DAEMONS {
            assert_eq!(DaemonKind::from_name(k.name()), Some(k));
            assert_eq!(DaemonKind::from_debug_app(k.debug_app()), Some(k));
            assert_eq!(k.name().parse::<DaemonKind>(), Ok(k));
            assert_eq!(k.debug_app().parse::<DaemonKind>(), Ok(k));
            assert_eq!(k.to_string(), k.name());
        }
        assert_eq!(DaemonKind::from_name("vpnctl"), Some(DaemonKind::Vpnctl));
        assert!("routed".parse::<DaemonKind>().is_err());
        assert_eq!(
            [
                DaemonKind::Ikemgr,
                DaemonKind::Dpdmon,
                DaemonKind::Hasyncd,
                DaemonKind::Espd
            ]
            .map(|k| k.debug_app()),
            ["ike", "dpd", "ha", "esp"]
        );
    }

    #[test]
    fn every_body_has_a_distinct_known_topic() {
        let bodies = crate::samples::bodies();
        let mut topics: Vec<&str> = bodies.iter().map(|b| b.topic()).collect();
        for t in &topics {
            assert!(topic::ALL.contains(t));
            assert!(t.is_ascii() && !t.starts_with('.') && !t.ends_with('.'));
        }
        topics.sort();
        topics.dedup();
        assert_eq!(topics.len(), bodies.len());
        assert_eq!(topic::ALL.len(), bodies.len());
    }

    #[test]
    fn state_ops_key_by_table_and_name() {
        let ops: Vec<Option<StateOp>> = crate::samples::bodies()
            .iter()
            .map(|b| b.state_op())
            .collect();
        assert_eq!(ops[0], None);
        assert_eq!(
            ops[1],
            Some(StateOp::Put {
                table: table::TUNNEL,
                key: "vpn1_1".into()
            })
        );
        assert_eq!(
            ops[2],
            Some(StateOp::Del {
                table: table::TUNNEL,
                key: "vpn1_1".into()
            })
        );
        assert_eq!(
            ops[8],
            Some(StateOp::Del {
                table: table::HA_MEMBER,
                key: "2".into()
            })
        );
    }
}
