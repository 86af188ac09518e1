//! The FGCP cluster's shared addresses: held by the primary only, announced with
//! gratuitous ARP when it takes them (DESIGN.md §6, issue 6 point 2).
//!
//! Which addresses:
//! - every phase1's `local-gw` (when set), as a /32 on the phase1's `interface`: the
//!   upstream router reaches it on-link (ARP), so the member that answers for it is the
//!   one that holds it;
//! - every `config system interface` entry's `ip` (seed 001's table: the members of a pair
//!   share port2, port3 and port5's addresses), with its prefix length, on that
//!   interface. Not the `hbdev` interfaces (heartbeats run between the members' own
//!   addresses) and not `type loopback` entries (a loopback's address is the phase1's
//!   `local-gw`, held as above). A member's own addresses (management, a `scope host`
//!   address per interface) are host setup, outside the configuration.
//!
//! Taking them: `ip -4 addr replace <addr>/<len> dev <interface>`, then an ARP
//! announcement (RFC 5227 §3: an ARP request with sender and target protocol address both
//! set to the address, broadcast) right away and again after 0.5, 1, 2 and 4 s: Linux
//! ignores an ARP update for an entry changed less than `locktime` (1 s) before, so one
//! announcement is not always enough. Releasing them: `ip -4 addr del`, also at start-up
//! as secondary (a member SIGKILLed while primary left them on its interfaces). Only
//! members with an FGCP link manage addresses; a member without one leaves the interfaces
//! alone.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use haven_config::Config;

use crate::io::hw_addr;

/// Delays of the ARP announcements after taking the addresses, in ms.
const GARP_AT_MS: [u64; 5] = [0, 500, 1000, 2000, 4000];
/// An announcement that could not be sent (the interface was down) is tried again this
/// much later, at most [`GARP_RETRIES`] times in a row: the router learns the addresses
/// once the link is back, not at the next failover.
const GARP_RETRY_MS: u64 = 500;
const GARP_RETRIES: u32 = 60;
/// EtherType ARP (IEEE 802 numbers; RFC 826).
const ETH_P_ARP: u16 = 0x0806;
/// EtherType IPv4.
const ETH_P_IP: u16 = 0x0800;
/// ARP hardware type Ethernet, opcode request (RFC 826).
const ARP_HRD_ETHER: u16 = 1;
const ARP_OP_REQUEST: u16 = 1;

/// One shared address: interface, address, prefix length.
pub type Shared = (String, Ipv4Addr, u8);

/// The shared addresses of this member and whether it holds them.
#[derive(Default)]
pub struct SharedAddrs {
    addrs: Vec<Shared>,
    held: bool,
    /// Announcements still due (absolute ms).
    due: Vec<u64>,
    /// No announcement before this (absolute ms), then the whole series from then on:
    /// see [`SharedAddrs::quiet`].
    quiet_until: Option<u64>,
    /// Announcement rounds that failed in a row (see [`GARP_RETRY_MS`]).
    failed: u32,
}

/// The shared addresses of `config`: `(phase1 interface, local-gw, 32)` of every phase1
/// with a `local-gw`, and `(interface, ip, length)` of every `config system interface`
/// entry with an `ip`, except loopbacks and the `hbdev` interfaces. Sorted, without
/// duplicates.
pub fn from_config(config: &Config) -> Vec<Shared> {
    let hbdevs: Vec<&str> = config
        .ha
        .iter()
        .flat_map(|h| h.hbdev.iter().map(|d| d.interface.as_str()))
        .collect();
    let mut v: Vec<Shared> = config
        .phase1
        .iter()
        .filter_map(|p| {
            p.local_gw
                .filter(|a| !a.is_unspecified() && !p.interface.is_empty())
                .map(|a| (p.interface.clone(), a, 32))
        })
        .collect();
    for i in &config.interfaces {
        if i.loopback || hbdevs.contains(&i.name.as_str()) {
            continue;
        }
        if let Some((a, len)) = i.ip {
            v.push((i.name.clone(), a, len));
        }
    }
    v.sort();
    v.dedup();
    v
}

fn ip_addr(op: &str, dev: &str, addr: Ipv4Addr, len: u8) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["-4", "addr", op, &format!("{addr}/{len}"), "dev", dev])
        .output()
        .map_err(|e| format!("ip addr {op}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

impl SharedAddrs {
    /// The addresses from a (re)loaded configuration; a held set is re-applied.
    pub fn configure(&mut self, addrs: Vec<Shared>, now_ms: u64) {
        if addrs == self.addrs {
            return;
        }
        let held = self.held;
        if held {
            self.release();
        }
        self.addrs = addrs;
        if held {
            self.hold(now_ms);
        }
    }

    /// Whether this member holds them.
    pub fn held(&self) -> bool {
        self.held
    }

    /// The addresses, for the status view.
    pub fn list(&self) -> Vec<String> {
        self.addrs
            .iter()
            .map(|(d, a, l)| format!("{a}/{l} dev {d}"))
            .collect()
    }

    /// This member became primary: bring the addresses up and announce them.
    pub fn hold(&mut self, now_ms: u64) {
        self.held = true;
        self.failed = 0;
        for (dev, addr, len) in &self.addrs {
            match ip_addr("replace", dev, *addr, *len) {
                Ok(()) => tracing::info!("FGCP: shared address {addr}/{len} up on {dev}"),
                Err(e) => tracing::error!("FGCP: shared address {addr}/{len} on {dev}: {e}"),
            }
        }
        self.due = GARP_AT_MS
            .iter()
            .map(|d| now_ms.saturating_add(*d))
            .collect();
        self.tick(now_ms);
    }

    /// A member rejoined while this one holds the addresses: announce them again (it may
    /// have held them during a split brain; the upstream ARP caches still point at it).
    pub fn reannounce(&mut self, now_ms: u64) {
        if !self.held {
            return;
        }
        tracing::info!(
            "FGCP: a member rejoined or stepped down; announcing the shared addresses again"
        );
        self.failed = 0;
        self.due = GARP_AT_MS
            .iter()
            .map(|d| now_ms.saturating_add(*d))
            .collect();
        self.tick(now_ms);
    }

    /// This member is not primary: remove the addresses. Also when this process does not
    /// hold them: a hasyncd SIGKILLed while primary leaves them on the interface, and its
    /// restarted successor comes up as secondary (a removal that finds nothing is logged
    /// at debug level).
    pub fn release(&mut self) {
        self.held = false;
        self.failed = 0;
        self.due.clear();
        for (dev, addr, len) in &self.addrs {
            match ip_addr("del", dev, *addr, *len) {
                Ok(()) => tracing::info!("FGCP: shared address {addr}/{len} removed from {dev}"),
                Err(e) => tracing::debug!("FGCP: removing {addr}/{len} from {dev}: {e}"),
            }
        }
    }

    /// Sends the announcements that are due.
    /// Holds the announcements back until `until_ms` at the latest (or [`SharedAddrs::speak`]):
    /// the upstream router must not move the traffic here before the local datapath
    /// continues above the numbers another member sent (a take-back while espd kept the
    /// SA at its own counter). Then the announcements start over.
    pub fn quiet(&mut self, until_ms: u64) {
        self.quiet_until = Some(self.quiet_until.map_or(until_ms, |q| q.max(until_ms)));
    }

    /// Whether the announcements are held back.
    pub fn is_quiet(&self) -> bool {
        self.quiet_until.is_some()
    }

    /// Ends [`SharedAddrs::quiet`]: the announcements start now (if the addresses are held).
    pub fn speak(&mut self, now_ms: u64) {
        if self.quiet_until.is_some() {
            self.quiet_until = Some(now_ms);
            self.tick(now_ms);
        }
    }

    pub fn tick(&mut self, now_ms: u64) {
        if let Some(q) = self.quiet_until {
            if now_ms < q {
                return;
            }
            self.quiet_until = None;
            if self.held {
                self.due = GARP_AT_MS
                    .iter()
                    .map(|d| now_ms.saturating_add(*d))
                    .collect();
            }
        }
        if !self.held || !self.due.iter().any(|t| *t <= now_ms) {
            return;
        }
        self.due.retain(|t| *t > now_ms);
        let mut failed = false;
        for (dev, addr, _) in &self.addrs {
            match announce(dev, *addr) {
                Ok(()) => {
                    metrics::counter!("hasyncd_gratuitous_arps_total").increment(1);
                    tracing::debug!("FGCP: gratuitous ARP for {addr} on {dev}");
                }
                Err(e) => {
                    failed = true;
                    if self.failed == 0 {
                        tracing::warn!(
                            "FGCP: gratuitous ARP for {addr} on {dev}: {e} (tried again every {GARP_RETRY_MS} ms)"
                        );
                    } else {
                        tracing::debug!("FGCP: gratuitous ARP for {addr} on {dev}: {e}");
                    }
                }
            }
        }
        if !failed {
            self.failed = 0;
        } else if self.failed < GARP_RETRIES {
            self.failed += 1;
            let retry = now_ms.saturating_add(GARP_RETRY_MS);
            if !self.due.contains(&retry) {
                self.due.push(retry);
            }
        }
    }
}

fn ifindex(dev: &str) -> io::Result<i32> {
    let c = std::ffi::CString::new(dev)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(io::Error::last_os_error());
    }
    i32::try_from(i).map_err(|_| io::Error::other("interface index out of range"))
}

/// One ARP announcement of `addr` out of `dev` (RFC 5227 §3, RFC 826 layout).
fn announce(dev: &str, addr: Ipv4Addr) -> io::Result<()> {
    let mac = hw_addr(dev)?;
    let index = ifindex(dev)?;
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    frame.extend_from_slice(&ARP_HRD_ETHER.to_be_bytes());
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&[6, 4]);
    frame.extend_from_slice(&ARP_OP_REQUEST.to_be_bytes());
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&addr.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&addr.octets());
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `sockaddr_ll` is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ARP.to_be();
    sll.sll_ifindex = index;
    sll.sll_halen = 6;
    for (d, s) in sll.sll_addr.iter_mut().zip([0xffu8; 6]) {
        *d = s;
    }
    // SAFETY: valid fd; `frame` and `sll` outlive the call and their lengths are passed.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held back by `quiet`, the announcements start when `speak` ends it (or when its
    /// time is up), with the whole series counted from then.
    #[test]
    fn a_quiet_period_holds_the_announcements_back_and_restarts_them() {
        let mut v = SharedAddrs::default();
        v.quiet(1_300);
        v.hold(1_000);
        assert!(v.held() && v.is_quiet());
        assert_eq!(v.due, GARP_AT_MS.map(|d| 1_000 + d), "nothing sent yet");
        v.tick(1_200);
        assert_eq!(v.due.len(), GARP_AT_MS.len(), "still quiet");
        v.speak(1_250);
        assert!(!v.is_quiet());
        assert_eq!(
            v.due,
            GARP_AT_MS[1..]
                .iter()
                .map(|d| 1_250 + d)
                .collect::<Vec<_>>(),
            "the first one went at 1250, the rest counted from it"
        );
        // Without `speak`: the series starts when the quiet time is up.
        v.quiet(2_300);
        v.reannounce(2_000);
        v.tick(2_299);
        assert_eq!(v.due[0], 2_000);
        v.tick(2_300);
        assert!(!v.is_quiet());
        assert_eq!(v.due[0], 2_800);
        // `speak` without a quiet period changes nothing.
        let due = v.due.clone();
        v.speak(2_400);
        assert_eq!(v.due, due);
    }

    /// Split brain healed: the primary that kept the addresses announces them again (the
    /// soak saw the router's ARP entry left on the secondary, every tunnel black-holed).
    #[test]
    fn a_rejoining_member_makes_the_holder_announce_again() {
        // No addresses: hold/tick touch no interface.
        let mut v = SharedAddrs::default();
        v.reannounce(0);
        assert!(
            v.due.is_empty(),
            "a member that does not hold them stays silent"
        );
        v.hold(1_000);
        v.tick(10_000);
        assert!(v.due.is_empty(), "every announcement of the takeover sent");
        v.reannounce(20_000);
        assert_eq!(v.due, vec![20_500, 21_000, 22_000, 24_000]);
        v.release();
        v.reannounce(30_000);
        assert!(v.due.is_empty());
    }

    #[test]
    fn local_gws_become_shared_addresses() {
        let mut config = Config::default();
        let mut p = haven_config::Phase1::new("vpn1");
        p.interface = "port2".into();
        p.local_gw = Some(Ipv4Addr::new(192, 168, 129, 254));
        config.phase1.push(p.clone());
        p.name = "vpn2".into();
        config.phase1.push(p.clone());
        p.name = "vpn3".into();
        p.local_gw = Some(Ipv4Addr::UNSPECIFIED);
        config.phase1.push(p);
        assert_eq!(
            from_config(&config),
            vec![("port2".to_string(), Ipv4Addr::new(192, 168, 129, 254), 32)]
        );
    }

    /// Seed 001's table: port2, port3 and port5 addresses are the pair's; the hbdev's and
    /// the loopback's are not held as interface addresses.
    #[test]
    fn interface_addresses_become_shared_addresses_except_hbdev_and_loopback() {
        let text = "config system ha\n    set group-id 1\n    set mode a-p\n    set password x\n    \
                    set hbdev \"port4\" 50\nend\n\
                    config system interface\n\
                    \x20   edit \"port5\"\n        set ip 172.31.2.1 255.255.255.0\n    next\n\
                    \x20   edit \"port3\"\n        set ip 172.31.129.254/24\n    next\n\
                    \x20   edit \"port4\"\n        set ip 169.254.0.1 255.255.255.0\n    next\n\
                    \x20   edit \"lb1\"\n        set type loopback\n        set ip 192.168.202.35 255.255.255.255\n    next\n\
                    \x20   edit \"port6\"\n    next\n\
                    end\n";
        let config = haven_config::parse(text).unwrap().config;
        assert_eq!(
            from_config(&config),
            vec![
                ("port3".to_string(), Ipv4Addr::new(172, 31, 129, 254), 24),
                ("port5".to_string(), Ipv4Addr::new(172, 31, 2, 1), 24),
            ]
        );
        let mut v = SharedAddrs::default();
        v.configure(from_config(&config), 0);
        assert_eq!(
            v.list(),
            vec!["172.31.129.254/24 dev port3", "172.31.2.1/24 dev port5"]
        );
    }

    /// An announcement the interface could not send (down during a link flap) is tried
    /// again every GARP_RETRY_MS until one goes out, at most GARP_RETRIES times in a row.
    #[test]
    fn a_failed_announcement_is_tried_again_until_the_link_is_back() {
        let mut v = SharedAddrs {
            addrs: vec![("hvnodev-vip0".into(), Ipv4Addr::new(192, 0, 2, 1), 32)],
            held: true,
            due: vec![1_000],
            ..Default::default()
        };
        v.tick(1_000);
        assert_eq!(
            v.due,
            vec![1_000 + GARP_RETRY_MS],
            "no such interface: again later"
        );
        for i in 1..GARP_RETRIES {
            let now = 1_000 + u64::from(i) * GARP_RETRY_MS;
            v.tick(now);
            assert_eq!(v.due, vec![now + GARP_RETRY_MS]);
        }
        v.tick(1_000 + u64::from(GARP_RETRIES) * GARP_RETRY_MS);
        assert!(v.due.is_empty(), "given up after {GARP_RETRIES} tries");
        // A new series (a takeover, a rejoin) starts counting again: its first round
        // failed once so far.
        v.reannounce(100_000);
        assert_eq!(v.failed, 1);
        assert!(v.due.contains(&(100_000 + GARP_RETRY_MS)));
    }
}
