//! strongSwan (charon + swanctl) as a reference peer, one daemon per network namespace.
//!
//! What it does: [`Charon::start`] runs `/usr/lib/ipsec/charon` inside a [`Netns`] with its own
//! `strongswan.conf`, vici socket, log file and private `/run`, all in a [`ScratchDir`];
//! [`SwanctlConf`] / [`Conn`] / [`ChildCfg`] render a `swanctl.conf` (PSK auth, or certificates
//! with [`Conn::pubkey`] and files the caller puts in the credential folders); the
//! `Charon` methods wrap `swanctl` (load, initiate, terminate, rekey, list SAs) and parse
//! `--list-sas --pretty` into [`IkeSa`] / [`ChildSa`]. Dropping a `Charon` kills the daemon
//! (the namespace's own drop kills anything else left in it).
//!
//! What it does not do: make certificates, EAP, IKEv1, virtual IPs, transport mode through
//! kernel-libipsec (untested), or any talk to the vici socket other than through `swanctl`.
//!
//! # How charon is run here (see also /work/shared/INTEROP.md)
//! The kernel has no ESP, so ESP runs in user space in the `kernel-libipsec` plugin, which only
//! speaks ESP in UDP: every connection renders `encap = yes` unless told otherwise. The load list
//! names `kdf` (else IKE key derivation fails) and `kernel-libipsec` before `kernel-netlink`
//! (else SA install fails with ENOSYS). Each daemon gets `STRONGSWAN_CONF` in its environment
//! (`ip netns exec` and `unshare` pass the environment on), a vici socket in its scratch
//! directory, and a tmpfs on `/run` inside `unshare -m` so pid files of several daemons do not
//! collide. The ESP traffic leaves through the `ipsec0` TUN device, with routes in table 220.
//!
//! # Traps found while writing this module (beyond INTEROP.md)
//! 1. `swanctl --load-all --file DIR/swanctl.conf` looks for credential folders (`x509`,
//!    `private`, `pkcs12`, …) next to the file and prints an error per missing folder on stderr;
//!    [`Charon::start`] creates them empty.
//! 2. The filelog stays empty for a while unless `flush_line = yes` is set in the logger; it is
//!    set here, so [`Charon::log`] shows the live log (INTEROP.md gotcha 5).
//! 3. After SIGKILL the vici socket file stays behind, so "socket exists" does not mean "daemon
//!    ready": start removes the old socket and waits until `swanctl --stats` answers.
//! 4. `--list-sas --raw` prints values with spaces unquoted (identities such as distinguished
//!    names), so it cannot be split reliably; `--pretty` puts one `key = value` per line and is
//!    what [`parse_list_sas`] reads.
//! 5. The PSK is rendered as `0x<hex>` in `secrets`, so no quoting or escaping of the secret is
//!    ever needed and the bytes are exactly those given.
//! 6. Every swanctl command, even `--version`, first connects to the default vici socket
//!    (`/var/run/charon.vici`) and fails without a daemon there; [`preflight`] probes with
//!    `swanctl --help`, the one that does not.
//! 7. `swanctl --initiate --timeout N` gives up waiting after N seconds ("initiate failed:
//!    CHILD_SA '…' not established after …ms") but does not cancel the attempt: the IKE SA stays
//!    `CONNECTING` and charon goes on retransmitting. Call [`Charon::terminate_ike`] to stop it.

use std::fmt::Write as _;
use std::fmt::{self, Display};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::netns::{self, Netns, Proc, ScratchDir};

/// Where Debian installs the IKE daemon; `HAVEN_CHARON` overrides it.
pub const CHARON_PATH: &str = "/usr/lib/ipsec/charon";

/// How long [`Charon::start`] waits for the daemon to answer on its vici socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Timeout for swanctl commands that should answer at once (load, list).
const SWANCTL_TIMEOUT: Duration = Duration::from_secs(20);

/// Plugins to load; order matters (module doc).
const LOAD: &str = "random nonce openssl kdf pem pkcs1 x509 revocation constraints pubkey \
                    socket-default kernel-libipsec kernel-netlink vici updown";

/// Credential folders swanctl looks for next to `swanctl.conf` (trap 1).
const CRED_DIRS: &[&str] = &[
    "x509", "x509ca", "x509ocsp", "x509aa", "x509ac", "x509crl", "pubkey", "private", "rsa",
    "ecdsa", "bliss", "pkcs8", "pkcs12",
];

/// Errors from running strongSwan.
#[derive(Debug)]
pub enum Error {
    /// Namespace or command trouble (includes swanctl exiting non-zero: see its output there).
    Netns(netns::Error),
    /// The config builder refused a value (one that would break the swanctl.conf syntax).
    Config(String),
    /// charon did not come up, or died.
    Daemon(String),
    /// swanctl output not understood.
    Parse(String),
    /// A wait for SA state ran out.
    Timeout(String),
}

impl Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Netns(e) => write!(f, "{e}"),
            Error::Config(m) => write!(f, "swanctl.conf: {m}"),
            Error::Daemon(m) => write!(f, "charon: {m}"),
            Error::Parse(m) => write!(f, "parsing swanctl output: {m}"),
            Error::Timeout(m) => write!(f, "timed out: {m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Netns(e) => Some(e),
            _ => None,
        }
    }
}

impl From<netns::Error> for Error {
    fn from(e: netns::Error) -> Self {
        Error::Netns(e)
    }
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn charon_path() -> PathBuf {
    std::env::var_os("HAVEN_CHARON")
        .map(PathBuf::from)
        .unwrap_or_else(|| CHARON_PATH.into())
}

/// Checks everything [`Charon`] needs: root and `ip` ([`netns::preflight`]), the charon binary,
/// `swanctl`, `unshare` and `/dev/net/tun`. Fails with one clear message naming what is missing.
pub fn preflight() -> Result<()> {
    netns::preflight()?;
    let charon = charon_path();
    if !charon.is_file() {
        return Err(netns::Error::Environment(format!(
            "no charon at {} (Debian package strongswan-charon; HAVEN_CHARON overrides the path)",
            charon.display()
        ))
        .into());
    }
    netns::require_tool("swanctl", &["--help"], "strongswan-swanctl")?;
    netns::require_tool("unshare", &["--version"], "util-linux")?;
    if !Path::new("/dev/net/tun").exists() {
        return Err(netns::Error::Environment(
            "no /dev/net/tun: kernel-libipsec needs a TUN device".into(),
        )
        .into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// swanctl.conf builder
// ---------------------------------------------------------------------------------------------

/// What charon does with a CHILD config when it is loaded (`start_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAction {
    /// Wait to be initiated or for the peer (`none`, the default).
    None,
    /// Install a trap policy; traffic triggers negotiation (`trap`).
    Trap,
    /// Initiate at once on load (`start`).
    Start,
}

/// What charon does with a CHILD when DPD declares the peer dead, or the peer closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    Clear,
    Trap,
    /// `restart` (renamed `start` in later strongSwan; 5.9 takes `restart`).
    Restart,
}

/// IPsec mode of a CHILD SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tunnel,
    Transport,
}

impl StartAction {
    fn as_str(self) -> &'static str {
        match self {
            StartAction::None => "none",
            StartAction::Trap => "trap",
            StartAction::Start => "start",
        }
    }
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::None => "none",
            Action::Clear => "clear",
            Action::Trap => "trap",
            Action::Restart => "restart",
        }
    }
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Tunnel => "tunnel",
            Mode::Transport => "transport",
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// One CHILD SA config (`connections.<conn>.children.<name>`). Unset options keep
/// strongSwan's defaults, except `mode`, which is always written (`tunnel` unless changed).
#[derive(Debug, Clone)]
pub struct ChildCfg {
    name: String,
    settings: Vec<(String, String)>,
}

impl ChildCfg {
    /// A tunnel-mode CHILD between two traffic selectors (CIDR lists, e.g. `10.99.1.0/24`).
    pub fn new(name: &str, local_ts: &str, remote_ts: &str) -> ChildCfg {
        ChildCfg {
            name: name.into(),
            settings: Vec::new(),
        }
        .set("local_ts", local_ts)
        .set("remote_ts", remote_ts)
        .set("mode", Mode::Tunnel.as_str())
    }

    /// Sets any `key = value` of the CHILD section (replacing an earlier value for `key`).
    pub fn set(mut self, key: &str, value: &str) -> ChildCfg {
        set_in(&mut self.settings, key, value);
        self
    }

    /// ESP proposals, e.g. `["aes128gcm16"]` or `["aes128gcm16-x25519"]` (with PFS).
    pub fn esp_proposals(self, proposals: &[&str]) -> ChildCfg {
        self.set("esp_proposals", &proposals.join(","))
    }

    /// `rekey_time` (zero disables rekeying).
    pub fn rekey_time(self, d: Duration) -> ChildCfg {
        self.set("rekey_time", &secs(d))
    }

    /// `life_time`: hard expiry.
    pub fn life_time(self, d: Duration) -> ChildCfg {
        self.set("life_time", &secs(d))
    }

    /// `rand_time`: random jitter subtracted from `rekey_time` (zero for exact timing).
    pub fn rand_time(self, d: Duration) -> ChildCfg {
        self.set("rand_time", &secs(d))
    }

    /// `start_action`.
    pub fn start_action(self, a: StartAction) -> ChildCfg {
        self.set("start_action", a.as_str())
    }

    /// `dpd_action`.
    pub fn dpd_action(self, a: Action) -> ChildCfg {
        self.set("dpd_action", a.as_str())
    }

    /// `close_action`.
    pub fn close_action(self, a: Action) -> ChildCfg {
        self.set("close_action", a.as_str())
    }

    /// `mode`.
    pub fn mode(self, m: Mode) -> ChildCfg {
        self.set("mode", m.as_str())
    }
}

/// One IKE connection (`connections.<name>`) with PSK authentication on both sides.
#[derive(Debug, Clone)]
pub struct Conn {
    name: String,
    settings: Vec<(String, String)>,
    local_id: String,
    remote_id: String,
    psk: Vec<u8>,
    children: Vec<ChildCfg>,
    /// IKE `rekey_time` and hard lifetime, kept to derive `over_time` when rendering.
    rekey: Option<Duration>,
    life: Option<Duration>,
    /// Certificate auth: our certificate's file name in the daemon's `x509/` folder.
    cert: Option<String>,
}

/// strongSwan's default IKE `rekey_time` (4 h), used to derive `over_time` from a lifetime.
const DEFAULT_IKE_REKEY: Duration = Duration::from_secs(4 * 3600);

impl Conn {
    /// An IKEv2 connection between two addresses (or `%any` for the remote side of a
    /// responder), PSK auth, `encap = yes`. Identities default to the addresses.
    pub fn psk(name: &str, local_addr: &str, remote_addr: &str, psk: &[u8]) -> Conn {
        let conn = Conn {
            name: name.into(),
            settings: Vec::new(),
            local_id: local_addr.into(),
            remote_id: remote_addr.into(),
            psk: psk.to_vec(),
            children: Vec::new(),
            rekey: None,
            life: None,
            cert: None,
        };
        conn.set("version", "2")
            .set("local_addrs", local_addr)
            .set("remote_addrs", remote_addr)
            .set("encap", "yes")
    }

    /// Sets any `key = value` of the connection section (replacing an earlier value for `key`).
    pub fn set(mut self, key: &str, value: &str) -> Conn {
        set_in(&mut self.settings, key, value);
        self
    }

    /// Local and remote IKE identities (e.g. `gwa@haven.test`, or an address).
    pub fn ids(mut self, local: &str, remote: &str) -> Conn {
        self.local_id = local.into();
        self.remote_id = remote.into();
        self
    }

    /// IKE proposals, e.g. `["aes128gcm16-prfsha256-x25519"]`.
    pub fn proposals(self, proposals: &[&str]) -> Conn {
        self.set("proposals", &proposals.join(","))
    }

    /// `encap`: force UDP encapsulation (on by default; kernel-libipsec needs it).
    pub fn encap(self, on: bool) -> Conn {
        self.set("encap", if on { "yes" } else { "no" })
    }

    /// `local_port` / `remote_port` for IKE (500 and 4500 float apply otherwise).
    pub fn ports(self, local: u16, remote: u16) -> Conn {
        self.set("local_port", &local.to_string())
            .set("remote_port", &remote.to_string())
    }

    /// `dpd_delay`: interval of liveness checks when no traffic was seen.
    pub fn dpd_delay(self, d: Duration) -> Conn {
        self.set("dpd_delay", &secs(d))
    }

    /// IKE `rekey_time` (zero disables IKE rekeying).
    pub fn rekey_time(mut self, d: Duration) -> Conn {
        self.rekey = Some(d);
        self.set("rekey_time", &secs(d))
    }

    /// IKE `over_time`: how long past `rekey_time` (or `reauth_time`) the IKE SA may live.
    pub fn over_time(self, d: Duration) -> Conn {
        self.set("over_time", &secs(d))
    }

    /// IKE hard lifetime. swanctl has no `life_time` for IKE SAs, so rendering writes
    /// `over_time = life - rekey_time` (strongSwan's default `rekey_time`, 4 h, if unset),
    /// replacing any [`Conn::over_time`].
    pub fn life_time(mut self, life: Duration) -> Conn {
        self.life = Some(life);
        self
    }

    /// IKE `rand_time` (zero for exact timing).
    pub fn rand_time(self, d: Duration) -> Conn {
        self.set("rand_time", &secs(d))
    }

    /// Certificate authentication both ways (`auth = pubkey`) instead of the PSK: `cert_file`
    /// is our certificate in the daemon's `x509/` folder (see [`Charon::dir`]); its private key
    /// goes in `private/` and trusted CAs in `x509ca/`, which `--load-all` reads.
    pub fn pubkey(mut self, cert_file: &str) -> Conn {
        self.cert = Some(cert_file.into());
        self
    }

    /// Adds a CHILD config.
    pub fn child(mut self, child: ChildCfg) -> Conn {
        self.children.push(child);
        self
    }

    /// The connection name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn set_in(settings: &mut Vec<(String, String)>, key: &str, value: &str) {
    match settings.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value.into(),
        None => settings.push((key.into(), value.into())),
    }
}

/// A whole `swanctl.conf`: connections and their PSKs.
#[derive(Debug, Clone, Default)]
pub struct SwanctlConf {
    conns: Vec<Conn>,
}

/// Names of sections: what swanctl accepts unquoted.
fn check_name(what: &str, s: &str) -> Result<()> {
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(Error::Config(format!(
            "{what} {s:?} must be non-empty [A-Za-z0-9._-]"
        )));
    }
    Ok(())
}

/// Values: anything that cannot end the line or open/close a section or a string.
fn check_value(key: &str, v: &str) -> Result<()> {
    if v.is_empty() || v.chars().any(|c| c.is_control() || "{}\"#".contains(c)) {
        return Err(Error::Config(format!(
            "value {v:?} for {key} must be non-empty without control characters, braces, quotes or '#'"
        )));
    }
    Ok(())
}

impl SwanctlConf {
    /// An empty configuration.
    pub fn new() -> SwanctlConf {
        SwanctlConf::default()
    }

    /// Adds a connection.
    pub fn conn(mut self, conn: Conn) -> SwanctlConf {
        self.conns.push(conn);
        self
    }

    /// The text of `swanctl.conf`, or [`Error::Config`] if a name or value would break it.
    pub fn render(&self) -> Result<String> {
        let mut s = String::from("connections {\n");
        for c in &self.conns {
            check_name("connection name", &c.name)?;
            let _ = writeln!(s, "  {} {{", c.name);
            let mut settings = c.settings.clone();
            if let Some(life) = c.life {
                let over = life.saturating_sub(c.rekey.unwrap_or(DEFAULT_IKE_REKEY));
                set_in(&mut settings, "over_time", &secs(over));
            }
            for (k, v) in &settings {
                check_name("key", k)?;
                check_value(k, v)?;
                let _ = writeln!(s, "    {k} = {v}");
            }
            check_value("local id", &c.local_id)?;
            check_value("remote id", &c.remote_id)?;
            match &c.cert {
                None => {
                    let _ = writeln!(
                        s,
                        "    local {{\n      auth = psk\n      id = {}\n    }}",
                        c.local_id
                    );
                    let _ = writeln!(
                        s,
                        "    remote {{\n      auth = psk\n      id = {}\n    }}",
                        c.remote_id
                    );
                }
                Some(file) => {
                    check_value("certs", file)?;
                    let _ = writeln!(
                        s,
                        "    local {{\n      auth = pubkey\n      certs = {file}\n      id = {}\n    }}",
                        c.local_id
                    );
                    let _ = writeln!(
                        s,
                        "    remote {{\n      auth = pubkey\n      id = {}\n    }}",
                        c.remote_id
                    );
                }
            }
            s.push_str("    children {\n");
            for ch in &c.children {
                check_name("child name", &ch.name)?;
                let _ = writeln!(s, "      {} {{", ch.name);
                for (k, v) in &ch.settings {
                    check_name("key", k)?;
                    check_value(k, v)?;
                    let _ = writeln!(s, "        {k} = {v}");
                }
                s.push_str("      }\n");
            }
            s.push_str("    }\n  }\n");
        }
        s.push_str("}\nsecrets {\n");
        for c in self.conns.iter().filter(|c| c.cert.is_none()) {
            if c.psk.is_empty() {
                return Err(Error::Config(format!(
                    "connection {} has an empty PSK",
                    c.name
                )));
            }
            let hex: String = c.psk.iter().map(|b| format!("{b:02x}")).collect();
            let _ = writeln!(
                s,
                "  ike-{} {{\n    id-local = {}\n    id-remote = {}\n    secret = 0x{hex}\n  }}",
                c.name, c.local_id, c.remote_id
            );
        }
        s.push_str("}\n");
        Ok(s)
    }
}

// ---------------------------------------------------------------------------------------------
// `swanctl --list-sas --pretty` parsing
// ---------------------------------------------------------------------------------------------

/// A node of swanctl's pretty-printed vici message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Value(String),
    List(Vec<String>),
    Section(Vec<(String, Node)>),
}

/// Parses swanctl `--pretty` output into its top-level sections (`list-sa event`, …).
pub fn parse_pretty(text: &str) -> Result<Vec<(String, Node)>> {
    // Stack of open sections; the bottom one collects the top level.
    let mut stack: Vec<(String, Vec<(String, Node)>)> = vec![(String::new(), Vec::new())];
    let mut list: Option<(String, Vec<String>)> = None;
    for (no, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some((key, items)) = list.as_mut() {
            if line == "]" {
                let node = Node::List(std::mem::take(items));
                let key = std::mem::take(key);
                list = None;
                push(&mut stack, key, node, no)?;
            } else {
                items.push(line.to_string());
            }
            continue;
        }
        if line == "}" {
            if stack.len() < 2 {
                return Err(Error::Parse(format!("line {}: unbalanced '}}'", no + 1)));
            }
            let (name, body) = stack
                .pop()
                .ok_or_else(|| Error::Parse("empty stack".into()))?;
            push(&mut stack, name, Node::Section(body), no)?;
        } else if let Some((k, v)) = line.split_once(" = ") {
            if v == "[" {
                list = Some((k.to_string(), Vec::new()));
            } else {
                push(&mut stack, k.to_string(), Node::Value(v.to_string()), no)?;
            }
        } else if let Some(k) = line.strip_suffix('=') {
            // An empty value prints as "key =" after trimming.
            push(
                &mut stack,
                k.trim().to_string(),
                Node::Value(String::new()),
                no,
            )?;
        } else if let Some(name) = line.strip_suffix('{') {
            stack.push((name.trim().to_string(), Vec::new()));
        } else {
            return Err(Error::Parse(format!(
                "line {}: unexpected {line:?}",
                no + 1
            )));
        }
    }
    if list.is_some() || stack.len() != 1 {
        return Err(Error::Parse("output ends inside a section or list".into()));
    }
    Ok(stack.pop().map(|(_, body)| body).unwrap_or_default())
}

fn push(stack: &mut [(String, Vec<(String, Node)>)], k: String, n: Node, no: usize) -> Result<()> {
    match stack.last_mut() {
        Some((_, body)) => {
            body.push((k, n));
            Ok(())
        }
        None => Err(Error::Parse(format!("line {}: nothing open", no + 1))),
    }
}

/// Scalar fields of a section, with list fields joined by spaces.
fn scalars(body: &[(String, Node)]) -> Vec<(String, String)> {
    body.iter()
        .filter_map(|(k, n)| match n {
            Node::Value(v) => Some((k.clone(), v.clone())),
            Node::List(items) => Some((k.clone(), items.join(" "))),
            Node::Section(_) => None,
        })
        .collect()
}

fn list_of(body: &[(String, Node)], key: &str) -> Vec<String> {
    body.iter()
        .find_map(|(k, n)| match n {
            Node::List(items) if k == key => Some(items.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn lookup<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A hexadecimal SPI field; zero while absent (an SA still being negotiated), an error if
/// present but not hexadecimal.
fn hex_field<T: Default>(
    fields: &[(String, String)],
    key: &str,
    from: fn(&str, u32) -> Result<T, std::num::ParseIntError>,
) -> Result<T> {
    match lookup(fields, key) {
        None => Ok(T::default()),
        Some(v) => from(v, 16).map_err(|e| Error::Parse(format!("{key} = {v:?}: {e}"))),
    }
}

/// One CHILD SA as `swanctl --list-sas` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildSa {
    /// Config name (the `name` field; the section key is `<name>-<uniqueid>`).
    pub name: String,
    /// `INSTALLED`, `REKEYING`, `REKEYED`, `DELETING`, …
    pub state: String,
    /// Inbound SPI (the one this side chose); zero until known.
    pub spi_in: u32,
    /// Outbound SPI (the peer's inbound SPI); zero until known.
    pub spi_out: u32,
    /// Encryption algorithm, e.g. `AES_GCM_16` (absent while negotiating).
    pub encr_alg: Option<String>,
    /// Key size in bits, when the algorithm has one.
    pub encr_keysize: Option<u32>,
    /// Integrity algorithm (absent for AEAD).
    pub integ_alg: Option<String>,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
    /// Every scalar field as printed (lists joined by spaces).
    pub fields: Vec<(String, String)>,
}

impl ChildSa {
    /// Any field by its vici name, e.g. `packets-in`, `mode`, `encap`.
    pub fn get(&self, key: &str) -> Option<&str> {
        lookup(&self.fields, key)
    }

    /// A numeric field (counters, times), if present and numeric.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.parse().ok())
    }

    fn from_section(body: &[(String, Node)]) -> Result<ChildSa> {
        let fields = scalars(body);
        let need = |k: &str| {
            lookup(&fields, k)
                .map(str::to_string)
                .ok_or_else(|| Error::Parse(format!("CHILD_SA without {k}")))
        };
        Ok(ChildSa {
            name: need("name")?,
            state: need("state")?,
            spi_in: hex_field(&fields, "spi-in", u32::from_str_radix)?,
            spi_out: hex_field(&fields, "spi-out", u32::from_str_radix)?,
            encr_alg: lookup(&fields, "encr-alg").map(str::to_string),
            encr_keysize: lookup(&fields, "encr-keysize").and_then(|v| v.parse().ok()),
            integ_alg: lookup(&fields, "integ-alg").map(str::to_string),
            local_ts: list_of(body, "local-ts"),
            remote_ts: list_of(body, "remote-ts"),
            fields,
        })
    }
}

/// One IKE SA as `swanctl --list-sas` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IkeSa {
    /// Connection name.
    pub name: String,
    /// charon's unique id of this IKE SA.
    pub unique_id: u32,
    /// `CONNECTING`, `ESTABLISHED`, `REKEYING`, `DELETING`, …
    pub state: String,
    /// True on the side that initiated this IKE SA.
    pub initiator: bool,
    pub initiator_spi: u64,
    /// Zero until the responder has answered.
    pub responder_spi: u64,
    pub local_host: String,
    pub remote_host: String,
    pub local_id: String,
    pub remote_id: String,
    /// Negotiated algorithms (absent while connecting).
    pub encr_alg: Option<String>,
    pub encr_keysize: Option<u32>,
    pub integ_alg: Option<String>,
    pub prf_alg: Option<String>,
    pub dh_group: Option<String>,
    pub children: Vec<ChildSa>,
    /// Every scalar field as printed.
    pub fields: Vec<(String, String)>,
}

impl IkeSa {
    /// Any field by its vici name, e.g. `local-port`, `nat-remote`, `rekey-time`.
    pub fn get(&self, key: &str) -> Option<&str> {
        lookup(&self.fields, key)
    }

    /// The first CHILD SA with config name `name`.
    pub fn child(&self, name: &str) -> Option<&ChildSa> {
        self.children.iter().find(|c| c.name == name)
    }

    /// `(initiator SPI, responder SPI)`: equal on both peers of one IKE SA.
    pub fn spis(&self) -> (u64, u64) {
        (self.initiator_spi, self.responder_spi)
    }

    fn from_section(name: &str, body: &[(String, Node)]) -> Result<IkeSa> {
        let fields = scalars(body);
        let need = |k: &str| {
            lookup(&fields, k)
                .map(str::to_string)
                .ok_or_else(|| Error::Parse(format!("IKE_SA {name} without {k}")))
        };
        let opt = |k: &str| lookup(&fields, k).map(str::to_string);
        let mut children = Vec::new();
        for (k, n) in body {
            if let (true, Node::Section(sas)) = (k == "child-sas", n) {
                for (_, child) in sas {
                    if let Node::Section(cb) = child {
                        children.push(ChildSa::from_section(cb)?);
                    }
                }
            }
        }
        Ok(IkeSa {
            name: name.to_string(),
            unique_id: need("uniqueid")?
                .parse()
                .map_err(|e| Error::Parse(format!("uniqueid: {e}")))?,
            state: need("state")?,
            initiator: lookup(&fields, "initiator") == Some("yes"),
            initiator_spi: hex_field(&fields, "initiator-spi", u64::from_str_radix)?,
            responder_spi: hex_field(&fields, "responder-spi", u64::from_str_radix)?,
            local_host: need("local-host")?,
            remote_host: need("remote-host")?,
            local_id: opt("local-id").unwrap_or_default(),
            remote_id: opt("remote-id").unwrap_or_default(),
            encr_alg: opt("encr-alg"),
            encr_keysize: lookup(&fields, "encr-keysize").and_then(|v| v.parse().ok()),
            integ_alg: opt("integ-alg"),
            prf_alg: opt("prf-alg"),
            dh_group: opt("dh-group"),
            children,
            fields,
        })
    }
}

/// Parses `swanctl --list-sas --pretty` output.
pub fn parse_list_sas(text: &str) -> Result<Vec<IkeSa>> {
    let mut out = Vec::new();
    for (k, n) in parse_pretty(text)? {
        if let (true, Node::Section(body)) = (k == "list-sa event", &n) {
            for (name, ike) in body {
                if let Node::Section(ib) = ike {
                    out.push(IkeSa::from_section(name, ib)?);
                }
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// A charon daemon running in a namespace. Dropping it kills the daemon and removes its files
/// (kept if the thread is panicking; see [`ScratchDir`]).
#[derive(Debug)]
pub struct Charon {
    // Field order is drop order: the daemon dies before its directory and namespace go.
    proc: Option<Proc>,
    dir: ScratchDir,
    ns: Netns,
    /// Extra lines for the `charon { }` section.
    extra: String,
    /// The last config given to [`Charon::load`], reloaded by [`Charon::restart`].
    conf: Option<SwanctlConf>,
}

impl Charon {
    /// Starts charon in `ns` with the settings of the module doc.
    pub fn start(ns: &Netns) -> Result<Charon> {
        Charon::start_with(ns, "")
    }

    /// Like [`Charon::start`], with extra lines for the `charon { }` section of
    /// `strongswan.conf`, e.g. `"retransmit_tries = 2\nretransmit_timeout = 1"`.
    pub fn start_with(ns: &Netns, extra_charon_settings: &str) -> Result<Charon> {
        let dir = ScratchDir::new(&format!("charon-{}", ns.label()))?;
        for d in CRED_DIRS {
            let p = dir.path().join(d);
            std::fs::create_dir(&p).map_err(|source| netns::Error::Io {
                what: format!("creating {}", p.display()),
                source,
            })?;
        }
        let mut charon = Charon {
            proc: None,
            dir,
            ns: ns.clone(),
            extra: extra_charon_settings.to_string(),
            conf: None,
        };
        charon.write(&charon.conf_path(), &charon.strongswan_conf())?;
        charon.launch()?;
        Ok(charon)
    }

    fn strongswan_conf(&self) -> String {
        let d = self.dir.path().display();
        format!(
            "charon {{\n  load = {LOAD}\n  filelog {{\n    log {{\n      path = {d}/charon.log\n      \
             default = 1\n      ike = 2\n      cfg = 2\n      flush_line = yes\n      \
             time_format = %T\n    }}\n  }}\n  plugins {{\n    vici {{\n      socket = {uri}\n    \
             }}\n  }}\n  install_routes = yes\n{extra}\n}}\n",
            uri = self.vici_uri(),
            extra = self.extra,
        )
    }

    fn write(&self, path: &Path, text: &str) -> Result<()> {
        std::fs::write(path, text).map_err(|source| {
            netns::Error::Io {
                what: format!("writing {}", path.display()),
                source,
            }
            .into()
        })
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.path().join("strongswan.conf")
    }

    fn socket_path(&self) -> PathBuf {
        self.dir.path().join("charon.vici")
    }

    /// The daemon's files: `strongswan.conf`, `swanctl.conf`, `charon.log`, `charon.out`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The namespace it runs in.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// `unix://…` URI of its vici socket, for `swanctl --uri`.
    pub fn vici_uri(&self) -> String {
        format!("unix://{}", self.socket_path().display())
    }

    /// The daemon's log so far (`charon.log`, line-flushed), empty if none yet.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("charon.log")).unwrap_or_default()
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.id())
    }

    /// True while the daemon process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.is_running())
    }

    fn launch(&mut self) -> Result<()> {
        let sock = self.socket_path();
        match std::fs::remove_file(&sock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(netns::Error::Io {
                    what: format!("removing {}", sock.display()),
                    source,
                }
                .into())
            }
        }
        let out_path = self.dir.path().join("charon.out");
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| netns::Error::Io {
                    what: format!("opening {}", p.display()),
                    source,
                })
        };
        let out = open(&out_path)?;
        let err = out.try_clone().map_err(|source| netns::Error::Io {
            what: "dup".into(),
            source,
        })?;
        let mut cmd = self.ns.command("unshare");
        // `$0` is charon: its path never enters the script text.
        cmd.args(["-m", "sh", "-c", "mount -t tmpfs none /run && exec \"$0\""])
            .arg(charon_path())
            .env("STRONGSWAN_CONF", self.conf_path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        self.proc = Some(self.ns.spawn_command(cmd)?);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !self.is_running() {
                return Err(Error::Daemon(format!(
                    "exited during start; output: {}; log: {}",
                    std::fs::read_to_string(&out_path)
                        .unwrap_or_default()
                        .trim(),
                    tail(&self.log(), 10)
                )));
            }
            if sock.exists() && self.swanctl(&["--stats"]).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Daemon(format!(
                    "no answer on {} within {START_TIMEOUT:?}; log: {}",
                    self.vici_uri(),
                    tail(&self.log(), 10)
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `swanctl ARGS --uri <this daemon>` and returns stdout, or an error carrying
    /// swanctl's output when it exits non-zero.
    pub fn swanctl(&self, args: &[&str]) -> Result<String> {
        self.swanctl_timeout(args, SWANCTL_TIMEOUT)
    }

    fn swanctl_timeout(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let mut cmd = Command::new("swanctl");
        cmd.args(args).arg("--uri").arg(self.vici_uri());
        Ok(netns::checked(&mut cmd, timeout)?)
    }

    /// Writes `conf` as this daemon's `swanctl.conf` and loads it (`--load-all`). It is
    /// remembered and loaded again by [`Charon::restart`].
    pub fn load(&mut self, conf: &SwanctlConf) -> Result<String> {
        self.write(&self.dir.path().join("swanctl.conf"), &conf.render()?)?;
        self.conf = Some(conf.clone());
        self.load_all()
    }

    /// `swanctl --load-all` of the `swanctl.conf` already written.
    pub fn load_all(&self) -> Result<String> {
        let file = self.dir.path().join("swanctl.conf");
        let file = file.to_string_lossy();
        self.swanctl(&["--load-all", "--file", &file])
    }

    /// Initiates CHILD `child` (and its IKE SA if needed); waits up to `timeout` for the result.
    /// Returns swanctl's streamed log on success.
    pub fn initiate(&self, child: &str, timeout: Duration) -> Result<String> {
        self.with_timeout(&["--initiate", "--child", child], timeout)
    }

    /// Initiates only IKE SA `ike`.
    pub fn initiate_ike(&self, ike: &str, timeout: Duration) -> Result<String> {
        self.with_timeout(&["--initiate", "--ike", ike], timeout)
    }

    /// Closes CHILD SAs of config `child` (sends the DELETE, waits for the answer).
    pub fn terminate_child(&self, child: &str, timeout: Duration) -> Result<String> {
        self.with_timeout(&["--terminate", "--child", child], timeout)
    }

    /// Closes IKE SAs of connection `ike` and their CHILD SAs.
    pub fn terminate_ike(&self, ike: &str, timeout: Duration) -> Result<String> {
        self.with_timeout(&["--terminate", "--ike", ike], timeout)
    }

    /// Rekeys CHILD SAs of config `child`.
    pub fn rekey_child(&self, child: &str) -> Result<String> {
        self.swanctl(&["--rekey", "--child", child])
    }

    /// Rekeys IKE SAs of connection `ike`.
    pub fn rekey_ike(&self, ike: &str) -> Result<String> {
        self.swanctl(&["--rekey", "--ike", ike])
    }

    fn with_timeout(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let t = timeout.as_secs().max(1).to_string();
        let mut all = args.to_vec();
        all.extend(["--timeout", &t]);
        // swanctl detaches by itself after `t`; the process timeout is only a backstop.
        self.swanctl_timeout(&all, timeout + Duration::from_secs(10))
    }

    /// All IKE SAs with their CHILD SAs.
    pub fn list_sas(&self) -> Result<Vec<IkeSa>> {
        parse_list_sas(&self.swanctl(&["--list-sas", "--pretty"])?)
    }

    /// Polls [`Charon::list_sas`] until `done` holds, for up to `timeout`; returns that list.
    pub fn wait_sas(
        &self,
        timeout: Duration,
        done: impl Fn(&[IkeSa]) -> bool,
    ) -> Result<Vec<IkeSa>> {
        let deadline = Instant::now() + timeout;
        loop {
            let sas = self.list_sas()?;
            if done(&sas) {
                return Ok(sas);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "SA condition not met within {timeout:?} in {}; SAs now: {sas:?}",
                    self.ns.name()
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until an IKE SA of `conn` is `ESTABLISHED` with CHILD `child` `INSTALLED`.
    pub fn wait_child_installed(
        &self,
        conn: &str,
        child: &str,
        timeout: Duration,
    ) -> Result<IkeSa> {
        let up = |ike: &IkeSa| {
            ike.name == conn
                && ike.state == "ESTABLISHED"
                && ike
                    .children
                    .iter()
                    .any(|c| c.name == child && c.state == "INSTALLED")
        };
        let sas = self.wait_sas(timeout, |sas| sas.iter().any(up))?;
        sas.into_iter()
            .find(up)
            .ok_or_else(|| Error::Timeout(format!("{conn}/{child} vanished")))
    }

    /// SIGKILLs the daemon (no DELETE is sent: the peer sees it vanish). Its SAs and `ipsec0`
    /// go with it.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.kill_now()?;
        }
        Ok(())
    }

    /// Kills the daemon if it runs, starts it again with the same files, and reloads the last
    /// config given to [`Charon::load`].
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.launch()?;
        if self.conf.is_some() {
            self.load_all()?;
        }
        Ok(())
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRETTY: &str = "list-sa event {
  gw {
    uniqueid = 3
    version = 2
    state = ESTABLISHED
    local-host = 172.31.0.2
    local-port = 4500
    local-id = C=CH, O=Test, CN=gw b
    remote-host = 172.31.0.1
    remote-port = 4500
    remote-id = gwa@haven.test
    initiator-spi = dce34fa3f1af8fd4
    responder-spi = bab186b95ab7d2eb
    encr-alg = AES_GCM_16
    encr-keysize = 128
    prf-alg = PRF_HMAC_SHA2_256
    dh-group = CURVE_25519
    child-sas {
      net-1 {
        name = net
        uniqueid = 1
        reqid = 1
        state = INSTALLED
        mode = TUNNEL
        protocol = ESP
        encap = yes
        spi-in = c241db63
        spi-out = e334ead5
        encr-alg = AES_GCM_16
        encr-keysize = 128
        packets-in = 7
        local-ts = [
          10.99.2.0/24
        ]
        remote-ts = [
          10.99.1.0/24
          10.99.3.0/24
        ]
      }
    }
  }
}
list-sas reply {
}
";

    #[test]
    fn parses_pretty_list_sas() {
        let sas = parse_list_sas(PRETTY).expect("parse");
        assert_eq!(sas.len(), 1);
        let ike = &sas[0];
        assert_eq!(ike.name, "gw");
        assert_eq!(ike.unique_id, 3);
        assert_eq!(ike.state, "ESTABLISHED");
        assert!(!ike.initiator);
        assert_eq!(ike.spis(), (0xdce3_4fa3_f1af_8fd4, 0xbab1_86b9_5ab7_d2eb));
        assert_eq!(ike.local_id, "C=CH, O=Test, CN=gw b");
        assert_eq!(ike.dh_group.as_deref(), Some("CURVE_25519"));
        assert_eq!(ike.get("local-port"), Some("4500"));
        let child = ike.child("net").expect("child");
        assert_eq!(child.spi_in, 0xc241_db63);
        assert_eq!(child.spi_out, 0xe334_ead5);
        assert_eq!(child.encr_alg.as_deref(), Some("AES_GCM_16"));
        assert_eq!(child.encr_keysize, Some(128));
        assert_eq!(child.integ_alg, None);
        assert_eq!(child.local_ts, ["10.99.2.0/24"]);
        assert_eq!(child.remote_ts, ["10.99.1.0/24", "10.99.3.0/24"]);
        assert_eq!(child.get_u64("packets-in"), Some(7));
    }

    #[test]
    fn sas_still_negotiating_parse_with_zero_spis() {
        let text = "list-sa event {\n  gw {\n    uniqueid = 2\n    state = CONNECTING\n    \
                    local-host = 172.31.0.1\n    remote-host = 172.31.0.2\n    \
                    initiator = yes\n    initiator-spi = ad5603a5099b8adf\n    \
                    responder-spi = 0000000000000000\n    child-sas {\n      net-3 {\n        \
                    name = net\n        state = CREATED\n        spi-in = c241db63\n      }\n    \
                    }\n  }\n}\n";
        let sas = parse_list_sas(text).expect("parse");
        assert_eq!(sas[0].spis(), (0xad56_03a5_099b_8adf, 0));
        assert!(sas[0].initiator);
        assert_eq!(sas[0].encr_alg, None);
        let child = sas[0].child("net").expect("child");
        assert_eq!((child.spi_in, child.spi_out), (0xc241_db63, 0));
        assert_eq!(child.encr_alg, None);
    }

    #[test]
    fn empty_listing_has_no_sas() {
        assert_eq!(
            parse_list_sas("list-sas reply {\n}\n").expect("parse"),
            Vec::new()
        );
        assert_eq!(parse_list_sas("").expect("parse"), Vec::new());
    }

    #[test]
    fn broken_output_is_an_error_not_a_panic() {
        for bad in [
            "}",
            "a {",
            "a {\n  k = [\n",
            "what is this",
            "list-sa event {\n gw {\n uniqueid = 1\n }\n}\n",
            "list-sa event {\n gw {\n uniqueid = 1\n state = X\n local-host = a\n remote-host = b\n \
             initiator-spi = zz\n responder-spi = 0\n }\n}\n",
        ] {
            assert!(parse_list_sas(bad).is_err(), "{bad:?}");
        }
        // Every prefix of a valid listing either parses or fails cleanly.
        for end in 0..PRETTY.len() {
            if PRETTY.is_char_boundary(end) {
                let _ = parse_list_sas(&PRETTY[..end]);
            }
        }
    }

    #[test]
    fn renders_conn_children_and_hex_psk() {
        let conf = SwanctlConf::new().conn(
            Conn::psk("gw", "172.31.0.1", "172.31.0.2", b"k\"ey")
                .ids("gwa@haven.test", "gwb@haven.test")
                .proposals(&["aes128gcm16-prfsha256-x25519"])
                .dpd_delay(Duration::from_secs(5))
                .life_time(Duration::from_secs(660))
                .rekey_time(Duration::from_secs(600))
                .child(
                    ChildCfg::new("net", "10.99.1.0/24", "10.99.2.0/24")
                        .esp_proposals(&["aes128gcm16"])
                        .rekey_time(Duration::from_secs(300))
                        .life_time(Duration::from_secs(360))
                        .start_action(StartAction::Trap),
                ),
        );
        let text = conf.render().expect("render");
        for want in [
            "  gw {\n    version = 2\n    local_addrs = 172.31.0.1\n",
            "    encap = yes\n",
            "    proposals = aes128gcm16-prfsha256-x25519\n",
            "    dpd_delay = 5s\n",
            "    rekey_time = 600s\n",
            "    over_time = 60s\n",
            "      id = gwa@haven.test\n",
            "      net {\n        local_ts = 10.99.1.0/24\n        remote_ts = 10.99.2.0/24\n        mode = tunnel\n",
            "        esp_proposals = aes128gcm16\n",
            "        life_time = 360s\n",
            "        start_action = trap\n",
            "    secret = 0x6b226579\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    #[test]
    fn render_refuses_syntax_breaking_values() {
        let bad = [
            Conn::psk("g w", "a", "b", b"k"),
            Conn::psk("gw", "a\n}", "b", b"k"),
            Conn::psk("gw", "a", "b", b""),
            Conn::psk("gw", "a", "b", b"k").ids("x{", "y"),
            Conn::psk("gw", "a", "b", b"k").set("k#", "v"),
        ];
        for c in bad {
            assert!(
                SwanctlConf::new().conn(c.clone()).render().is_err(),
                "{c:?}"
            );
        }
    }
}
