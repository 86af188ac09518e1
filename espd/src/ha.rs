//! Outbound sequence leases synced through hasyncd (DESIGN.md §6, issue 6).
//!
//! In an HA cluster (the configuration has `config system ha` in `a-p` mode or
//! `config system standalone-cluster`), an SA sends no packet with a sequence number at or above the last mark
//! hasyncd granted ([`crate::datapath::table::Sa::ha_hw`]). espd asks for the mark it has
//! persisted locally (`SeqLeaseRequest`, at install and then every tick while a request is
//! open); hasyncd broadcasts it on the HA link and, once every live member stored it,
//! answers `SeqLeaseGranted`. A member that takes the SA over therefore starts at or above
//! every number this espd may have sent. The local persisted mark still protects a
//! `kill -9` of espd; the effective limit is the smaller of the two marks.
//!
//! If hasyncd does not answer (not running), a gated SA sends nothing, and a running one
//! stops once its granted mark is used up (counted as `seq_lease` drops): a cluster member
//! never sends an unsynced sequence number. An SA installed before a reload that turned
//! clustering on keeps its local marks alone.
//!
//! A cluster member whose hasyncd is gone sends no heartbeats: after `hb-interval` x
//! `hb-lost-threshold` another member declares it lost and takes its tunnels over, while
//! this espd, still holding its SAs and granted marks, would go on sending below the new
//! carrier's numbers whenever traffic still reaches it (the shared addresses stay on the
//! interfaces of a member whose hasyncd was killed): the peer drops those as replays. So
//! once hasyncd's process has been gone for half that time, every gated SA is held
//! ([`esp_proto::AtomicSeq::hold`]; its packets are counted as `seq_lease` drops) until a
//! new hasyncd grants its lease again, which it does only where it carries the tunnel.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use bus_schema::schema::SeqMark;
use bus_schema::Body;
use haven_config::Config;

use crate::datapath::Datapath;

/// Lease bookkeeping on the control side.
#[derive(Default)]
pub struct HaLeases {
    gating: bool,
    /// Unknown inbound SPIs reported to hasyncd: SPI -> when (ms).
    reported: std::collections::BTreeMap<u32, u64>,
    /// When the last full (200 ms) tick ran, ms.
    pub full_tick_ms: u64,
    /// Skips whose lease request above them has not gone out yet, with when (ms) to stop
    /// waiting for it: hasyncd holds the shared addresses' announcement until this espd
    /// asks for a lease above the skip (the counter moved), so that request goes out on
    /// the next 10 ms wake-up instead of the next full tick.
    skipped: Vec<(SeqMark, u64)>,
    /// hasyncd's process, looked for on every wake-up of a cluster member.
    hasyncd: HasyncdWatch,
    /// How long after hasyncd was last seen the gated SAs are held (`None`: never).
    hold_after_ms: Option<u64>,
    /// When hasyncd was last seen running (`None`: not yet since espd started).
    hasyncd_seen_ms: Option<u64>,
    /// The gated SAs are held: hasyncd has been gone for `hold_after_ms`.
    held: bool,
}

/// Whether hasyncd runs: the pid in `<run-dir>/ctl/hasyncd.lock` (written under the
/// instance lock by every daemon, never removed), checked in `/proc` once, then watched
/// through a pidfd (readable once the process has exited): one `poll` per wake-up, no file
/// read or allocation. Reading the pid, not taking the lock: a shared lock held for a
/// moment here would make a hasyncd starting just then fail its own.
#[derive(Default)]
struct HasyncdWatch {
    lock_path: PathBuf,
    /// The hasyncd found, and a pidfd of it (`None` where the kernel has no `pidfd_open`:
    /// then `/proc` is read on every check).
    pid: Option<(u32, Option<OwnedFd>)>,
}

impl HasyncdWatch {
    fn alive(&mut self) -> bool {
        if let Some((pid, fd)) = &self.pid {
            let up = match fd {
                Some(fd) => !exited(fd),
                None => running(*pid),
            };
            if up {
                return true;
            }
        }
        self.pid = std::fs::read_to_string(&self.lock_path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|pid| running(*pid) && is_hasyncd(*pid))
            .map(|pid| {
                // Checked again once the pidfd is open: it refers to the process that had
                // the pid when it was opened, which must still be hasyncd.
                let fd = pidfd_open(pid).filter(|_| is_hasyncd(pid));
                (pid, fd)
            });
        self.pid.is_some()
    }
}

/// A pidfd of process `pid` (`pidfd_open(2)`, Linux 5.3), or `None`.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = libc::c_int::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind pidfd `fd` has exited (the pidfd is readable then; a zombie
/// counts as exited).
fn exited(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n != 0 && (n < 0 || p.revents != 0)
}

/// Whether process `pid` exists and is not a zombie (killed, not reaped yet).
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')' (comm may hold one).
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| !matches!(state, "Z" | "X" | "x"))
}

/// Whether `pid` is a hasyncd (a pid left in the lock file may belong to another program
/// by now).
fn is_hasyncd(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "hasyncd")
}

/// Half of the shortest silence after which another member declares this one lost: FGCP
/// `hb-interval` x `hb-lost-threshold`, FGSP each cluster peer's (`None` outside a
/// cluster).
pub fn hold_after_ms(config: &Config) -> Option<u64> {
    let fgcp = config
        .ha
        .as_ref()
        .filter(|h| h.mode == haven_config::HaMode::ActivePassive)
        .map(|h| u64::from(h.hb_interval_ms()) * u64::from(h.hb_lost_threshold));
    let fgsp = config.standalone.as_ref().and_then(|s| {
        s.cluster_peers
            .iter()
            .map(|p| u64::from(p.lost_after_ms()))
            .min()
    });
    fgcp.into_iter().chain(fgsp).min().map(|lost| lost / 2)
}

/// How long after a skip its lease request is looked for on every wake-up.
const PROMPT_MS: u64 = 500;

/// An unknown SPI is reported again after this long (hasyncd promotes once; a repeat covers
/// a lost or refused promotion).
const REPORT_AGAIN_MS: u64 = 250;
/// At most this many SPIs are remembered as reported.
const REPORTED_MAX: usize = 256;
/// How often a cluster member looks for unknown SPIs (`DaemonLogic::poll_timeout`): the
/// FGSP promotion latency when the upstream router moves a tunnel here.
pub const UNKNOWN_SPI_POLL_MS: u64 = 10;

impl HaLeases {
    /// Where hasyncd's instance lock is (`<run-dir>/ctl/hasyncd.lock`).
    pub fn set_run_dir(&mut self, run_dir: &Path) {
        self.hasyncd.lock_path = run_dir.join("ctl").join("hasyncd.lock");
    }

    /// Whether the gated SAs are held (hasyncd gone).
    pub fn held(&self) -> bool {
        self.held
    }

    /// Every wake-up of a cluster member: is hasyncd running? Once it has been gone for
    /// [`hold_after_ms`], every gated SA is held; when it runs again, each SA is released
    /// by its next grant ([`HaLeases::granted`], asked for by [`HaLeases::requests`]).
    pub fn watch_hasyncd(&mut self, dp: Option<&Datapath>, now_ms: u64) {
        let Some(after) = self.hold_after_ms.filter(|_| self.gating) else {
            return;
        };
        if self.hasyncd.alive() {
            self.hasyncd_seen_ms = Some(now_ms);
            if self.held {
                self.held = false;
                metrics::gauge!("espd_ha_held").set(0.0);
                tracing::info!(
                    "HA: hasyncd runs again (pid {}): each held outbound SA sends again once it grants its lease",
                    self.hasyncd.pid.as_ref().map_or(0, |(p, _)| *p)
                );
            }
            return;
        }
        // Never seen since espd started: the SAs wait for their first grant anyway.
        let Some(seen) = self.hasyncd_seen_ms else {
            return;
        };
        if self.held || now_ms.saturating_sub(seen) < after {
            return;
        }
        self.held = true;
        let mut n = 0usize;
        if let Some(dp) = dp {
            for sa in dp.sas().values() {
                if sa.ha_hw.load(Ordering::Acquire) != u64::MAX {
                    sa.seq.hold(true);
                    n += 1;
                }
            }
        }
        metrics::gauge!("espd_ha_held").set(1.0);
        metrics::counter!("espd_ha_holds_total").increment(1);
        tracing::warn!(
            "HA: hasyncd has not run for {} ms: {n} outbound SAs held (another member takes this member's tunnels over after {} ms without heartbeats); each sends again once a new hasyncd grants its lease",
            now_ms.saturating_sub(seen),
            after * 2
        );
    }

    /// Whether new SAs wait for hasyncd's lease.
    pub fn gating(&self) -> bool {
        self.gating
    }

    /// The configuration: gate when this member is in a cluster (`config system ha` in
    /// `a-p` mode, or `config system standalone-cluster`). Decided from the configuration,
    /// not from hasyncd's records, so that no SA can start sending before hasyncd is heard.
    pub fn on_config(&mut self, config: &Config, dp: Option<&mut Datapath>) {
        let gating = config
            .ha
            .as_ref()
            .is_some_and(|h| h.mode == haven_config::HaMode::ActivePassive)
            || config.standalone.is_some();
        if gating != self.gating {
            tracing::info!(
                "HA: outbound sequence leases {}",
                if gating {
                    "granted by hasyncd before use (cluster member)"
                } else {
                    "local only"
                }
            );
        }
        self.gating = gating;
        self.hold_after_ms = hold_after_ms(config);
        if let Some(dp) = dp {
            dp.set_ha_gating(gating);
        }
    }

    /// In a cluster: ESP that arrived for SPIs with no SA since the last call goes to
    /// hasyncd (`UnknownSaTraffic`), each SPI at most every [`REPORT_AGAIN_MS`]. An FGSP
    /// member holding a standby copy of the tunnel promotes it (the upstream router moved the
    /// tunnel here).
    pub fn unknown_spis(&mut self, dp: Option<&Datapath>, now_ms: u64, out: &mut Vec<Body>) {
        let Some(dp) = dp else { return };
        let spis = dp.shared().unknown_spis.drain();
        if !self.gating {
            return;
        }
        self.reported
            .retain(|_, at| now_ms.saturating_sub(*at) < REPORT_AGAIN_MS);
        let fresh: Vec<u32> = spis
            .into_iter()
            .filter(|spi| !self.reported.contains_key(spi))
            .collect();
        if fresh.is_empty() {
            return;
        }
        for spi in &fresh {
            if self.reported.len() < REPORTED_MAX {
                self.reported.insert(*spi, now_ms);
            }
        }
        tracing::debug!("HA: ESP for unknown SPIs {fresh:08x?} reported to hasyncd");
        out.push(Body::UnknownSaTraffic(
            bus_schema::schema::UnknownSaTraffic {
                esp_spis: fresh,
                ike_spis: Vec::new(),
            },
        ));
    }

    /// The open lease requests: gated SAs whose locally persisted mark is above the granted
    /// one.
    pub fn requests(&self, dp: Option<&Datapath>, out: &mut Vec<Body>) {
        let Some(dp) = dp else { return };
        let mut sas = Vec::new();
        for sa in dp.sas().values() {
            let granted = sa.ha_hw.load(Ordering::Acquire);
            if granted == u64::MAX {
                continue;
            }
            let local = sa.lease.lock().unwrap_or_else(|p| p.into_inner()).granted();
            // A held SA asks again for what it had: the new hasyncd's grant releases it.
            if local > granted || sa.seq.held() {
                sas.push(SeqMark {
                    tunnel: sa.tunnel.clone(),
                    spi_out: sa.spi_out,
                    seq_hw: local,
                });
            }
        }
        if !sas.is_empty() {
            out.push(Body::SeqLeaseRequest { sas });
        }
    }

    /// hasyncd claimed back a tunnel this espd kept while another member carried it (FGCP
    /// split brain): each outbound SA continues at or above its mark. The counter then
    /// stands above the local and HA lease marks, so the SA sends nothing until the
    /// housekeeping persists a new local mark and hasyncd grants the lease above it; the
    /// request for that lease goes out on the next wake-up ([`HaLeases::skip_requests`]).
    pub fn skip(&mut self, dp: Option<&Datapath>, marks: &[SeqMark], now_ms: u64) {
        let Some(dp) = dp else { return };
        for m in marks {
            let mut held = false;
            for sa in dp.sas_of(&m.tunnel, m.spi_out) {
                held = true;
                let before = sa.seq.next();
                let next = sa.seq.skip_to(m.seq_hw);
                if next > before {
                    tracing::info!(
                        "{}: HA: outbound {:08x} continues at sequence {next} (was {before}; another member sent on it meanwhile)",
                        sa.key,
                        sa.spi_out
                    );
                }
            }
            if held && self.skipped.len() < REPORTED_MAX {
                self.skipped
                    .push((m.clone(), now_ms.saturating_add(PROMPT_MS)));
            }
        }
    }

    /// hasyncd: another member, still heard, says it is primary and carries `tunnels`
    /// (an FGCP split brain): their gated outbound SAs are held, as while hasyncd is gone,
    /// until hasyncd grants a lease again (after it claimed them back above the other
    /// member's numbers). hasyncd repeats this while it lasts; an SA already held is left
    /// as it is.
    pub fn hold_tunnels(&self, dp: Option<&Datapath>, tunnels: &[String]) {
        let Some(dp) = dp else { return };
        let mut n = 0;
        for t in tunnels {
            for sa in dp.sas_of_tunnel(t) {
                if sa.ha_hw.load(Ordering::Acquire) == u64::MAX || sa.seq.held() {
                    continue;
                }
                sa.seq.hold(true);
                n += 1;
                tracing::warn!(
                    "{}: HA: outbound {:08x} held: another member carries the tunnel and says it is primary (split brain); it sends again once hasyncd grants its lease",
                    sa.key,
                    sa.spi_out
                );
            }
        }
        if n > 0 {
            metrics::counter!("espd_ha_holds_total").increment(1);
        }
    }

    /// Shortly after a skip: the lease request of each skipped SA whose new local mark
    /// (above the skip) is persisted, once.
    pub fn skip_requests(&mut self, dp: Option<&Datapath>, now_ms: u64, out: &mut Vec<Body>) {
        let Some(dp) = dp else { return };
        if self.skipped.is_empty() {
            return;
        }
        let mut sas = Vec::new();
        self.skipped.retain(|(m, until)| {
            let local = dp
                .sas_of(&m.tunnel, m.spi_out)
                .map(|sa| sa.lease.lock().unwrap_or_else(|p| p.into_inner()).granted())
                .max();
            match local {
                Some(local) if local > m.seq_hw => {
                    sas.push(SeqMark {
                        tunnel: m.tunnel.clone(),
                        spi_out: m.spi_out,
                        seq_hw: local,
                    });
                    false
                }
                Some(_) => now_ms < *until,
                None => false,
            }
        });
        if !sas.is_empty() {
            out.push(Body::SeqLeaseRequest { sas });
        }
    }

    /// hasyncd granted marks: raise the SAs' limits (never above the local mark), and
    /// release the SAs held while hasyncd was gone. A grant that arrives while it is still
    /// gone (sent before it died) releases nothing.
    pub fn granted(&self, dp: Option<&Datapath>, marks: &[SeqMark]) {
        let Some(dp) = dp else { return };
        for m in marks {
            for sa in dp.sas_of(&m.tunnel, m.spi_out) {
                if sa.ha_hw.load(Ordering::Acquire) == u64::MAX {
                    continue;
                }
                if sa.seq.held() && !self.held {
                    sa.seq.hold(false);
                    tracing::info!(
                        "{}: HA: outbound {:08x} released: hasyncd granted its lease again",
                        sa.key,
                        sa.spi_out
                    );
                }
                let before = sa.ha_hw.fetch_max(m.seq_hw, Ordering::AcqRel);
                let local = sa.lease.lock().unwrap_or_else(|p| p.into_inner()).granted();
                sa.seq.grant(m.seq_hw.min(local));
                if before < m.seq_hw {
                    tracing::debug!(
                        "{}: HA lease granted, outbound {:08x} may send below {}",
                        sa.key,
                        sa.spi_out,
                        m.seq_hw.min(local)
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_config::{ClusterPeer, Ha, HaMode, StandaloneCluster};

    #[test]
    fn sas_are_held_after_half_the_time_another_member_waits() {
        let mut config = Config::default();
        assert_eq!(hold_after_ms(&config), None, "no cluster");
        config.ha = Some(Ha {
            mode: HaMode::Standalone,
            ..Ha::default()
        });
        assert_eq!(hold_after_ms(&config), None, "FGCP standalone mode");
        // The lab's FGCP pairs: 2 x 100 ms x 3 = 600 ms.
        config.ha = Some(Ha {
            mode: HaMode::ActivePassive,
            hb_interval: 2,
            hb_lost_threshold: 3,
            ..Ha::default()
        });
        assert_eq!(hold_after_ms(&config), Some(300));
        // FGSP peers: the shortest of theirs (and of FGCP's) counts.
        let mut slow = ClusterPeer::new(1, "10.0.0.1".parse().unwrap());
        slow.hb_lost_threshold = 20;
        let quick = ClusterPeer::new(2, "10.0.0.2".parse().unwrap());
        config.standalone = Some(StandaloneCluster {
            cluster_peers: vec![slow.clone(), quick],
            ..StandaloneCluster::default()
        });
        assert_eq!(hold_after_ms(&config), Some(300));
        config.ha = None;
        assert_eq!(hold_after_ms(&config), Some(600), "1.2 s");
        config.standalone = Some(StandaloneCluster {
            cluster_peers: vec![slow],
            ..StandaloneCluster::default()
        });
        assert_eq!(hold_after_ms(&config), Some(2_000));
    }

    #[test]
    fn hasyncd_is_found_by_the_pid_in_its_lock_file() {
        let dir = std::env::temp_dir().join(format!("espd-ha-watch-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("ctl")).unwrap();
        let mut w = HasyncdWatch {
            lock_path: dir.join("ctl").join("hasyncd.lock"),
            pid: None,
        };
        assert!(!w.alive(), "no lock file");
        // A running process that is hasyncd by name: found, watched through a pidfd, and
        // gone once it exits (a zombie until reaped counts as gone).
        let copy = dir.join("hasyncd");
        std::fs::copy("/bin/sleep", &copy).unwrap();
        let mut child = std::process::Command::new(&copy).arg("30").spawn().unwrap();
        std::fs::write(&w.lock_path, format!("{}\n", child.id())).unwrap();
        assert!(w.alive(), "a running hasyncd");
        assert!(w.pid.as_ref().is_some_and(|(_, fd)| fd.is_some()), "pidfd");
        assert!(w.alive());
        child.kill().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!w.alive(), "exited, not reaped yet");
        let _ = child.wait();
        assert!(!w.alive(), "reaped");
        // A running process that is not hasyncd (this test), and one that is gone.
        std::fs::write(&w.lock_path, format!("{}\n", std::process::id())).unwrap();
        assert!(running(std::process::id()));
        assert!(!w.alive(), "the pid is not hasyncd's");
        std::fs::write(&w.lock_path, "4194304\n").unwrap();
        assert!(!running(4_194_304));
        assert!(!w.alive());
        std::fs::write(&w.lock_path, "not a pid").unwrap();
        assert!(!w.alive());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
