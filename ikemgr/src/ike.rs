//! The sans-IO IKE manager: gateways built from the configuration, the `ike_proto::IkeSa`s
//! of every peer, and the translation of their events into bus bodies and route changes.
//!
//! What it does: routes each datagram to its IKE SA by our SPI (a first IKE_SA_INIT request
//! creates a responder SA for the dynamic gateway, or for the static gateway whose
//! `remote-gw` sent it), names dial-up instances `<phase1>_<n>`, publishes `Body::Tunnel`
//! (state up) and `Body::ChildSa` (inbound first, then outbound, then the removal of a
//! rekeyed predecessor), `ChildSaRemoved` / `TunnelRemoved` when SAs go, asks for routes to
//! the remote selectors through the phase1's TUN device (`add-route enable`), runs liveness
//! probes for dpdmon and batches activity marks. Static gateways with `auto-negotiate enable`
//! are initiated when the driver calls [`IkeManager::initiate_pending`].
//!
//! What it does not do: sockets, clocks, commands. The driver passes `now` with every call,
//! sends [`IkeManager::poll_transmit`], runs [`IkeManager::poll_route`] and publishes
//! [`IkeManager::drain_bodies`]. New IKE_SA_INIT requests pass ike-proto's `CookieGuard`
//! (default limits: COOKIEs above a half-open threshold, half-open SAs per source and in
//! total). Every phase2 of a phase1 is a CHILD SA policy of its IKE SAs (see
//! `ike_proto::sa::IkeConfig::more_children`); each CHILD SA is published with its phase2's
//! name. Not yet: HA snapshots.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_schema::schema::{ChildSaInfo as BusChild, EspEncap, IkeActivityMark, SaLifetime};
use bus_schema::{Body, DpdSettings, TunnelInfo, TunnelKind, TunnelState};
use haven_config::{
    AuthMethod as CfgAuth, Config, DpdBackoff, KeylifeType, NatTraversal as CfgNat, PeerType,
    Phase1, Phase1Type, Selector,
};
use haven_config::{DpdAction, MonitorAction};
use ike_proto::cert::{CertAuth, Credentials, TrustAnchors};
use ike_proto::cookie::{CookieGuard, DropReason, GuardConfig, Verdict};
use ike_proto::crypto::{Encr, Integ};
use ike_proto::proposal::{dhgrp_list, phase1_list, phase2_list};
use ike_proto::sa::{
    Accepted, Addresses, ChildPolicy, DeleteReason, Event, IkeConfig, IkeSa, OsEntropy,
};
use ike_proto::wire::{IdPayload, TrafficSelector};
use ike_proto::{IkeSaInfo, LivenessProbe, NatTraversal, Transmit};
use serde_json::{json, Value};

mod ha;
mod lifecycle;
mod traffic;

/// IKE header: SPIi (8), SPIr (8), next payload, version, exchange type, flags, message ID
/// (RFC 7296 §3.1).
const IKE_HEADER_LEN: usize = 28;
/// Exchange type IKE_SA_INIT (RFC 7296 §3.1).
const IKE_SA_INIT: u8 = 34;
/// Flags: the Response bit (RFC 7296 §3.1).
const FLAG_RESPONSE: u8 = 0x20;
/// Anti-replay window published for negotiated CHILD SAs (RFC 4303 §3.4.3).
const REPLAY_WINDOW: u32 = 2048;
/// Wait before a static gateway initiates again after its SA failed or went away.
const RETRY_DELAY: Duration = Duration::from_secs(5);

/// A route change for the driver (`ip route replace|del DEST dev DEV`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteOp {
    /// Route `dest` (a CIDR) through `dev`.
    Add {
        /// Destination prefix.
        dest: String,
        /// TUN device (the phase1 name).
        dev: String,
    },
    /// Remove that route.
    Del {
        /// Destination prefix.
        dest: String,
        /// TUN device.
        dev: String,
    },
}

/// One phase1 (+ its phase2s, each a CHILD SA policy) ready to negotiate.
#[derive(Clone)]
struct Gateway {
    name: String,
    dynamic: bool,
    remote_gw: Option<IpAddr>,
    local_gw: Option<IpAddr>,
    interface: String,
    /// Phase2 names by CHILD SA policy index (`ChildSaInfo::policy`).
    phase2s: Vec<String>,
    add_route: bool,
    initiate: bool,
    localid: Option<IdPayload>,
    cfg: Arc<IkeConfig>,
    dpd: DpdSettings,
    /// How long an unanswered DPD probe waits for dpdmon's next retry ([`liveness_hold`]).
    dpd_hold: Duration,
    /// Phase2 volume limit in bytes (`keylife-type kbs|both`), enforced by espd.
    child_bytes: Option<u64>,
    /// Whether the phase2 has a time limit (`keylife-type seconds|both`).
    child_timed: bool,
    /// Every `remote-gw` (`remote-gw6` with `ip-version 6`), in order (backup peers;
    /// [`lifecycle`]).
    peers: Vec<IpAddr>,
    /// `passive-mode enable`: never initiates.
    passive: bool,
    /// `dpd-action` in force ([`lifecycle::dpd_action_of`]).
    dpd_action: DpdAction,
    /// `monitor`: the primary phase1 this one backs up.
    monitor: Option<String>,
    /// Per phase2 (CHILD SA policy index), the knobs of seed 002 ([`traffic`]).
    p2: Vec<traffic::Phase2Knobs>,
    /// `tunnel-monitor-action` in force (`None`: no tunnel monitor).
    monitor_action: Option<MonitorAction>,
    /// `remote-gw-preempt-interval`: how often a later `remote-gw` tries the earlier ones
    /// (`None`: 0, or a single peer).
    preempt: Option<Duration>,
    /// A dial-up phase1 synced between FGSP members (`fgsp-sync enable`): this member's
    /// `group-member-id`, whose class of instance numbers it names new instances from
    /// ([`FGSP_NAME_STRIDE`]).
    name_class: Option<u8>,
}

/// FGSP members name the new instances of a synced dial-up phase1 from disjoint classes of
/// numbers, so two members establishing tunnels at the same moment never pick the same
/// name: member `m` (`group-member-id`, 0..=15) takes the numbers `n` with `n % 16 == m`
/// (member 1: `vpn1_1`, `vpn1_17`, ...; member 2: `vpn1_2`, ...; member 0: `vpn1_16`,
/// ...), as seed 000 shows member 1's first instance `vpn1_1` (`index=1`). A tunnel taken
/// over keeps its name.
pub(crate) const FGSP_NAME_STRIDE: u32 = 16;

struct Entry {
    gateway: String,
    /// Tunnel instance name (`vpn1_1` for dial-up, the phase1 name for static).
    name: String,
    /// Serial shown in debug lines (`ike 0:vpn1_1:<serial>: …`).
    serial: u64,
    /// Boxed: the SA map is a B-tree of entries filled in serial order, whose leaves stay
    /// about half full, so every inline byte counted about twice.
    sa: Box<IkeSa>,
    info: Option<IkeSaInfo>,
    /// Published CHILD SAs by inbound SPI (boxed: a B-tree leaf holds eleven values, so
    /// with the records inline the usual one or two CHILD SAs took a 3.5 KB node).
    children: BTreeMap<u32, Box<BusChild>>,
    /// Routes currently asked for.
    routes: Vec<String>,
    activity_reported: Option<Instant>,
    /// Source counted as half-open by the COOKIE guard until established or gone.
    half_open: Option<IpAddr>,
    /// Outstanding dpdmon probe: (round, message ID).
    probe: Option<(u64, u32)>,
    created: Instant,
    /// The tunnel monitor declared the tunnel down (`wait-recover`): its routes are
    /// withdrawn until it answers again (`routes` still lists them).
    withdrawn: bool,
}

/// Everything about the IKE SAs of this gateway.
pub struct IkeManager {
    /// Shared (`Arc`): an SA's events look their gateway up, several times per setup.
    gateways: BTreeMap<String, Arc<Gateway>>,
    sas: BTreeMap<u64, Entry>,
    by_spi: HashMap<u64, u64>,
    next_serial: u64,
    transmits: VecDeque<Transmit>,
    routes: VecDeque<RouteOp>,
    bodies: Vec<Body>,
    /// Half-open limits and COOKIEs (RFC 7296 §2.6), made with the first request.
    guard: Option<CookieGuard>,
    /// Static gateways: earliest next initiation.
    retry_at: BTreeMap<String, Instant>,
    /// Datagrams dropped, by reason (`ikemgr_drops_total`, ops/ATTACKS.md).
    drops: BTreeMap<&'static str, u64>,
    /// Datagrams the driver could not send, by reason (`ikemgr_send_errors_total`).
    send_errors: BTreeMap<&'static str, u64>,
    /// Static gateways the operator brought up (`execute vpn ipsec tunnel up`): initiated
    /// like `auto-negotiate enable` until `tunnel down`.
    wanted: std::collections::BTreeSet<String>,
    /// Certificates for `authmethod signature` (see [`IkeManager::set_cert_store`]).
    certs: CertStore,
    /// HA role, published IKE SA records, takeovers ([`ha`]).
    ha: ha::HaState,
    /// Each SA's next timer, ordered, so timers cost O(log n) with many SAs.
    timers: std::collections::BTreeSet<(Instant, u64)>,
    /// The entry of each SA in `timers`.
    timer_of: HashMap<u64, Instant>,
    /// Per (gateway, local address) IKE SA policy, rebuilt with the configuration.
    sa_configs: HashMap<(String, IpAddr), Arc<IkeConfig>>,
    /// Backoff, holds after dead verdicts, backup peers ([`lifecycle`]).
    life: lifecycle::Lifecycle,
    /// Traffic-triggered negotiation: kept routes, requested CHILD SAs ([`traffic`]).
    traffic: traffic::Traffic,
    /// Dial-up instance numbers in use per phase1 (`vpn1_<n>`), so naming a new instance
    /// costs O(log n) instead of a scan of every SA.
    numbers: HashMap<String, InstanceNumbers>,
    /// Every SA by (peer's IKE SPI, peer address) at creation, so a retransmitted first
    /// IKE_SA_INIT finds its SA without a scan of every SA.
    by_peer_spi: HashMap<(u64, IpAddr), u64>,
}

/// The instance numbers of one dial-up phase1: every number up to `top` is in use unless
/// it is in `free`; none above `top` is. The lowest free number is handed out first.
#[derive(Default)]
struct InstanceNumbers {
    top: u32,
    free: std::collections::BTreeSet<u32>,
}

impl InstanceNumbers {
    /// The lowest free number `ok` accepts, now taken. Bounded when `ok` refuses finitely
    /// many numbers in a row above `top`.
    fn take_lowest_where(&mut self, ok: impl Fn(u32) -> bool) -> u32 {
        if let Some(n) = self.free.iter().copied().find(|n| ok(*n)) {
            self.free.remove(&n);
            return n;
        }
        let mut n = self.top.saturating_add(1);
        while !ok(n) && n < u32::MAX {
            n += 1;
        }
        self.take(n);
        n
    }

    /// Marks `n` taken (an instance named elsewhere, e.g. by an HA takeover).
    fn take(&mut self, n: u32) {
        if n > self.top {
            // Bounded by n: the numbers skipped become free.
            self.free.extend(self.top.saturating_add(1)..n);
            self.top = n;
        } else {
            self.free.remove(&n);
        }
    }

    /// Gives `n` back.
    fn release(&mut self, n: u32) {
        if n == 0 || n > self.top {
            return;
        }
        if n < self.top {
            self.free.insert(n);
            return;
        }
        self.top -= 1;
        while self.top > 0 && self.free.remove(&self.top) {
            self.top -= 1;
        }
    }
}

/// The instance number of dial-up instance `name` of phase1 `gateway` (`vpn1_3` -> 3).
fn instance_number(gateway: &str, name: &str) -> Option<u32> {
    name.strip_prefix(gateway)?
        .strip_prefix('_')?
        .parse()
        .ok()
        .filter(|n| *n > 0)
}

/// Certificate material for `authmethod signature` phase1s, read by the driver (this
/// module reads no files): PEM of each named local certificate (leaf first, then
/// intermediates) and its key, every trusted CA, and a wall-clock anchor for validity checks.
#[derive(Clone, Default)]
pub struct CertStore {
    /// `certificate` name -> (certificate PEM, private key PEM).
    pub local: BTreeMap<String, (Vec<u8>, Vec<u8>)>,
    /// Trusted CA certificates, PEM, concatenated.
    pub ca_pem: Vec<u8>,
    /// An instant and the Unix time (seconds) at that instant.
    pub anchor: Option<(Instant, i64)>,
}

/// What an operator command did (`execute vpn ipsec tunnel up|down|rekey`, `ike rekey`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CommandOutcome {
    /// IKE SAs the command starts (initiations queued).
    pub initiated: usize,
    /// Exchanges queued on existing IKE SAs (CREATE_CHILD_SA, rekeys, deletes).
    pub requested: usize,
    /// CHILD SAs or IKE SAs that were already in the asked state.
    pub unchanged: usize,
}

fn spelling<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn id_of(text: &str) -> IdPayload {
    match text.parse::<IpAddr>() {
        Ok(ip) => IdPayload::from_ip(ip),
        Err(_) => IdPayload::fqdn(text),
    }
}

fn selector(s: &Selector) -> TrafficSelector {
    match s {
        Selector::Subnet(n) => TrafficSelector::subnet(IpAddr::V4(n.addr), n.prefix_len),
        Selector::Range { start, end } => {
            TrafficSelector::range(IpAddr::V4(*start), IpAddr::V4(*end))
        }
        Selector::Ip(a) => TrafficSelector::subnet(IpAddr::V4(*a), 32),
        Selector::Subnet6 { addr, prefix_len } => {
            TrafficSelector::subnet(IpAddr::V6(*addr), *prefix_len)
        }
    }
}

/// The CIDR prefixes covering an IPv4 address range (largest aligned blocks first).
pub fn range_to_cidrs(start: Ipv4Addr, end: Ipv4Addr) -> Vec<String> {
    let (mut s, e) = (u64::from(u32::from(start)), u64::from(u32::from(end)));
    let mut out = Vec::new();
    while s <= e {
        // The largest block aligned at s that fits in s..=e.
        let mut size: u64 = if s == 0 {
            1 << 32
        } else {
            s & s.wrapping_neg()
        };
        while s + size - 1 > e {
            size >>= 1;
        }
        let prefix = 32 - size.trailing_zeros();
        // s < 2^32 by the loop condition (e < 2^32).
        out.push(format!("{}/{}", Ipv4Addr::from(s as u32), prefix));
        s += size;
    }
    out
}

/// The CIDR prefixes covering an IPv6 address range (largest aligned blocks first).
pub fn range6_to_cidrs(start: Ipv6Addr, end: Ipv6Addr) -> Vec<String> {
    let (mut s, e) = (u128::from(start), u128::from(end));
    if s == 0 && e == u128::MAX {
        return vec!["::/0".into()];
    }
    let mut out = Vec::new();
    while s <= e {
        // The largest block aligned at s that fits in s..=e (an aligned block of 2^bits
        // addresses never runs past u128::MAX, so the sum cannot overflow).
        let mut bits = s.trailing_zeros().min(127);
        while bits > 0 && s + ((1u128 << bits) - 1) > e {
            bits -= 1;
        }
        out.push(format!("{}/{}", Ipv6Addr::from(s), 128 - bits));
        match s.checked_add(1u128 << bits) {
            Some(n) => s = n,
            None => break,
        }
    }
    out
}

fn ts_cidrs(ts: &[TrafficSelector]) -> Vec<String> {
    ts.iter()
        .filter_map(|t| t.addr_range())
        .flat_map(|r| match r {
            (IpAddr::V4(a), IpAddr::V4(b)) => range_to_cidrs(a, b),
            (IpAddr::V6(a), IpAddr::V6(b)) => range6_to_cidrs(a, b),
            _ => Vec::new(),
        })
        .collect()
}

/// esp-proto's transform name for negotiated ESP algorithms.
pub fn transform_name(encr: Encr, integ: Option<Integ>) -> Option<String> {
    let cipher = match encr {
        Encr::AesGcm16(16) => return integ.is_none().then(|| "aes128gcm".into()),
        Encr::AesGcm16(32) => return integ.is_none().then(|| "aes256gcm".into()),
        Encr::ChaCha20Poly1305 => return integ.is_none().then(|| "chacha20poly1305".into()),
        Encr::AesCbc(16) => "aes128",
        Encr::AesCbc(32) => "aes256",
        _ => return None,
    };
    let hash = match integ? {
        Integ::HmacSha1_96 => "sha1",
        Integ::HmacSha256_128 => "sha256",
        Integ::HmacSha512_256 => "sha512",
        Integ::HmacSha384_192 => return None,
    };
    Some(format!("{cipher}-{hash}"))
}

/// FortiOS spelling of a negotiated IKE proposal (`aes128gcm-prfsha256`, `aes256-sha512`).
fn ike_proposal_name(s: &ike_proto::proposal::IkeSuite) -> String {
    let prf = format!("{:?}", s.prf).to_lowercase();
    let hash = ["sha512", "sha384", "sha256", "sha1"]
        .into_iter()
        .find(|h| prf.contains(h))
        .unwrap_or("sha256");
    match s.encr {
        Encr::AesGcm16(n) => format!("aes{}gcm-prf{hash}", n * 8),
        Encr::ChaCha20Poly1305 => format!("chacha20poly1305-prf{hash}"),
        Encr::AesCbc(n) => format!("aes{}-{hash}", n * 8),
    }
}

fn encr_label(encr: Encr) -> String {
    match encr {
        Encr::AesCbc(n) => format!("aes-cbc-{}", n * 8),
        Encr::AesGcm16(n) => format!("aes-gcm-{}", n * 8),
        Encr::ChaCha20Poly1305 => "chacha20poly1305".into(),
    }
}

/// Builds the gateway of one phase1, or says why it cannot negotiate.
fn gateway_of(
    config: &Config,
    p: &Phase1,
    certs: &CertStore,
    now: Instant,
) -> Result<Gateway, String> {
    let join = |v: &[haven_config::Proposal]| {
        v.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let groups = |v: &[u16]| {
        v.iter()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let cert = match p.authmethod {
        CfgAuth::Psk => None,
        CfgAuth::Signature => Some(Arc::new(cert_auth_of(p, certs, now)?)),
    };
    let psk = match (&p.psksecret, &cert) {
        (Some(k), _) => k.expose_bytes().to_vec(),
        (None, Some(_)) => Vec::new(),
        (None, None) => return Err(format!("{}: no psksecret", p.name)),
    };
    let all_p2: Vec<_> = config.phase2_for(&p.name).collect();
    let p2 = all_p2.first().copied();
    let mut c = IkeConfig::psk(&psk, IdPayload::fqdn(""));
    c.cert = cert;
    c.ike_proposals = phase1_list(&join(&p.proposal)).map_err(|e| format!("{}: {e}", p.name))?;
    c.ike_groups = dhgrp_list(&groups(&p.dhgrp)).map_err(|e| format!("{}: {e}", p.name))?;
    c.ike_lifetime = Duration::from_secs(u64::from(p.keylife));
    c.peer_id = match (p.peertype, &p.peerid) {
        (PeerType::One, Some(id)) => Some(id_of(id)),
        _ => None,
    };
    c.nat_traversal = match p.nattraversal {
        CfgNat::Enable => NatTraversal::Enable,
        CfgNat::Disable => NatTraversal::Disable,
        CfgNat::Forced => NatTraversal::Forced,
    };
    if let Some(p2) = p2 {
        c.esp_proposals =
            phase2_list(&join(&p2.proposal)).map_err(|e| format!("{}: {e}", p2.name))?;
        c.pfs_groups = if p2.pfs {
            dhgrp_list(&groups(&p2.dhgrp)).map_err(|e| format!("{}: {e}", p2.name))?
        } else {
            Vec::new()
        };
        c.child_lifetime = match p2.keylife_type {
            // No time limit: a lifetime no SA reaches (ten years).
            KeylifeType::Kbs => Duration::from_secs(10 * 365 * 86_400),
            KeylifeType::Seconds | KeylifeType::Both => {
                Duration::from_secs(u64::from(p2.keylifeseconds))
            }
        };
        c.local_ts = vec![selector(&p2.src)];
        c.remote_ts = vec![selector(&p2.dst)];
    }
    let child_bytes = p2
        .filter(|p2| p2.keylife_type != KeylifeType::Seconds)
        .map(|p2| u64::from(p2.keylifekbs) * 1024);
    let child_timed = p2.is_none_or(|p2| p2.keylife_type != KeylifeType::Kbs);
    for p2 in all_p2.iter().skip(1) {
        c.more_children.push(ChildPolicy {
            esp_proposals: phase2_list(&join(&p2.proposal))
                .map_err(|e| format!("{}: {e}", p2.name))?,
            pfs_groups: if p2.pfs {
                dhgrp_list(&groups(&p2.dhgrp)).map_err(|e| format!("{}: {e}", p2.name))?
            } else {
                Vec::new()
            },
            local_ts: vec![selector(&p2.src)],
            remote_ts: vec![selector(&p2.dst)],
            lifetime: Duration::from_secs(u64::from(p2.keylifeseconds)),
        });
    }
    let p2_knobs = traffic::knobs_of(&all_p2);
    c.driver_rekeys = p2_knobs
        .iter()
        .enumerate()
        .filter(|(_, k)| !k.keepalive)
        .map(|(i, _)| i)
        .collect();
    // Rekey margins scaled for short lifetimes (the minimum keylife is 120 s).
    let shortest = c
        .more_children
        .iter()
        .map(|p| p.lifetime)
        .fold(c.child_lifetime.min(c.ike_lifetime), Duration::min);
    c.rekey_margin = Duration::from_secs(30).min(shortest / 4);
    c.rekey_jitter = Duration::from_secs(10).min(shortest / 12);
    Ok(Gateway {
        name: p.name.clone(),
        dynamic: p.kind == Phase1Type::Dynamic,
        remote_gw: p.remote_addrs().first().copied(),
        local_gw: p.local_addr().filter(|a| !a.is_unspecified()),
        interface: p.interface.clone(),
        phase2s: if all_p2.is_empty() {
            vec![p.name.clone()]
        } else {
            all_p2.iter().map(|p| p.name.clone()).collect()
        },
        add_route: p.add_route,
        initiate: p.kind != Phase1Type::Dynamic && p.auto_negotiate && !p.passive_mode,
        localid: p.localid.as_deref().filter(|s| !s.is_empty()).map(id_of),
        cfg: Arc::new(c),
        dpd: DpdSettings {
            mode: spelling(&p.dpd),
            retry_count: u32::from(p.dpd_retrycount),
            retry_interval_ms: u64::from(p.dpd_retryinterval_ms),
        },
        dpd_hold: liveness_hold(p),
        child_bytes,
        child_timed,
        peers: p.remote_addrs(),
        passive: p.passive_mode,
        dpd_action: lifecycle::dpd_action_of(p),
        monitor: p.monitor.clone().filter(|m| !m.is_empty()),
        p2: p2_knobs,
        monitor_action: haven_config::tunnel_monitor_action(config, p),
        preempt: (p.remote_gw_preempt_interval > 0 && p.remote_addrs().len() > 1)
            .then(|| Duration::from_secs(u64::from(p.remote_gw_preempt_interval))),
        name_class: config
            .standalone
            .as_ref()
            .filter(|_| p.kind == Phase1Type::Dynamic && p.fgsp_sync)
            .map(|sc| sc.group_member_id),
    })
}

/// How long an unanswered DPD probe keeps the IKE window waiting for dpdmon's next
/// transmission of it (ike-proto's `probe_liveness`): twice the longest wait between two
/// of dpdmon's transmissions, at least three minutes. If no retry comes by then (dpdmon
/// is gone), the probe is abandoned and reported `timeout`; a later request starts a new one.
pub fn liveness_hold(p: &Phase1) -> Duration {
    let mut longest = u64::from(p.dpd_retryinterval_ms);
    if p.dpd_backoff == DpdBackoff::Exponential {
        longest = longest.max(u64::from(p.dpd_backoff_max_ms));
    }
    Duration::from_millis(longest.saturating_mul(2)).max(Duration::from_secs(180))
}

/// The `tunnel.state` record of tunnel `name` of gateway `g`, up over `addrs` (a new IKE
/// SA, or one taken over from another cluster member).
fn tunnel_up_record(g: &Gateway, name: &str, addrs: &Addresses) -> TunnelInfo {
    TunnelInfo {
        name: name.to_string(),
        phase1: g.name.clone(),
        kind: if g.dynamic {
            TunnelKind::DialupInstance
        } else {
            TunnelKind::Static
        },
        local_gw: Some(addrs.local.ip().to_string()),
        remote_gw: Some(addrs.remote.ip().to_string()),
        interface: Some(g.interface.clone()).filter(|s| !s.is_empty()),
        state: TunnelState::Up,
        phase2: g.phase2s.clone(),
        dpd: g.dpd.clone(),
    }
}

/// Our certificate (`certificate`: the first name) and the trusted CAs of a phase1 with
/// `authmethod signature`.
fn cert_auth_of(p: &Phase1, certs: &CertStore, now: Instant) -> Result<CertAuth, String> {
    let name = p
        .certificate
        .first()
        .ok_or_else(|| format!("{}: authmethod signature without certificate", p.name))?;
    let (cert_pem, key_pem) = certs
        .local
        .get(name)
        .ok_or_else(|| format!("{}: certificate {name:?} is not loaded", p.name))?;
    let local = Credentials::from_pem(cert_pem, key_pem)
        .map_err(|e| format!("{}: certificate {name:?}: {e}", p.name))?;
    let anchor = certs
        .anchor
        .ok_or_else(|| format!("{}: no wall clock for certificate validity", p.name))?;
    let _ = now;
    let trust = TrustAnchors::from_pem(&certs.ca_pem, anchor)
        .map_err(|e| format!("{}: CA certificates: {e}", p.name))?;
    if trust.is_empty() {
        return Err(format!(
            "{}: authmethod signature but no trusted CA certificate",
            p.name
        ));
    }
    Ok(CertAuth { local, trust })
}

impl Default for IkeManager {
    fn default() -> Self {
        IkeManager::new()
    }
}

impl IkeManager {
    /// An empty manager (no gateways).
    pub fn new() -> IkeManager {
        IkeManager {
            gateways: BTreeMap::new(),
            sas: BTreeMap::new(),
            by_spi: HashMap::new(),
            next_serial: 1,
            transmits: VecDeque::new(),
            routes: VecDeque::new(),
            bodies: Vec::new(),
            retry_at: BTreeMap::new(),
            guard: None,
            drops: BTreeMap::new(),
            send_errors: BTreeMap::new(),
            wanted: Default::default(),
            certs: CertStore::default(),
            ha: ha::HaState::default(),
            timers: Default::default(),
            timer_of: HashMap::new(),
            sa_configs: HashMap::new(),
            life: lifecycle::Lifecycle::default(),
            traffic: traffic::Traffic::default(),
            numbers: HashMap::new(),
            by_peer_spi: HashMap::new(),
        }
    }

    /// True when any phase1 is configured (the driver opens UDP 500 only then).
    pub fn has_gateways(&self) -> bool {
        !self.gateways.is_empty()
    }

    /// Certificates and CAs for the next [`IkeManager::set_config`].
    pub fn set_cert_store(&mut self, store: CertStore) {
        self.certs = store;
    }

    /// Applies a configuration: rebuilds the gateways; SAs of removed phase1s are deleted.
    pub fn set_config(&mut self, now: Instant, config: &Config) {
        let mut gws = BTreeMap::new();
        for p in &config.phase1 {
            match gateway_of(config, p, &self.certs, now) {
                Ok(g) => {
                    gws.insert(g.name.clone(), Arc::new(g));
                }
                Err(e) => tracing::warn!("ike: phase1 {e}; it will not negotiate"),
            }
        }
        self.gateways = gws;
        self.sa_configs.clear();
        self.life_retain();
        self.traffic_config();
        let orphans: Vec<u64> = self
            .sas
            .iter()
            .filter(|(_, e)| !self.gateways.contains_key(&e.gateway))
            .map(|(k, _)| *k)
            .collect();
        for id in orphans {
            if let Some(e) = self.sas.get_mut(&id) {
                let _ = e.sa.delete(now);
            }
            self.flush(id, now, "phase1 removed");
        }
    }

    /// Static gateways that should have an IKE SA and have none: (gateway, remote, local
    /// address if configured). The driver resolves the local address and calls
    /// [`IkeManager::initiate`].
    pub fn initiate_pending(&self, now: Instant) -> Vec<(String, IpAddr, Option<IpAddr>)> {
        self.gateways
            .values()
            .filter(|g| {
                (g.initiate || self.wanted.contains(&g.name) || self.traffic_wants(&g.name))
                    && !self.ha.standby()
            })
            .filter(|g| !self.sas.values().any(|e| e.gateway == g.name))
            .filter(|g| self.retry_at.get(&g.name).is_none_or(|t| *t <= now))
            .filter(|g| self.life_may_initiate(g))
            .filter_map(|g| {
                self.life
                    .peer_of(g)
                    .map(|r| (g.name.clone(), r, g.local_gw))
            })
            .chain(self.preempt_pending(now))
            .collect()
    }

    /// The gateway's policy with our ID for `local`, shared by all SAs of that gateway and
    /// address (one copy, not one per SA).
    fn per_sa_config(&mut self, g: &Gateway, local: IpAddr) -> Arc<IkeConfig> {
        let key = (g.name.clone(), local);
        if let Some(c) = self.sa_configs.get(&key) {
            return c.clone();
        }
        let mut c = (*g.cfg).clone();
        c.local_id = g
            .localid
            .clone()
            .unwrap_or_else(|| IdPayload::from_ip(local));
        let c = Arc::new(c);
        self.sa_configs.insert(key, c.clone());
        c
    }

    /// The name of a new instance of `g`: the phase1 name for a static gateway, else
    /// `<phase1>_<n>` with the lowest free n (now taken).
    fn instance_name(&mut self, g: &Gateway) -> String {
        if !g.dynamic {
            return g.name.clone();
        }
        // Numbers other members' tunnels hold (hasyncd's `standby` roles) are skipped, and
        // with FGSP those outside this member's class: at most
        // `FGSP_NAME_STRIDE * (reserved.len() + 1)` numbers above the top.
        let ha = &self.ha;
        let ok = |n: u32| {
            g.name_class
                .is_none_or(|m| n % FGSP_NAME_STRIDE == u32::from(m) % FGSP_NAME_STRIDE)
                && !ha.reserved(&format!("{}_{n}", g.name))
        };
        let n = self
            .numbers
            .entry(g.name.clone())
            .or_default()
            .take_lowest_where(ok);
        format!("{}_{n}", g.name)
    }

    /// Records that an instance of `gateway` is called `name` (named outside
    /// [`IkeManager::instance_name`], e.g. by an HA takeover), so its number is not handed out.
    fn note_instance_name(&mut self, gateway: &str, name: &str) {
        if let Some(n) = instance_number(gateway, name) {
            self.numbers.entry(gateway.to_string()).or_default().take(n);
        }
    }

    fn insert(
        &mut self,
        gateway: &Gateway,
        sa: Box<IkeSa>,
        now: Instant,
        half_open: Option<IpAddr>,
    ) -> u64 {
        let serial = self.next_serial;
        self.next_serial += 1;
        for spi in sa.local_spis() {
            self.by_spi.insert(spi, serial);
        }
        let name = if gateway.dynamic {
            // Named when established (a refused peer must not take a number).
            String::new()
        } else {
            gateway.name.clone()
        };
        self.sas.insert(
            serial,
            Entry {
                gateway: gateway.name.clone(),
                name,
                serial,
                sa,
                info: None,
                children: BTreeMap::new(),
                routes: Vec::new(),
                activity_reported: None,
                half_open,
                probe: None,
                created: now,
                withdrawn: false,
            },
        );
        self.pump(serial, now);
        serial
    }

    /// The SA our SPI `spi` belongs to; a stale entry (its SA is gone) is removed.
    fn spi_owner(&mut self, spi: u64) -> Option<u64> {
        let id = *self.by_spi.get(&spi)?;
        if self.sas.contains_key(&id) {
            return Some(id);
        }
        self.by_spi.remove(&spi);
        None
    }

    fn half_open_done(&mut self, id: u64) {
        let ip = self.sas.get_mut(&id).and_then(|e| e.half_open.take());
        if let (Some(ip), Some(guard)) = (ip, self.guard.as_mut()) {
            guard.half_open_finished(ip);
        }
    }

    /// Starts the IKE SA of static gateway `gateway` from `local` to `remote` (port 500).
    pub fn initiate(&mut self, now: Instant, gateway: &str, local: IpAddr, remote: IpAddr) {
        let Some(g) = self.gateways.get(gateway).cloned() else {
            return;
        };
        self.retry_at.insert(g.name.clone(), now + RETRY_DELAY);
        let addrs = Addresses {
            local: SocketAddr::new(local, 500),
            remote: SocketAddr::new(remote, 500),
        };
        match IkeSa::initiate(
            now,
            self.per_sa_config(&g, local),
            addrs,
            Box::new(OsEntropy),
        ) {
            Ok(sa) => {
                let trial = self
                    .sas
                    .values()
                    .any(|e| e.gateway == g.name && e.sa.is_established());
                let id = self.insert(&g, Box::new(sa), now, None);
                self.life_initiated(id, trial);
                self.traffic_initiated(id, &g.name);
                tracing::debug!("ike 0:{}:{id}: initiating IKE SA to {remote}", g.name);
            }
            Err(e) => tracing::warn!("ike 0:{}: cannot initiate: {e}", g.name),
        }
    }

    fn gateway_for_new_peer(&self, remote: IpAddr) -> Option<Arc<Gateway>> {
        let by_remote = self
            .gateways
            .values()
            .find(|g| !g.dynamic && g.peers.contains(&remote));
        by_remote
            .or_else(|| self.gateways.values().find(|g| g.dynamic))
            .cloned()
    }

    /// One IKE datagram (without the non-ESP marker) that arrived at `local` from `remote`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        d: &[u8],
    ) {
        let Some(hdr) = d.get(..IKE_HEADER_LEN) else {
            self.count_drop("truncated");
            return;
        };
        let mut spi_i = [0u8; 8];
        let mut spi_r = [0u8; 8];
        spi_i.copy_from_slice(hdr.get(..8).unwrap_or(&[0; 8]));
        spi_r.copy_from_slice(hdr.get(8..16).unwrap_or(&[0; 8]));
        let (spi_i, spi_r) = (u64::from_be_bytes(spi_i), u64::from_be_bytes(spi_r));
        let exchange = hdr.get(18).copied().unwrap_or(0);
        let flags = hdr.get(19).copied().unwrap_or(0);
        let path = Addresses { local, remote };
        let existing = [spi_r, spi_i]
            .iter()
            .filter(|s| **s != 0)
            .find_map(|s| self.spi_owner(*s))
            .or_else(|| {
                // A retransmitted first IKE_SA_INIT: same initiator SPI and source.
                (spi_r == 0).then(|| {
                    self.by_peer_spi
                        .get(&(spi_i, remote.ip()))
                        .copied()
                        .filter(|id| {
                            self.sas.get(id).is_some_and(|e| {
                                e.sa.spis().0 == spi_i
                                    && e.sa.addresses().remote.ip() == remote.ip()
                            })
                        })
                })?
            });
        if let Some(id) = existing {
            if let Some(e) = self.sas.get_mut(&id) {
                if let Err(err) = e.sa.handle_datagram(now, path, d) {
                    *self.drops.entry(err.kind()).or_insert(0) += 1;
                    tracing::debug!(
                        "ike 0:{}:{id}: datagram from {remote} dropped: {err}",
                        e.name
                    );
                }
            }
            self.pump(id, now);
            return;
        }
        if spi_r != 0 || exchange != IKE_SA_INIT || flags & FLAG_RESPONSE != 0 {
            self.count_drop("no_sa");
            if spi_r != 0 && flags & FLAG_RESPONSE == 0 {
                // FGSP: hasyncd may hold a standby copy of this IKE SA (ike::ha).
                self.ha.note_unknown_request(spi_i, spi_r);
            }
            tracing::debug!(
                "ike 0: comes {remote}->{local}: no IKE SA for {spi_i:016x}/{spi_r:016x}, dropped"
            );
            return;
        }
        if self.ha.standby() {
            tracing::debug!("ike 0: comes {remote}->{local}: HA standby, new IKE SA refused");
            return;
        }
        let Some(g) = self.gateway_for_new_peer(remote.ip()) else {
            self.count_drop("no_gateway");
            tracing::debug!("ike 0: comes {remote}->{local}: no gateway for this peer");
            return;
        };
        tracing::debug!(
            "ike 0: comes {remote}->{local}, IKE_SA_INIT for gateway {}",
            g.name
        );
        if self.guard.is_none() {
            match CookieGuard::new(now, GuardConfig::default(), &mut OsEntropy) {
                Ok(guard) => self.guard = Some(guard),
                Err(e) => {
                    tracing::warn!("ike 0: no COOKIE secret, request dropped: {e}");
                    return;
                }
            }
        }
        if let Some(guard) = self.guard.as_mut() {
            match guard.check(now, remote, d, &mut OsEntropy) {
                Verdict::Accept => {}
                Verdict::Reply(payload) => {
                    tracing::debug!("ike 0: asking {remote} for a COOKIE");
                    self.transmits.push_back(Transmit {
                        source: local,
                        destination: remote,
                        payload,
                    });
                    return;
                }
                Verdict::Drop(why) => {
                    self.count_drop(match why {
                        DropReason::Malformed => "decode",
                        DropReason::PerSourceLimit => "half_open_per_source",
                        DropReason::GlobalLimit => "half_open_global",
                    });
                    tracing::debug!("ike 0: IKE_SA_INIT from {remote} dropped: {why:?}");
                    return;
                }
            }
        }
        match IkeSa::accept(
            now,
            self.per_sa_config(&g, local.ip()),
            path,
            Box::new(OsEntropy),
            d,
        ) {
            Ok(Accepted::Sa(sa)) => {
                if let Some(guard) = self.guard.as_mut() {
                    guard.half_open_started(remote.ip());
                }
                let id = self.insert(&g, sa, now, Some(remote.ip()));
                if self.sas.contains_key(&id) {
                    self.by_peer_spi.insert((spi_i, remote.ip()), id);
                }
            }
            Ok(Accepted::Reply(t)) => self.transmits.push_back(t),
            Err(e) => {
                self.count_drop(e.kind());
                tracing::debug!("ike 0:{}: IKE_SA_INIT from {remote} refused: {e}", g.name)
            }
        }
    }

    /// The driver could not send `t` (`reason`: `unreachable` when the kernel has no route
    /// to the peer, `refused` when a firewall refused it, else `other`). Counted. When `t`
    /// was a half-open SA's IKE_SA_INIT response, that SA is dropped at once: the peer
    /// never heard of it, and it would hold one of the source's half-open slots (RFC 7296
    /// §2.6 limits, [`GuardConfig`]) until it expires, so that once the route is back the
    /// peer's next attempts would still be refused for up to a minute. Returns whether an
    /// SA was dropped.
    pub fn send_failed(&mut self, now: Instant, t: &Transmit, reason: &'static str) -> bool {
        *self.send_errors.entry(reason).or_insert(0) += 1;
        let Some(hdr) = t.payload.get(..IKE_HEADER_LEN) else {
            return false;
        };
        let exchange = hdr.get(18).copied().unwrap_or(0);
        let flags = hdr.get(19).copied().unwrap_or(0);
        if exchange != IKE_SA_INIT || flags & FLAG_RESPONSE == 0 {
            return false;
        }
        let mut spi_r = [0u8; 8];
        spi_r.copy_from_slice(hdr.get(8..16).unwrap_or(&[0; 8]));
        let spi_r = u64::from_be_bytes(spi_r);
        let Some(id) = (spi_r != 0).then(|| self.spi_owner(spi_r)).flatten() else {
            return false;
        };
        let half_open = self
            .sas
            .get(&id)
            .is_some_and(|e| e.half_open.is_some() && e.info.is_none());
        if !half_open {
            return false;
        }
        tracing::info!(
            "ike 0: IKE_SA_INIT response to {} not sent ({reason}): half-open IKE SA dropped",
            t.destination
        );
        self.flush(id, now, "response not sent");
        true
    }

    /// Datagrams the driver could not send, by reason (`ikemgr_send_errors_total`).
    pub fn send_errors(&self) -> &BTreeMap<&'static str, u64> {
        &self.send_errors
    }

    fn count_drop(&mut self, reason: &'static str) {
        *self.drops.entry(reason).or_insert(0) += 1;
    }

    /// Datagrams dropped so far, by reason: `truncated`, `no_sa`, `no_gateway`,
    /// `half_open_per_source`, `half_open_global`, and the SA layer's
    /// [`ike_proto::IkeError::kind`] labels (`decode`, `integrity`, `message_id`, ...).
    pub fn drops(&self) -> &BTreeMap<&'static str, u64> {
        &self.drops
    }

    /// (half-open SAs now, COOKIE requests sent, requests with a wrong cookie).
    pub fn cookie_stats(&self) -> (usize, u64, u64) {
        self.guard.as_ref().map_or((0, 0, 0), |g| {
            let s = g.stats();
            (g.half_open(), s.cookies_sent, s.cookies_invalid)
        })
    }

    /// Drives timers of every SA.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<u64> = self
            .timers
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, id)| *id)
            .collect();
        for id in due {
            if let Some(e) = self.sas.get_mut(&id) {
                e.sa.handle_timeout(now);
            }
            self.pump(id, now);
        }
        if self.mid_mark_deadline().is_some_and(|d| d <= now) {
            self.mid_mark_timers(now);
        }
    }

    /// Earliest timer of any SA.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let sa = self.timers.first().map(|(t, _)| *t);
        let retry = self
            .gateways
            .values()
            .filter(|g| g.initiate || self.wanted.contains(&g.name))
            .filter_map(|g| self.retry_at.get(&g.name))
            .min()
            .copied();
        // Pre-emption trials are not timers: the driver asks `initiate_pending` at least
        // every 500 ms.
        [sa, retry, self.mid_mark_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next route change.
    pub fn poll_route(&mut self) -> Option<RouteOp> {
        self.routes.pop_front()
    }

    /// Bodies to publish, in order.
    pub fn drain_bodies(&mut self) -> Vec<Body> {
        std::mem::take(&mut self.bodies)
    }

    /// Activity marks of the tunnels whose peer spoke since the previous call, with
    /// wall-clock times computed from `now` = `now_ns`.
    pub fn activity(&mut self, now: Instant, now_ns: u64) -> Vec<IkeActivityMark> {
        let mut marks = Vec::new();
        for e in self.sas.values_mut() {
            let Some(last) = e.sa.last_peer_activity() else {
                continue;
            };
            if e.name.is_empty() || e.activity_reported == Some(last) {
                continue;
            }
            e.activity_reported = Some(last);
            let ago = u64::try_from(now.saturating_duration_since(last).as_nanos()).unwrap_or(0);
            marks.push(IkeActivityMark {
                tunnel: e.name.clone(),
                last_rx_ns: now_ns.saturating_sub(ago),
            });
        }
        marks
    }

    fn entry_by_tunnel(&self, tunnel: &str) -> Option<u64> {
        self.sas
            .iter()
            .find(|(_, e)| e.name == tunnel && e.sa.is_established())
            .map(|(k, _)| *k)
    }

    /// dpdmon asks for a liveness check of `tunnel` (`round`): a new empty INFORMATIONAL
    /// request, or, while one is unanswered, the same message again (seed 000: every retry
    /// of a probe has the same message ID). Reported as `ProbeResult` `sent` (with the
    /// message ID), `queued` (another exchange holds the window) or `failed`.
    pub fn probe(&mut self, now: Instant, tunnel: &str, round: u64) {
        let failed = |round| Body::ProbeResult {
            tunnel: tunnel.to_string(),
            round,
            msg_id: 0,
            outcome: "failed".into(),
        };
        let Some(id) = self.entry_by_tunnel(tunnel) else {
            self.bodies.push(failed(round));
            return;
        };
        let hold = self
            .sas
            .get(&id)
            .and_then(|e| self.gateways.get(&e.gateway))
            .map(|g| g.dpd_hold)
            .unwrap_or(Duration::from_secs(180));
        if let Some(e) = self.sas.get_mut(&id) {
            match e.sa.probe_liveness(now, hold) {
                Ok(LivenessProbe::Sent(msg_id) | LivenessProbe::Retransmitted(msg_id)) => {
                    tracing::debug!(
                        "ike 0:{}:{id}: send IKEv2 DPD probe, seqno {msg_id}",
                        e.name
                    );
                    e.probe = Some((round, msg_id));
                    self.bodies.push(Body::ProbeResult {
                        tunnel: tunnel.to_string(),
                        round,
                        msg_id,
                        outcome: "sent".into(),
                    });
                }
                Ok(LivenessProbe::Queued) => {
                    tracing::debug!(
                        "ike 0:{}:{id}: DPD probe queued behind another exchange",
                        e.name
                    );
                    e.probe = Some((round, 0));
                    self.bodies.push(Body::ProbeResult {
                        tunnel: tunnel.to_string(),
                        round,
                        msg_id: 0,
                        outcome: "queued".into(),
                    });
                }
                Err(err) => {
                    tracing::debug!("ike 0:{}:{id}: DPD probe not sent: {err}", e.name);
                    self.bodies.push(failed(round));
                }
            }
        }
        self.pump(id, now);
    }

    /// espd reports that CHILD SA `spi_in` of `tunnel` reached a lifetime limit: rekey it
    /// (soft: before the hard limit; hard: espd no longer carries it, so replace it now).
    /// A rekey already under way is not started twice.
    ///
    /// `packets` is what the SA carried in both directions since it was installed: a CHILD
    /// SA of a phase2 with `keepalive disable` that carried nothing is not rekeyed (it
    /// expires at its hard lifetime; traffic brings a new one, [`traffic`]).
    pub fn esp_expired(
        &mut self,
        now: Instant,
        tunnel: &str,
        spi_in: u32,
        hard: bool,
        why: &str,
        packets: u64,
    ) {
        let Some(id) = self
            .sas
            .iter()
            .find(|(_, e)| e.name == tunnel && e.children.contains_key(&spi_in))
            .map(|(k, _)| *k)
        else {
            return;
        };
        if why != "flush" && packets == 0 && !self.keepalive_of(id, spi_in) {
            tracing::info!(
                "ike 0:{tunnel}:{id}: CHILD SA {spi_in:08x} {} lifetime reached, idle since it was installed (keepalive disable): not rekeyed, it expires at its hard lifetime",
                if hard { "hard" } else { "soft" }
            );
            return;
        }
        if let Some(e) = self.sas.get_mut(&id) {
            tracing::info!(
                "ike 0:{tunnel}:{id}: CHILD SA {spi_in:08x} {} lifetime reached ({why}), rekeying",
                if hard { "hard" } else { "soft" }
            );
            if let Err(err) = e.sa.rekey_child(now, spi_in) {
                tracing::debug!("ike 0:{tunnel}:{id}: no rekey of {spi_in:08x}: {err}");
            }
        }
        self.pump(id, now);
    }

    /// dpdmon declared `tunnel` dead: flush it (no exchange with the peer).
    pub fn dead_peer(&mut self, now: Instant, tunnel: &str) {
        let found: Vec<u64> = self
            .sas
            .iter()
            .filter(|(_, e)| e.name == tunnel)
            .map(|(k, _)| *k)
            .collect();
        for id in found {
            let g = self
                .sas
                .get(&id)
                .and_then(|e| self.gateways.get(&e.gateway))
                .filter(|g| !g.dynamic)
                .cloned();
            if let Some(g) = g {
                self.life_dead(now, &g);
            }
            self.flush(id, now, "dpd");
        }
    }

    /// dpdmon's tunnel monitor declared `tunnel` down. With `tunnel-monitor-action
    /// fail-over` the tunnel is flushed like a dead DPD verdict (its `dpd-action` then
    /// moves to the next `remote-gw` or lets the backup phase1 take over); with
    /// `wait-recover` the SAs stay and the tunnel's routes are withdrawn until
    /// [`IkeManager::monitor_up`].
    pub fn monitor_down(&mut self, now: Instant, tunnel: &str) {
        let ids: Vec<u64> = self
            .sas
            .iter()
            .filter(|(_, e)| e.name == tunnel && e.info.is_some())
            .map(|(k, _)| *k)
            .collect();
        let Some(g) = ids
            .first()
            .and_then(|id| self.sas.get(id))
            .and_then(|e| self.gateways.get(&e.gateway))
            .cloned()
        else {
            return;
        };
        if g.monitor_action == Some(MonitorAction::FailOver) {
            tracing::info!(
                "ike 0:{tunnel}: tunnel monitor failed, fail-over: flushing the tunnel like a dead peer"
            );
            self.dead_peer(now, tunnel);
            return;
        }
        for id in ids {
            let Some(e) = self.sas.get_mut(&id) else {
                continue;
            };
            if e.withdrawn {
                continue;
            }
            e.withdrawn = true;
            let routes = e.routes.clone();
            tracing::info!(
                "ike 0:{tunnel}:{id}: tunnel monitor failed, wait-recover: routes withdrawn ({})",
                routes.join(" ")
            );
            for dest in routes {
                if !self.route_held_elsewhere(id, &g.name, &dest) {
                    tracing::debug!("ike 0:{}:{id}: del route {dest} oif {}", g.name, g.name);
                    self.routes.push_back(RouteOp::Del {
                        dest,
                        dev: g.name.clone(),
                    });
                }
            }
        }
    }

    /// dpdmon's tunnel monitor of `tunnel` answers again (or stopped): routes withdrawn by
    /// [`IkeManager::monitor_down`] come back.
    pub fn monitor_up(&mut self, tunnel: &str) {
        for (id, e) in self.sas.iter_mut() {
            if e.name != tunnel || !e.withdrawn {
                continue;
            }
            e.withdrawn = false;
            tracing::info!(
                "ike 0:{tunnel}:{id}: tunnel monitor answers, routes restored ({})",
                e.routes.join(" ")
            );
            for dest in &e.routes {
                self.routes.push_back(RouteOp::Add {
                    dest: dest.clone(),
                    dev: e.gateway.clone(),
                });
            }
        }
    }

    /// `diagnose vpn ike gateway clear [name N]`: deletes the IKE SAs (Delete sent to the
    /// peer) of every tunnel or of the one named `N` (instance or phase1). Returns how many.
    pub fn clear(&mut self, now: Instant, name: Option<&str>) -> usize {
        let ids: Vec<u64> = self
            .sas
            .iter()
            .filter(|(_, e)| name.is_none_or(|n| e.name == n || e.gateway == n))
            .map(|(k, _)| *k)
            .collect();
        for id in &ids {
            if let Some(e) = self.sas.get_mut(id) {
                if e.sa.is_established() {
                    let _ = e.sa.delete(now);
                    tracing::debug!("ike 0:{}:{id}: sending DELETE for IKE SA", e.name);
                }
            }
            self.pump(*id, now);
            self.flush(*id, now, "cleared");
        }
        ids.len()
    }

    /// The gateway and CHILD SA policy of phase2 `phase2` (optionally of phase1 `phase1`).
    fn find_phase2(&self, phase2: &str, phase1: Option<&str>) -> Result<(String, usize), String> {
        self.gateways
            .values()
            .filter(|g| phase1.is_none_or(|p| g.name == p))
            .find_map(|g| {
                g.phase2s
                    .iter()
                    .position(|n| n == phase2)
                    .map(|i| (g.name.clone(), i))
            })
            .ok_or_else(|| match phase1 {
                Some(p) => format!("no phase2 {phase2:?} of phase1 {p:?}"),
                None => format!("no phase2 {phase2:?}"),
            })
    }

    /// `execute vpn ipsec tunnel up <phase2> [<phase1>]`: the CHILD SA of that phase2 on
    /// every established IKE SA of its phase1 that lacks one (CREATE_CHILD_SA); a static
    /// phase1 without an IKE SA is initiated now (and again after failures, as with
    /// `auto-negotiate enable`, until `tunnel down`), bringing up all its phase2s.
    pub fn tunnel_up(
        &mut self,
        now: Instant,
        phase2: &str,
        phase1: Option<&str>,
    ) -> Result<CommandOutcome, String> {
        let (gw, policy) = self.find_phase2(phase2, phase1)?;
        self.traffic
            .parked
            .remove(&(gw.clone(), phase2.to_string()));
        let mut out = CommandOutcome::default();
        let ids: Vec<u64> = self
            .sas
            .iter()
            .filter(|(_, e)| e.gateway == gw)
            .map(|(k, _)| *k)
            .collect();
        for id in &ids {
            if let Some(e) = self.sas.get_mut(id) {
                // Still negotiating (all phase2s come with it) or already up.
                if !e.sa.is_established() || e.sa.child_policies().contains(&policy) {
                    out.unchanged += 1;
                } else if e.sa.create_child_for(now, policy).is_ok() {
                    tracing::debug!("ike 0:{}:{id}: bringing up phase2 {phase2}", e.name);
                    out.requested += 1;
                }
            }
            self.pump(*id, now);
        }
        let is_static = self
            .gateways
            .get(&gw)
            .is_some_and(|g| !g.dynamic && g.remote_gw.is_some());
        if ids.is_empty() {
            if self.gateways.get(&gw).is_some_and(|g| g.passive) {
                return Err(format!(
                    "phase1 {gw:?} has passive-mode enable: it only answers its peer"
                ));
            }
            if !is_static {
                return Err(format!(
                    "phase1 {gw:?} is dial-up: it has no peer to initiate to until one connects"
                ));
            }
            self.wanted.insert(gw.clone());
            self.life_release(&gw);
            self.retry_at.remove(&gw);
            out.initiated += 1;
        }
        Ok(out)
    }

    /// `execute vpn ipsec tunnel down <phase2> [<phase1>]`: deletes that phase2's CHILD SAs
    /// (Delete sent to the peer); the IKE SA stays. Undoes an earlier `tunnel up`'s
    /// initiation of a static phase1 (`auto-negotiate enable` still applies).
    pub fn tunnel_down(
        &mut self,
        now: Instant,
        phase2: &str,
        phase1: Option<&str>,
    ) -> Result<CommandOutcome, String> {
        let (gw, _) = self.find_phase2(phase2, phase1)?;
        self.wanted.remove(&gw);
        self.traffic.parked.insert((gw.clone(), phase2.to_string()));
        let mut out = CommandOutcome::default();
        for (spi, id) in self.child_spis_of(&gw, phase2) {
            if let Some(e) = self.sas.get_mut(&id) {
                if e.sa.delete_child(now, spi).is_ok() {
                    out.requested += 1;
                }
            }
            self.pump(id, now);
        }
        Ok(out)
    }

    /// `execute vpn ipsec tunnel rekey <phase2> [<phase1>]` (Haven): rekeys that phase2's
    /// CHILD SAs now (CREATE_CHILD_SA with REKEY_SA, make-before-break).
    pub fn tunnel_rekey(
        &mut self,
        now: Instant,
        phase2: &str,
        phase1: Option<&str>,
    ) -> Result<CommandOutcome, String> {
        let (gw, _) = self.find_phase2(phase2, phase1)?;
        let mut out = CommandOutcome::default();
        for (spi, id) in self.child_spis_of(&gw, phase2) {
            if let Some(e) = self.sas.get_mut(&id) {
                match e.sa.rekey_child(now, spi) {
                    Ok(()) => {
                        tracing::debug!("ike 0:{}:{id}: rekeying CHILD SA {spi:08x}", e.name);
                        out.requested += 1;
                    }
                    Err(_) => out.unchanged += 1,
                }
            }
            self.pump(id, now);
        }
        Ok(out)
    }

    /// `execute vpn ipsec ike rekey <name>` (Haven): rekeys the established IKE SAs of a
    /// tunnel instance or phase1 now.
    pub fn ike_rekey(&mut self, now: Instant, name: &str) -> CommandOutcome {
        let ids: Vec<u64> = self
            .sas
            .iter()
            .filter(|(_, e)| e.name == name || e.gateway == name)
            .map(|(k, _)| *k)
            .collect();
        let mut out = CommandOutcome::default();
        for id in ids {
            if let Some(e) = self.sas.get_mut(&id) {
                if e.sa.is_established() && e.sa.rekey_ike(now).is_ok() {
                    tracing::debug!("ike 0:{}:{id}: rekeying IKE SA", e.name);
                    out.requested += 1;
                } else {
                    out.unchanged += 1;
                }
            }
            self.pump(id, now);
        }
        out
    }

    /// Published CHILD SAs (inbound SPI, IKE SA id) of phase2 `phase2` of gateway `gw`.
    fn child_spis_of(&self, gw: &str, phase2: &str) -> Vec<(u32, u64)> {
        self.sas
            .iter()
            .filter(|(_, e)| e.gateway == gw)
            .flat_map(|(id, e)| {
                e.children
                    .values()
                    .filter(|c| c.phase2 == phase2)
                    .map(move |c| (c.spi_in, *id))
            })
            .collect()
    }

    /// Drains one SA's transmits and events.
    fn pump(&mut self, id: u64, now: Instant) {
        let mut events = Vec::new();
        let mut closed = false;
        if let Some(e) = self.sas.get_mut(&id) {
            while let Some(t) = e.sa.poll_transmit() {
                self.transmits.push_back(t);
            }
            while let Some(ev) = e.sa.poll_event() {
                events.push(ev);
            }
            closed = e.sa.is_closed();
            // New SPIs (an IKE rekey answered, a colliding rekey's SA) route here at once.
            for spi in e.sa.local_spis() {
                self.by_spi.insert(spi, id);
            }
            let next = e.sa.poll_timeout();
            self.set_timer(id, next);
        }
        for ev in events {
            self.on_event(id, now, ev);
        }
        if closed {
            self.flush(id, now, "closed");
        } else {
            self.follow_peer(id);
            self.ha_after_pump(id, now);
        }
    }

    /// After an authenticated message from a new address or port (the IKE SA followed the
    /// peer's NAT mapping, RFC 7296 §2.23), re-publishes the CHILD SAs of UDP-encapsulated
    /// tunnels with the new destination; espd moves them without touching their state.
    fn follow_peer(&mut self, id: u64) {
        let Some(e) = self.sas.get_mut(&id) else {
            return;
        };
        if !e
            .children
            .values()
            .any(|c| matches!(c.encap, EspEncap::Udp { .. }))
        {
            return;
        }
        let remote = e.sa.addresses().remote;
        let ip = remote.ip().to_string();
        for c in e.children.values_mut() {
            if let EspEncap::Udp {
                local_port,
                remote_port,
            } = c.encap
            {
                if c.remote != ip || remote_port != remote.port() {
                    tracing::info!(
                        "ike 0:{}:{id}: peer moved to {remote}, CHILD SA {:08x} follows",
                        e.name,
                        c.spi_in
                    );
                    c.remote = ip.clone();
                    c.encap = EspEncap::Udp {
                        local_port,
                        remote_port: remote.port(),
                    };
                    self.bodies.push(Body::ChildSa((**c).clone()));
                }
            }
        }
    }

    /// Files SA `id`'s next timer in the index (None: no timer).
    fn set_timer(&mut self, id: u64, at: Option<Instant>) {
        if let Some(old) = self.timer_of.remove(&id) {
            self.timers.remove(&(old, id));
        }
        if let Some(t) = at {
            self.timers.insert((t, id));
            self.timer_of.insert(id, t);
        }
    }

    fn on_event(&mut self, id: u64, now: Instant, ev: Event) {
        if matches!(ev, Event::MessageIdUpdate { .. }) {
            // HA records follow in `ha_after_pump`; nothing else to do.
            return;
        }
        let Some(e) = self.sas.get(&id) else {
            return;
        };
        let Some(g) = self.gateways.get(&e.gateway).cloned() else {
            return;
        };
        match ev {
            Event::IkeSaEstablished(info) => {
                let addrs = e.sa.addresses();
                let name = if e.name.is_empty() {
                    self.instance_name(&g)
                } else {
                    e.name.clone()
                };
                tracing::info!(
                    "ike 0:{name}:{id}: IKE SA {:016x}/{:016x} established with {} ({:?}), {}",
                    info.spi_i,
                    info.spi_r,
                    addrs.remote,
                    info.remote_id.to_string(),
                    encr_label(info.suite.encr)
                );
                self.retry_at.remove(&g.name);
                self.traffic.started.remove(&id);
                self.half_open_done(id);
                if !g.dynamic {
                    self.life_established(now, id, &g.name, addrs.remote.ip());
                }
                if let Some(e) = self.sas.get_mut(&id) {
                    e.name = name.clone();
                    e.info = Some(info);
                }
                self.bodies
                    .push(Body::Tunnel(tunnel_up_record(&g, &name, &addrs)));
            }
            Event::ChildSaEstablished(c) => {
                self.child_up(id, &g, &c);
                self.life_child_up(now, id, &g.name);
            }
            Event::ChildSaDeleted {
                inbound_spi,
                reason,
                ..
            } => {
                let phase2 = e.children.get(&inbound_spi).map(|c| c.phase2.clone());
                self.child_down(id, &g, inbound_spi, reason);
                if let Some(p2) = phase2 {
                    self.traffic_child_gone(now, id, &g, &p2, reason);
                }
            }
            Event::ChildSaFailed { notify } => {
                self.traffic.asked.retain(|(i, _)| *i != id);
                tracing::info!(
                    "ike 0:{}:{id}: CHILD SA negotiation failed: {notify:?}",
                    e.name
                );
                self.life_child_failed(now, id);
            }
            Event::IkeSaRekeyed { new, .. } => {
                tracing::info!(
                    "ike 0:{}:{id}: IKE SA rekeyed, new SPIs {:016x}/{:016x}",
                    e.name,
                    new.spi_i,
                    new.spi_r
                );
                let spis = e.sa.local_spis();
                if let Some(e) = self.sas.get_mut(&id) {
                    e.info = Some(new);
                }
                for s in spis {
                    self.by_spi.insert(s, id);
                }
            }
            Event::IkeSaDeleted {
                spi_i,
                spi_r,
                reason,
            } => {
                let current = e.sa.spis() == (spi_i, spi_r);
                if current {
                    tracing::info!(
                        "ike 0:{}:{id}: IKE SA {spi_i:016x}/{spi_r:016x} deleted ({reason:?})",
                        e.name
                    );
                    self.flush(id, now, "deleted");
                } else {
                    for s in [spi_i, spi_r] {
                        if self.by_spi.get(&s) == Some(&id) {
                            self.by_spi.remove(&s);
                        }
                    }
                    if let Some(e) = self.sas.get(&id) {
                        for s in e.sa.local_spis() {
                            self.by_spi.insert(s, id);
                        }
                    }
                }
            }
            Event::AuthFailed { reason } => {
                tracing::info!(
                    "ike 0:{}:{id}: authentication failed with {}: {reason}",
                    g.name,
                    e.sa.addresses().remote
                );
            }
            Event::LivenessReply | Event::LivenessTimeout => {
                let reply = matches!(ev, Event::LivenessReply);
                let name = e.name.clone();
                if let Some(e) = self.sas.get_mut(&id) {
                    if let Some((round, msg_id)) = e.probe.take() {
                        self.bodies.push(Body::ProbeResult {
                            tunnel: name,
                            round,
                            msg_id,
                            outcome: if reply { "reply" } else { "timeout" }.into(),
                        });
                    }
                }
            }
            Event::MessageIdUpdate { .. } => {}
            Event::MessageIdSyncUnanswered {
                next_send,
                next_recv,
            } => tracing::warn!(
                "ike 0:{}:{id}: RFC 6311 sync unanswered (the answer may have gone to another member); not sent again on this AEAD IKE SA: continuing at the IDs sent, send/recv={next_send}/{next_recv}",
                e.name
            ),
            Event::MessageIdsCaughtUp { expected, got } => tracing::info!(
                "ike 0:{}:{id}: restored IKE SA: the peer's request {got} taken where the copy expected {expected} (the previous owner answered those between)",
                e.name
            ),
            Event::MessageIdsSynced {
                initiated,
                next_send,
                next_recv,
            } => tracing::info!(
                "ike 0:{}:{id}: {} message IDs: send/recv={next_send}/{next_recv}",
                e.name,
                if initiated {
                    "RFC 6311 sync done, synced"
                } else {
                    "RFC 6311 sync request from the peer's cluster answered, now"
                }
            ),
        }
        let _ = now;
    }

    fn child_up(&mut self, id: u64, g: &Gateway, c: &ike_proto::ChildSaInfo) {
        self.traffic.asked.remove(&(id, c.policy));
        let Some(e) = self.sas.get_mut(&id) else {
            return;
        };
        let addrs = e.sa.addresses();
        let Some(transform) = transform_name(c.encr, c.integ) else {
            tracing::warn!(
                "ike 0:{}:{id}: CHILD SA {:08x} uses {:?}/{:?}, which espd does not carry",
                e.name,
                c.inbound_spi,
                c.encr,
                c.integ
            );
            return;
        };
        let floated = addrs.local.port() == ike_proto::sa::NAT_T_PORT
            || addrs.remote.port() == ike_proto::sa::NAT_T_PORT;
        let k = &c.keys;
        let soft = c.soft_lifetime.as_secs();
        let hard = c.lifetime.as_secs();
        let mut sa = BusChild {
            tunnel: e.name.clone(),
            phase1: g.name.clone(),
            phase2: g
                .phase2s
                .get(c.policy)
                .or(g.phase2s.first())
                .cloned()
                .unwrap_or_default(),
            spi_in: c.inbound_spi,
            spi_out: c.outbound_spi,
            transform,
            esn: c.esn,
            keys_in: [k.encr_in.as_bytes(), k.integ_in.as_bytes()].concat(),
            keys_out: [k.encr_out.as_bytes(), k.integ_out.as_bytes()].concat(),
            local: addrs.local.ip().to_string(),
            remote: addrs.remote.ip().to_string(),
            encap: if floated {
                EspEncap::Udp {
                    local_port: ike_proto::sa::NAT_T_PORT,
                    remote_port: addrs.remote.port(),
                }
            } else {
                EspEncap::None
            },
            local_ts: ts_cidrs(&c.local_ts),
            remote_ts: ts_cidrs(&c.remote_ts),
            // `replay disable`: espd skips the anti-replay check (RFC 4303 §3.4.3 lets the
            // receiver choose), still counting the packets.
            replay_window: if g.p2.get(c.policy).is_none_or(|k| k.replay) {
                REPLAY_WINDOW
            } else {
                0
            },
            // espd enforces the limits and reports the soft ones (`EspExpire`), which start
            // a rekey here (see `esp_expired`); with `keepalive enable` ike-proto's own
            // timer also rekeys at the same soft time (with `disable` only espd's event,
            // which carries the packet count, does). Volume: soft at 7/8 of `keylifekbs`.
            // After a takeover: what the old carrier left of them.
            lifetime: self.ha.cap_lifetime(
                c.outbound_spi,
                SaLifetime {
                    soft_secs: if g.child_timed { soft } else { 0 },
                    hard_secs: if g.child_timed { hard } else { 0 },
                    soft_bytes: g.child_bytes.map(|b| b - b / 8).unwrap_or(0),
                    hard_bytes: g.child_bytes.unwrap_or(0),
                },
            ),
            initial_seq: self.ha.initial_seq(c.outbound_spi),
            outbound: false,
        };
        tracing::info!(
            "ike 0:{}:{id}: CHILD SA in {:08x} out {:08x} {} {:?} <-> {:?} up (soft {soft}s, hard {hard}s){}",
            e.name,
            c.inbound_spi,
            c.outbound_spi,
            sa.transform,
            sa.local_ts,
            sa.remote_ts,
            c.rekey_of
                .map(|o| format!(", replaces {o:08x}"))
                .unwrap_or_default()
        );
        if !self.ha.restoring {
            self.bodies.push(Body::ChildSa(sa.clone()));
        }
        sa.outbound = true;
        self.bodies.push(Body::ChildSa(sa.clone()));
        if let Some(old) = c.rekey_of {
            if e.children.remove(&old).is_some() {
                self.bodies.push(Body::ChildSaRemoved {
                    tunnel: e.name.clone(),
                    spi_in: old,
                });
            }
        }
        if g.add_route {
            for dest in &sa.remote_ts {
                if !e.routes.contains(dest) {
                    e.routes.push(dest.clone());
                    if !e.withdrawn {
                        self.routes.push_back(RouteOp::Add {
                            dest: dest.clone(),
                            dev: g.name.clone(),
                        });
                    }
                }
            }
        }
        e.children.insert(c.inbound_spi, Box::new(sa));
    }

    /// True when an IKE SA of gateway `gateway` other than `id` has route `dest` installed
    /// (a pre-empting SA and the one it replaces overlap for a moment).
    fn route_held_elsewhere(&self, id: u64, gateway: &str, dest: &str) -> bool {
        self.sas.iter().any(|(k, o)| {
            *k != id && o.gateway == gateway && !o.withdrawn && o.routes.iter().any(|r| r == dest)
        })
    }

    fn child_down(&mut self, id: u64, g: &Gateway, spi: u32, reason: DeleteReason) {
        let keep_routes = traffic::keeps_routes_of_lost_child(g, reason);
        let Some(e) = self.sas.get_mut(&id) else {
            return;
        };
        if e.children.remove(&spi).is_some() {
            tracing::info!(
                "ike 0:{}:{id}: CHILD SA {spi:08x} deleted ({reason:?})",
                e.name
            );
            self.bodies.push(Body::ChildSaRemoved {
                tunnel: e.name.clone(),
                spi_in: spi,
            });
        }
        if reason != DeleteReason::Rekeyed && !keep_routes {
            // Routes that no remaining CHILD SA (of any phase2) still covers go.
            let kept: Vec<String> = e
                .children
                .values()
                .flat_map(|c| c.remote_ts.iter().cloned())
                .collect();
            let (keep, gone): (Vec<String>, Vec<String>) =
                e.routes.drain(..).partition(|d| kept.contains(d));
            e.routes = keep;
            let withdrawn = e.withdrawn;
            for dest in gone {
                if !withdrawn && !self.route_held_elsewhere(id, &g.name, &dest) {
                    self.routes.push_back(RouteOp::Del {
                        dest,
                        dev: g.name.clone(),
                    });
                }
            }
        }
    }

    /// Removes an SA and everything published for it (seed 000 order: IKE SA gone, CHILD
    /// SAs deleted, routes removed, tunnel down, dial-up instance removed), with seed 000's
    /// debug lines (`expiring IKE SA`, `deleting`, `flushing`, `deleted IPsec SA with SPI`,
    /// `del route`, `sending tunnel down event`, `flushed`, `delete dynamic`, `deleted`).
    fn flush(&mut self, id: u64, now: Instant, why: &str) {
        self.half_open_done(id);
        self.set_timer(id, None);
        let Some(e) = self.sas.remove(&id) else {
            return;
        };
        // Its SPIs go by key, not by a scan of every SA's (an SPI filed for it and no
        // longer among `local_spis` is dropped when a datagram looks it up).
        for spi in e.sa.local_spis() {
            if self.by_spi.get(&spi) == Some(&id) {
                self.by_spi.remove(&spi);
            }
        }
        let peer_key = (e.sa.spis().0, e.sa.addresses().remote.ip());
        if self.by_peer_spi.get(&peer_key) == Some(&id) {
            self.by_peer_spi.remove(&peer_key);
        } else {
            // Its SPI or address changed since it was filed (rare): look for it.
            self.by_peer_spi.retain(|_, v| *v != id);
        }
        if let (Some(n), Some(nums)) = (
            instance_number(&e.gateway, &e.name),
            self.numbers.get_mut(&e.gateway),
        ) {
            nums.release(n);
        }
        let g = self.gateways.get(&e.gateway);
        let label = if e.name.is_empty() {
            e.gateway.as_str()
        } else {
            e.name.as_str()
        };
        let (spi_i, spi_r) = e.sa.spis();
        tracing::debug!("ike 0:{label}:{id}: expiring IKE SA {spi_i:016x}/{spi_r:016x} ({why})");
        tracing::debug!("ike 0:{label}: deleting");
        tracing::debug!("ike 0:{label}: flushing");
        let mut left = e.children.len();
        for spi in e.children.keys() {
            left -= 1;
            tracing::debug!("ike 0:{label}: deleting IPsec SA with SPI {spi:08x}");
            tracing::debug!(
                "ike 0:{label}:{}: deleted IPsec SA with SPI {spi:08x}, SA count: {left}",
                e.gateway
            );
            self.bodies.push(Body::ChildSaRemoved {
                tunnel: e.name.clone(),
                spi_in: *spi,
            });
        }
        let dev = g
            .map(|g| g.name.clone())
            .unwrap_or_else(|| e.gateway.clone());
        self.traffic.asked.retain(|(i, _)| *i != id);
        let routes = self.traffic.keep_routes(g.map(|g| &**g), why, e.routes);
        for dest in routes {
            if e.withdrawn || self.route_held_elsewhere(id, &e.gateway, &dest) {
                continue;
            }
            tracing::debug!("ike 0:{}:{id}: del route {dest} oif {dev}", e.gateway);
            self.routes.push_back(RouteOp::Del {
                dest,
                dev: dev.clone(),
            });
        }
        self.ha.removed(id, &mut self.bodies);
        // Another established IKE SA of the same static gateway carries the tunnel (the old
        // SA of a pre-emption): the tunnel stays up, nothing to retry.
        let successor = self
            .sas
            .values()
            .find(|o| o.gateway == e.gateway && !o.name.is_empty() && o.info.is_some())
            .map(|o| o.sa.addresses());
        if let Some(g) = g.filter(|g| !g.dynamic).cloned() {
            if let Some(next) = self.life_gone(now, id, &g, e.info.is_some(), successor.is_some()) {
                self.retry_at.insert(g.name.clone(), next);
            }
            self.traffic_attempt_over(id, &g, e.info.is_some());
        }
        if let (Some(addrs), Some(g)) = (successor, self.gateways.get(&e.gateway)) {
            if !g.dynamic && e.info.is_some() {
                tracing::debug!(
                    "ike 0:{label}: flushed, the tunnel stays up with {}",
                    addrs.remote
                );
                self.bodies
                    .push(Body::Tunnel(tunnel_up_record(g, &g.name, &addrs)));
                return;
            }
        }
        let g = self.gateways.get(&e.gateway);
        if e.name.is_empty() || e.info.is_none() {
            tracing::debug!("ike 0:{label}: flushed");
            return;
        }
        tracing::debug!("ike 0:{label}: sending tunnel down event");
        match g {
            Some(g) if !g.dynamic => {
                self.bodies.push(Body::Tunnel(TunnelInfo {
                    name: g.name.clone(),
                    phase1: g.name.clone(),
                    kind: TunnelKind::Static,
                    local_gw: g.local_gw.map(|a| a.to_string()),
                    remote_gw: g.remote_gw.map(|a| a.to_string()),
                    interface: Some(g.interface.clone()).filter(|s| !s.is_empty()),
                    state: TunnelState::Down,
                    phase2: g.phase2s.clone(),
                    dpd: g.dpd.clone(),
                }));
                tracing::debug!("ike 0:{label}: flushed");
            }
            _ => {
                tracing::debug!("ike 0:{label}: flushed");
                tracing::debug!("ike 0:{label}: delete dynamic");
                tracing::debug!("ike 0:{label}: deleted");
                self.bodies.push(Body::TunnelRemoved { name: e.name });
            }
        }
    }

    /// `diagnose vpn ike gateway list [name N]` as JSON: one object per IKE SA.
    /// Every established IKE SA with its SPIs, algorithms and SK_ei/SK_er/SK_ai/SK_ar (hex;
    /// the encryption keys include the AEAD salt), for `vpnctl diagnose vpn ike export-keys`
    /// (Wireshark's `ikev2_decryption_table`). Served only as the explicit `ike-keys` view
    /// on the root-only control socket; never in a listing or a log.
    pub fn ike_keys(&self, now: Instant) -> Value {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let list: Vec<Value> = self
            .sas
            .values()
            .filter_map(|e| {
                let snap = e.sa.snapshot(now)?;
                let suite = snap.info.suite;
                let integ = suite.integ.map(|i| match i {
                    Integ::HmacSha1_96 => "hmac-sha1-96",
                    Integ::HmacSha256_128 => "hmac-sha256-128",
                    Integ::HmacSha384_192 => "hmac-sha384-192",
                    Integ::HmacSha512_256 => "hmac-sha512-256",
                });
                Some(json!({
                    "name": if e.name.is_empty() { &e.gateway } else { &e.name },
                    "spi_i": format!("{:016x}", snap.info.spi_i),
                    "spi_r": format!("{:016x}", snap.info.spi_r),
                    "encr": encr_label(suite.encr),
                    "integ": integ,
                    "sk_ei": hex(snap.keys.sk_ei.as_bytes()),
                    "sk_er": hex(snap.keys.sk_er.as_bytes()),
                    "sk_ai": hex(snap.keys.sk_ai.as_bytes()),
                    "sk_ar": hex(snap.keys.sk_ar.as_bytes()),
                }))
            })
            .collect();
        Value::Array(list)
    }

    /// (established IKE SAs, IKE SAs still negotiating, published CHILD SAs), for the
    /// gauges: counted without building the `gateway_list` view.
    pub fn sa_counts(&self) -> (u64, u64, u64) {
        let (mut up, mut connecting, mut children) = (0u64, 0u64, 0u64);
        for e in self.sas.values() {
            if e.sa.is_established() {
                up += 1;
            } else {
                connecting += 1;
            }
            children += e.children.len() as u64;
        }
        (up, connecting, children)
    }

    pub fn gateway_list(&self, now: Instant, name: Option<&str>) -> Value {
        let list: Vec<Value> = self
            .sas
            .values()
            .filter(|e| name.is_none_or(|n| e.name == n || e.gateway == n))
            .map(|e| {
                let a = e.sa.addresses();
                let (spi_i, spi_r) = e.sa.spis();
                let (tx, rx) = e.sa.message_ids();
                let info = e.info.as_ref();
                json!({
                    "name": if e.name.is_empty() { &e.gateway } else { &e.name },
                    "phase1": e.gateway,
                    "interface": self.gateways.get(&e.gateway).map(|g| g.interface.clone()),
                    "proposal": info.map(|i| ike_proposal_name(&i.suite)),
                    "rekey_in_secs": e.sa.poll_timeout().map(|t| t.saturating_duration_since(now).as_secs()),
                    "serial": e.serial,
                    "local": a.local.to_string(),
                    "remote": a.remote.to_string(),
                    "created_secs": now.saturating_duration_since(e.created).as_secs(),
                    "established": e.sa.is_established(),
                    "initiator": info.map(|i| i.initiator),
                    "spi_i": format!("{spi_i:016x}"),
                    "spi_r": format!("{spi_r:016x}"),
                    "cookie": format!("{spi_i:016x}/{spi_r:016x}"),
                    "encryption": info.map(|i| encr_label(i.suite.encr)),
                    "integrity": info.and_then(|i| i.suite.integ).map(|x| format!("{x:?}")),
                    "prf": info.map(|i| format!("{:?}", i.suite.prf)),
                    "dh_group": info.map(|i| i.suite.dh.0),
                    "local_id": info.map(|i| i.local_id.to_string()),
                    "remote_id": info.map(|i| i.remote_id.to_string()),
                    "nat": info.map(|i| match (i.local_behind_nat, i.remote_behind_nat) {
                        (true, true) => "both", (true, false) => "me",
                        (false, true) => "peer", (false, false) => "none" }),
                    "lifetime_secs": info.map(|i| i.lifetime.as_secs()),
                    "msg_id_tx": tx,
                    "msg_id_rx": rx,
                    "children": e.children.values().map(|c| json!({
                        "spi_in": format!("{:08x}", c.spi_in),
                        "phase2": c.phase2,
                        "spi_out": format!("{:08x}", c.spi_out),
                        "transform": c.transform,
                        "encap": c.encap,
                        "local_ts": c.local_ts,
                        "remote_ts": c.remote_ts,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        Value::Array(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_become_cidrs() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            range_to_cidrs(a("0.0.0.0"), a("255.255.255.255")),
            ["0.0.0.0/0"]
        );
        assert_eq!(
            range_to_cidrs(a("10.1.0.0"), a("10.1.255.255")),
            ["10.1.0.0/16"]
        );
        assert_eq!(
            range_to_cidrs(a("10.0.0.5"), a("10.0.0.5")),
            ["10.0.0.5/32"]
        );
        assert_eq!(
            range_to_cidrs(a("10.0.0.1"), a("10.0.0.6")),
            ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"]
        );
    }

    #[test]
    fn ipv6_ranges_become_cidrs() {
        let a = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(
            range6_to_cidrs(a("::"), a("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            ["::/0"]
        );
        assert_eq!(
            range6_to_cidrs(a("fd00:1::"), a("fd00:1::ffff:ffff:ffff:ffff")),
            ["fd00:1::/64"]
        );
        assert_eq!(range6_to_cidrs(a("fd00::5"), a("fd00::5")), ["fd00::5/128"]);
        assert_eq!(
            range6_to_cidrs(a("fd00::1"), a("fd00::6")),
            ["fd00::1/128", "fd00::2/127", "fd00::4/127", "fd00::6/128"]
        );
        assert_eq!(
            range6_to_cidrs(a("8000::"), a("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            ["8000::/1"]
        );
        assert!(range6_to_cidrs(a("fd00::6"), a("fd00::1")).is_empty());
    }

    #[test]
    fn instance_numbers_hand_out_the_lowest_free_one() {
        let mut n = InstanceNumbers::default();
        let lowest = |n: &mut InstanceNumbers| n.take_lowest_where(|_| true);
        assert_eq!([lowest(&mut n), lowest(&mut n), lowest(&mut n)], [1, 2, 3]);
        n.release(2);
        n.release(1);
        assert_eq!(lowest(&mut n), 1);
        assert_eq!(lowest(&mut n), 2);
        assert_eq!(lowest(&mut n), 4);
        // Releasing the top ones shrinks the range, also over numbers freed before.
        n.release(3);
        n.release(4);
        assert_eq!((n.top, n.free.len()), (2, 0));
        // A number taken elsewhere (HA takeover) is skipped; the ones below stay free.
        n.take(6);
        assert_eq!([lowest(&mut n), lowest(&mut n), lowest(&mut n)], [3, 4, 5]);
        assert_eq!(lowest(&mut n), 7);
        n.release(9);
        n.release(0);
        assert_eq!(lowest(&mut n), 8);
        // A class of numbers (an FGSP member's): the others are skipped, kept free, and
        // trimmed with the top.
        let mut c = InstanceNumbers::default();
        let class = |n: u32| n % 16 == 2;
        assert_eq!(c.take_lowest_where(class), 2);
        assert_eq!(c.take_lowest_where(class), 18);
        assert_eq!(lowest(&mut c), 1);
        c.release(18);
        assert_eq!((c.top, c.free.len()), (2, 0));
        c.release(2);
        assert_eq!(c.take_lowest_where(class), 2);
        assert_eq!(instance_number("vpn1", "vpn1_12"), Some(12));
        assert_eq!(instance_number("vpn1", "vpn1"), None);
        assert_eq!(instance_number("vpn1", "vpn10_1"), None);
        assert_eq!(instance_number("vpn1", "vpn1_0"), None);
    }

    #[test]
    fn transforms_use_esp_proto_names() {
        assert_eq!(
            transform_name(Encr::AesGcm16(16), None).as_deref(),
            Some("aes128gcm")
        );
        assert_eq!(
            transform_name(Encr::AesCbc(32), Some(Integ::HmacSha256_128)).as_deref(),
            Some("aes256-sha256")
        );
        assert_eq!(transform_name(Encr::AesCbc(16), None), None);
        assert_eq!(
            transform_name(Encr::AesCbc(16), Some(Integ::HmacSha384_192)),
            None
        );
    }

    pub(super) const HUB: &str = r#"
config vpn ipsec phase1-interface
    edit "hub"
        set type static
        set interface "port1"
        set remote-gw 192.0.2.2
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set psksecret "k"
    next
end
config vpn ipsec phase2-interface
    edit "hub"
        set phase1name "hub"
        set proposal aes128gcm
        set pfs disable
        set src-subnet 10.1.0.0/24
        set dst-subnet 10.2.0.0/24
    next
end
"#;

    pub(super) const DIAL: &str = r#"
config vpn ipsec phase1-interface
    edit "vpn1"
        set type dynamic
        set interface "port2"
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set psksecret "k"
    next
end
config vpn ipsec phase2-interface
    edit "vpn1"
        set phase1name "vpn1"
        set proposal aes128gcm
        set pfs disable
        set src-subnet 10.2.0.0/24
        set dst-subnet 10.1.0.0/24
    next
end
"#;

    /// `keylife-type` decides which limits espd enforces: seconds only, bytes only
    /// (`keylifekbs` KiB, soft at 7/8) or both.
    #[test]
    fn keylife_type_selects_the_limits() {
        let gw = |extra: &str| {
            let text = HUB.replace(
                "        set pfs disable\n",
                &format!("        set pfs disable\n{extra}"),
            );
            let cfg = match haven_config::parse(&text) {
                Ok(p) => p.config,
                Err(e) => panic!("{e}"),
            };
            let p1 = cfg.phase1.first().cloned().expect("phase1");
            gateway_of(&cfg, &p1, &CertStore::default(), Instant::now()).expect("gateway")
        };
        let secs = gw("        set keylifeseconds 600\n");
        assert_eq!((secs.child_bytes, secs.child_timed), (None, true));
        assert_eq!(secs.cfg.child_lifetime, Duration::from_secs(600));
        let kbs = gw("        set keylife-type kbs\n        set keylifekbs 10240\n");
        assert_eq!(
            (kbs.child_bytes, kbs.child_timed),
            (Some(10240 * 1024), false)
        );
        assert!(kbs.cfg.child_lifetime > Duration::from_secs(365 * 86_400));
        let both = gw(
            "        set keylife-type both\n        set keylifeseconds 600\n        set keylifekbs 10240\n",
        );
        assert_eq!(
            (both.child_bytes, both.child_timed),
            (Some(10240 * 1024), true)
        );
        assert_eq!(both.cfg.child_lifetime, Duration::from_secs(600));
    }

    /// The hub gateway (`HUB`) with its IKE_SA_INIT towards the dial-up gateway queued.
    fn hub_dialing(now: Instant) -> IkeManager {
        let mut hub = mgr(HUB, now);
        hub.initiate(
            now,
            "hub",
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
        );
        hub
    }

    /// A manager with configuration `text` (shared by the HA and lifecycle tests).
    pub(super) fn mgr(text: &str, now: Instant) -> IkeManager {
        let cfg = match haven_config::parse(text) {
            Ok(p) => p.config,
            Err(e) => panic!("{e}"),
        };
        let mut m = IkeManager::new();
        m.set_config(now, &cfg);
        m
    }

    /// Carries every pending datagram between the two managers until both are quiet.
    pub(super) fn shuttle(a: &mut IkeManager, b: &mut IkeManager, now: Instant) {
        for _ in 0..50 {
            let mut moved = false;
            while let Some(t) = a.poll_transmit() {
                b.handle_datagram(now, t.destination, t.source, &t.payload);
                moved = true;
            }
            while let Some(t) = b.poll_transmit() {
                a.handle_datagram(now, t.destination, t.source, &t.payload);
                moved = true;
            }
            if !moved {
                return;
            }
        }
        panic!("the managers never went quiet");
    }

    #[test]
    fn static_initiator_and_dialup_responder_publish_tunnels_sas_routes_and_removals() {
        let now = Instant::now();
        let mut hub = mgr(HUB, now);
        let mut dial = mgr(DIAL, now);
        let pending = hub.initiate_pending(now);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].0, "hub");
        let gw_b: IpAddr = "192.0.2.2".parse().unwrap();
        hub.initiate(now, "hub", "192.0.2.1".parse().unwrap(), gw_b);
        assert!(
            hub.initiate_pending(now).is_empty(),
            "one attempt at a time"
        );
        shuttle(&mut hub, &mut dial, now);

        let d = dial.drain_bodies();
        // Tunnel instance first, then the CHILD SA inbound-only, then with outbound.
        let Body::Tunnel(t) = &d[0] else {
            panic!("{d:?}")
        };
        assert_eq!((t.name.as_str(), t.phase1.as_str()), ("vpn1_1", "vpn1"));
        assert_eq!(t.state, TunnelState::Up);
        assert_eq!(t.kind, TunnelKind::DialupInstance);
        let sas: Vec<&BusChild> = d
            .iter()
            .filter_map(|b| match b {
                Body::ChildSa(c) => Some(c),
                _ => None,
            })
            .collect();
        assert_eq!(sas.len(), 2, "{d:?}");
        assert!(!sas[0].outbound && sas[1].outbound);
        assert_eq!(sas[0].tunnel, "vpn1_1");
        assert_eq!(sas[0].transform, "aes128gcm");
        assert_eq!(sas[0].keys_in.len(), 20);
        assert_eq!(sas[0].local_ts, ["10.2.0.0/24"]);
        assert_eq!(sas[0].remote_ts, ["10.1.0.0/24"]);
        assert_eq!(sas[0].encap, EspEncap::None);
        assert_eq!(sas[0].initial_seq, 1);
        assert_eq!(
            dial.poll_route(),
            Some(RouteOp::Add {
                dest: "10.1.0.0/24".into(),
                dev: "vpn1".into()
            })
        );

        // The other side holds the mirror image: its inbound keys are our outbound ones.
        let h = hub.drain_bodies();
        let hs: Vec<&BusChild> = h
            .iter()
            .filter_map(|b| match b {
                Body::ChildSa(c) if c.outbound => Some(c),
                _ => None,
            })
            .collect();
        assert_eq!(hs[0].tunnel, "hub");
        assert_eq!(hs[0].spi_in, sas[1].spi_out);
        assert_eq!(hs[0].keys_in, sas[1].keys_out);
        assert_eq!(hs[0].keys_out, sas[1].keys_in);
        let view = dial.gateway_list(now, Some("vpn1_1")).to_string();
        assert!(view.contains("\"established\":true"), "{view}");
        assert!(!view.contains("keys"), "{view}");

        // A clear on the static side deletes the IKE SA; the dial-up side removes the
        // CHILD SA, its route and the instance.
        assert_eq!(hub.clear(now, Some("hub")), 1);
        shuttle(&mut hub, &mut dial, now);
        let d = dial.drain_bodies();
        let pos = |f: &dyn Fn(&Body) -> bool| d.iter().position(f);
        let removed =
            pos(&|b| matches!(b, Body::ChildSaRemoved { tunnel, .. } if tunnel == "vpn1_1"));
        let gone = pos(&|b| matches!(b, Body::TunnelRemoved { name } if name == "vpn1_1"));
        assert!(
            removed.is_some() && gone.is_some() && removed < gone,
            "{d:?}"
        );
        assert_eq!(
            dial.poll_route(),
            Some(RouteOp::Del {
                dest: "10.1.0.0/24".into(),
                dev: "vpn1".into()
            })
        );
        assert_eq!(dial.gateway_list(now, None), json!([]));
        // Nothing routes to the flushed SAs any more (removed by key, not by a scan).
        assert!(dial.by_spi.is_empty() && dial.by_peer_spi.is_empty());
        assert!(hub.by_spi.is_empty(), "{:?}", hub.by_spi);
        let h = hub.drain_bodies();
        assert!(
            h.iter().any(
                |b| matches!(b, Body::Tunnel(t) if t.name == "hub" && t.state == TunnelState::Down)
            ),
            "{h:?}"
        );
    }

    /// A second phase2 on each side (10.11/16 <-> 10.12/16).
    fn with_second_phase2(text: &str, p1: &str, src: &str, dst: &str) -> String {
        format!(
            "{text}config vpn ipsec phase2-interface
    edit \"{p1}-b\"
        set phase1name \"{p1}\"
        set proposal aes256-sha256
        set pfs enable
        set dhgrp 31
        set src-subnet {src}
        set dst-subnet {dst}
    next
end
"
        )
    }

    #[test]
    fn each_phase2_gets_a_child_sa_named_after_it_with_its_own_routes() {
        let now = Instant::now();
        let mut hub = mgr(
            &with_second_phase2(HUB, "hub", "10.11.0.0/16", "10.12.0.0/16"),
            now,
        );
        let mut dial = mgr(
            &with_second_phase2(DIAL, "vpn1", "10.12.0.0/16", "10.11.0.0/16"),
            now,
        );
        hub.initiate(
            now,
            "hub",
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
        );
        shuttle(&mut hub, &mut dial, now);
        let d = dial.drain_bodies();
        let Some(Body::Tunnel(t)) = d.first() else {
            panic!("{d:?}")
        };
        assert_eq!(t.phase2, ["vpn1", "vpn1-b"]);
        let outs: Vec<&BusChild> = d
            .iter()
            .filter_map(|b| match b {
                Body::ChildSa(c) if c.outbound => Some(c),
                _ => None,
            })
            .collect();
        assert_eq!(outs.len(), 2, "{d:?}");
        assert_eq!(
            (outs[0].phase2.as_str(), outs[0].transform.as_str()),
            ("vpn1", "aes128gcm")
        );
        assert_eq!(outs[0].remote_ts, ["10.1.0.0/24"]);
        assert_eq!(
            (outs[1].phase2.as_str(), outs[1].transform.as_str()),
            ("vpn1-b", "aes256-sha256")
        );
        assert_eq!(outs[1].remote_ts, ["10.11.0.0/16"]);
        let mut routes = Vec::new();
        while let Some(r) = dial.poll_route() {
            routes.push(r);
        }
        assert_eq!(
            routes,
            [
                RouteOp::Add {
                    dest: "10.1.0.0/24".into(),
                    dev: "vpn1".into()
                },
                RouteOp::Add {
                    dest: "10.11.0.0/16".into(),
                    dev: "vpn1".into()
                }
            ]
        );
        let view = dial.gateway_list(now, None);
        assert_eq!(view[0]["children"].as_array().map(|c| c.len()), Some(2));
        // Deleting one CHILD SA removes its route only.
        let spi = hub.sas.values().next().unwrap().sa.child_spis()[1];
        let id = *hub.sas.keys().next().unwrap();
        hub.sas
            .get_mut(&id)
            .unwrap()
            .sa
            .delete_child(now, spi)
            .unwrap();
        hub.pump(id, now);
        shuttle(&mut hub, &mut dial, now);
        assert_eq!(
            dial.poll_route(),
            Some(RouteOp::Del {
                dest: "10.11.0.0/16".into(),
                dev: "vpn1".into()
            })
        );
        assert_eq!(dial.poll_route(), None);
    }

    #[test]
    fn operator_brings_a_tunnel_up_rekeys_it_and_takes_a_phase2_down() {
        let now = Instant::now();
        let hub_text = with_second_phase2(HUB, "hub", "10.11.0.0/16", "10.12.0.0/16").replace(
            "set dhgrp 19\n",
            "set dhgrp 19\n        set auto-negotiate disable\n",
        );
        let mut hub = mgr(&hub_text, now);
        let mut dial = mgr(
            &with_second_phase2(DIAL, "vpn1", "10.12.0.0/16", "10.11.0.0/16"),
            now,
        );
        assert!(
            hub.initiate_pending(now).is_empty(),
            "auto-negotiate disable"
        );
        assert!(hub.tunnel_up(now, "nope", None).is_err());
        assert!(
            dial.tunnel_up(now, "vpn1", None).is_err(),
            "dial-up has no peer yet"
        );
        let up = hub.tunnel_up(now, "hub-b", Some("hub")).unwrap();
        assert_eq!(up.initiated, 1);
        let pending = hub.initiate_pending(now);
        assert_eq!(pending.len(), 1);
        hub.initiate(
            now,
            "hub",
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
        );
        shuttle(&mut hub, &mut dial, now);
        let spis = |m: &IkeManager| {
            let e = m.sas.values().next().unwrap();
            (
                e.sa.spis(),
                e.children.keys().copied().collect::<Vec<u32>>(),
            )
        };
        let (ike0, children0) = spis(&hub);
        assert_eq!(children0.len(), 2);
        // Already up: nothing to do.
        assert_eq!(hub.tunnel_up(now, "hub", None).unwrap().unchanged, 1);

        // CHILD rekey of one phase2: one new SPI, the other phase2 untouched.
        assert_eq!(hub.tunnel_rekey(now, "hub-b", None).unwrap().requested, 1);
        shuttle(&mut hub, &mut dial, now);
        let (_, children1) = spis(&hub);
        assert_eq!(children1.len(), 2);
        assert_eq!(
            children1.iter().filter(|s| children0.contains(s)).count(),
            1
        );

        // IKE rekey from the responder side, by instance name.
        assert_eq!(dial.ike_rekey(now, "vpn1_1").requested, 1);
        shuttle(&mut hub, &mut dial, now);
        let (ike1, _) = spis(&hub);
        assert_ne!(ike0, ike1);
        assert_eq!(spis(&dial).0, ike1);

        // Down: that phase2's CHILD SA goes on both sides, the IKE SA stays.
        assert_eq!(hub.tunnel_down(now, "hub-b", None).unwrap().requested, 1);
        shuttle(&mut hub, &mut dial, now);
        assert_eq!(spis(&hub).1.len(), 1);
        assert_eq!(spis(&dial).1.len(), 1);
        assert_eq!(spis(&dial).0, ike1);
        // Bringing it up again uses CREATE_CHILD_SA on the existing IKE SA.
        let again = hub.tunnel_up(now, "hub-b", None).unwrap();
        assert_eq!((again.initiated, again.requested), (0, 1));
        shuttle(&mut hub, &mut dial, now);
        assert_eq!(spis(&dial).1.len(), 2);
    }

    #[test]
    fn garbage_and_unknown_spis_are_dropped_quietly() {
        let now = Instant::now();
        let mut dial = mgr(DIAL, now);
        let a: SocketAddr = "192.0.2.2:500".parse().unwrap();
        let b: SocketAddr = "192.0.2.9:500".parse().unwrap();
        for d in [&[][..], &[0u8; 27][..], &[0xffu8; 28][..], &[1u8; 200][..]] {
            dial.handle_datagram(now, a, b, d);
        }
        assert!(dial.poll_transmit().is_none());
        assert!(dial.drain_bodies().is_empty());
        assert_eq!(dial.gateway_list(now, None), json!([]));
        // Each one is counted by reason (ops/ATTACKS.md): two shorter than a
        // header, two headers naming an SA we do not have.
        assert_eq!(dial.drops().get("truncated"), Some(&2));
        assert_eq!(dial.drops().get("no_sa"), Some(&2));
    }

    #[test]
    fn attack_unknown_spi_flood_and_forged_sa_traffic_are_counted() {
        // Datagrams for an established SA that fail its checks are counted by
        // the SA layer's reason; a flood of headers with unknown SPIs costs
        // no state and is counted as no_sa.
        let now = Instant::now();
        let mut hub = hub_dialing(now);
        let mut dial = mgr(DIAL, now);
        shuttle(&mut hub, &mut dial, now);
        let a: SocketAddr = "192.0.2.2:500".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:500".parse().unwrap();
        let sa = &dial.sas.values().next().unwrap().sa;
        let ((spi_i, spi_r), (_, mid)) = (sa.spis(), sa.message_ids());
        // An INFORMATIONAL request under the SA's SPIs with a forged SK payload.
        let mut forged = Vec::new();
        forged.extend_from_slice(&spi_i.to_be_bytes());
        forged.extend_from_slice(&spi_r.to_be_bytes());
        forged.extend_from_slice(&[46, 0x20, 37, 0x08]);
        forged.extend_from_slice(&mid.to_be_bytes());
        forged.extend_from_slice(&[0, 0, 0, 28 + 4 + 40]);
        forged.extend_from_slice(&[0, 0, 0, 44]);
        forged.extend_from_slice(&[0x42; 40]);
        for _ in 0..3 {
            dial.handle_datagram(now, a, b, &forged);
        }
        assert_eq!(
            dial.drops().get("integrity"),
            Some(&3),
            "{:?}",
            dial.drops()
        );
        for i in 0..1000u64 {
            let mut d = (0xdead_0000 + i).to_be_bytes().to_vec();
            d.extend_from_slice(&(0xbeef_0000 + i).to_be_bytes());
            d.extend_from_slice(&[0, 0x20, 37, 0x08, 0, 0, 0, 1, 0, 0, 0, 28]);
            dial.handle_datagram(now, a, b, &d);
        }
        assert_eq!(dial.drops().get("no_sa"), Some(&1000));
        assert_eq!(dial.sas.len(), 1);
        assert!(dial.poll_transmit().is_none());
    }

    #[test]
    fn probes_report_sent_and_reply_activity_is_batched_and_dead_peers_are_flushed() {
        let now = Instant::now();
        let mut hub = hub_dialing(now);
        let mut dial = mgr(DIAL, now);
        shuttle(&mut hub, &mut dial, now);
        dial.drain_bodies();
        while dial.poll_route().is_some() {}

        // Authenticated traffic from the peer shows up once as an activity mark.
        let marks = dial.activity(now, 1_000_000_000);
        assert_eq!(marks.len(), 1);
        assert_eq!(marks[0].tunnel, "vpn1_1");
        assert!(
            dial.activity(now, 1_000_000_000).is_empty(),
            "no news, no mark"
        );

        dial.probe(now, "vpn1_1", 7);
        let b = dial.drain_bodies();
        let Some(Body::ProbeResult {
            round: 7,
            outcome,
            msg_id,
            ..
        }) = b.first()
        else {
            panic!("{b:?}")
        };
        assert_eq!(outcome, "sent");
        let sent_id = *msg_id;
        // dpdmon's retry of the round: the very same message, nothing else.
        let first = dial.poll_transmit().expect("probe datagram");
        dial.probe(now + Duration::from_secs(2), "vpn1_1", 7);
        assert!(
            matches!(dial.drain_bodies().first(),
                Some(Body::ProbeResult { round: 7, outcome, msg_id, .. })
                if outcome == "sent" && *msg_id == sent_id),
            "a retry keeps the message ID"
        );
        let again = dial.poll_transmit().expect("retransmission");
        assert_eq!(again.payload, first.payload, "a retry is the same message");
        assert!(dial.poll_transmit().is_none());
        hub.handle_datagram(now, again.destination, again.source, &again.payload);
        shuttle(&mut hub, &mut dial, now);
        let b = dial.drain_bodies();
        assert!(
            b.iter().any(
                |x| matches!(x, Body::ProbeResult { round: 7, outcome, msg_id, .. }
                if outcome == "reply" && *msg_id == sent_id)
            ),
            "{b:?}"
        );
        // A probe for a tunnel that does not exist fails at once.
        dial.probe(now, "vpn1_9", 8);
        assert!(matches!(dial.drain_bodies().first(),
            Some(Body::ProbeResult { outcome, .. }) if outcome == "failed"));

        // dpdmon's verdict: CHILD SAs, route, then the instance go, with no exchange.
        dial.dead_peer(now, "vpn1_1");
        assert!(dial.poll_transmit().is_none());
        let b = dial.drain_bodies();
        assert!(
            matches!(b.first(), Some(Body::ChildSaRemoved { tunnel, .. }) if tunnel == "vpn1_1"),
            "{b:?}"
        );
        assert!(
            matches!(b.last(), Some(Body::TunnelRemoved { name }) if name == "vpn1_1"),
            "{b:?}"
        );
        assert!(matches!(dial.poll_route(), Some(RouteOp::Del { .. })));
        assert_eq!(dial.gateway_list(now, None), json!([]));
    }

    #[test]
    fn half_open_sas_per_source_are_limited_and_released() {
        let now = Instant::now();
        let mut dial = mgr(DIAL, now);
        let limit = GuardConfig::default().max_half_open_per_source;
        let mut hubs: Vec<IkeManager> = Vec::new();
        // More initiators from one address than the limit: only `limit` get an answer.
        for _ in 0..limit + 2 {
            let mut hub = hub_dialing(now);
            let t = hub.poll_transmit().unwrap();
            dial.handle_datagram(now, t.destination, t.source, &t.payload);
            hubs.push(hub);
        }
        let mut answered = 0;
        while dial.poll_transmit().is_some() {
            answered += 1;
        }
        assert_eq!(answered, limit);
        assert_eq!(
            dial.gateway_list(now, None).as_array().unwrap().len(),
            limit
        );
        // Clearing them releases the source.
        dial.clear(now, None);
        while dial.poll_transmit().is_some() {}
        let mut hub = hub_dialing(now);
        shuttle(&mut hub, &mut dial, now);
        assert!(dial
            .drain_bodies()
            .iter()
            .any(|b| matches!(b, Body::Tunnel(t) if t.name == "vpn1_1")));
    }

    /// An IKE_SA_INIT response the driver could not send (no route back to the peer: seen
    /// in the fault run, where the carrier lost its default route) drops its half-open SA
    /// at once, so the source's half-open slots are free when the route comes back and the
    /// peer's next attempt is answered instead of being refused for a minute.
    #[test]
    fn an_unsent_ike_sa_init_response_frees_its_half_open_slot() {
        let now = Instant::now();
        let mut dial = mgr(DIAL, now);
        let limit = GuardConfig::default().max_half_open_per_source;
        // More attempts than the limit from one peer, each answer lost on the way out.
        for _ in 0..limit + 2 {
            let mut hub = hub_dialing(now);
            let t = hub.poll_transmit().unwrap();
            dial.handle_datagram(now, t.destination, t.source, &t.payload);
            let answer = dial.poll_transmit().expect("every attempt is answered");
            assert!(dial.send_failed(now, &answer, "unreachable"));
        }
        assert_eq!(dial.cookie_stats().0, 0, "no half-open SA left");
        assert_eq!(dial.gateway_list(now, None), json!([]));
        assert_eq!(dial.drops().get("half_open_per_source"), None);
        assert_eq!(
            dial.send_errors().get("unreachable").copied(),
            Some(limit as u64 + 2)
        );
        // The route is back: the next attempt completes.
        let mut hub = hub_dialing(now);
        shuttle(&mut hub, &mut dial, now);
        assert!(dial
            .drain_bodies()
            .iter()
            .any(|b| matches!(b, Body::Tunnel(t) if t.name == "vpn1_1")));
        // A failed send of anything else (an established SA's message) drops nothing.
        let mut probe = None;
        dial.drain_bodies();
        dial.probe(now, "vpn1_1", 1);
        while let Some(t) = dial.poll_transmit() {
            probe = Some(t);
        }
        let probe = probe.expect("a DPD probe to send");
        assert!(!dial.send_failed(now, &probe, "unreachable"));
        assert_eq!(dial.gateway_list(now, None).as_array().unwrap().len(), 1);
    }
}
