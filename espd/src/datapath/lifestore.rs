//! Per-SA lifetime state persisted in `<run-dir>/espd-life/`, one file per SA
//! (`<tunnel>-<spi_in as 8 hex digits>`): when the SA was installed (CLOCK_MONOTONIC, with the
//! kernel's boot id), its inner packet and byte counts in each direction, and whether its
//! soft limits were reported. An espd restarted after `kill -9` takes its SAs back from
//! ikemgr's snapshot and, through these records, their age and volume: a lifetime reached
//! across the restart fires at the right total instead of counting from zero.
//!
//! Records are written with a rename (atomic for a crashing process; no fsync: a power loss
//! ends the SAs anyway). The control side writes the counts every tick (200 ms) for SAs with
//! a volume limit and every second for the others, so a restart undercounts at most that
//! much traffic.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use esp_proto::Counters;

/// First word of a record (format version 1).
const MAGIC: &str = "haven-espd-life/1";

/// Records of SAs this long past their hard time limit are pruned when the store opens.
const PRUNE_GRACE_NS: u64 = 60_000_000_000;

/// The persisted lifetime state of one SA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifeRecord {
    /// `/proc/sys/kernel/random/boot_id` when the record was written: monotonic times of
    /// another boot mean nothing.
    pub boot: String,
    /// CLOCK_MONOTONIC ns when the SA was first installed.
    pub installed_ns: u64,
    /// The SA's hard time limit in seconds (0: none), for pruning.
    pub hard_secs: u64,
    /// Inbound (decrypted) counts.
    pub rx: Counters,
    /// Outbound (encrypted) counts.
    pub tx: Counters,
    /// Soft limit reported, inbound and outbound.
    pub soft_in: bool,
    pub soft_out: bool,
}

impl LifeRecord {
    /// One line: `haven-espd-life/1 boot=<id> installed_ns=<n> hard_secs=<n>
    /// rx=<packets>/<bytes> tx=<packets>/<bytes> soft=<in><out>` (soft as `0`/`1`).
    pub fn encode(&self) -> String {
        format!(
            "{MAGIC} boot={} installed_ns={} hard_secs={} rx={}/{} tx={}/{} soft={}{}\n",
            self.boot,
            self.installed_ns,
            self.hard_secs,
            self.rx.packets,
            self.rx.bytes,
            self.tx.packets,
            self.tx.bytes,
            u8::from(self.soft_in),
            u8::from(self.soft_out)
        )
    }

    /// Parses [`LifeRecord::encode`]'s line; `None` for anything else.
    pub fn parse(s: &str) -> Option<LifeRecord> {
        let mut words = s.split_whitespace();
        if words.next()? != MAGIC {
            return None;
        }
        let mut field = |name: &str| -> Option<&str> {
            let w = words.next()?;
            w.strip_prefix(name)?.strip_prefix('=')
        };
        let counters = |v: &str| -> Option<Counters> {
            let (p, b) = v.split_once('/')?;
            Some(Counters {
                packets: p.parse().ok()?,
                bytes: b.parse().ok()?,
            })
        };
        let boot = field("boot")?.to_string();
        if boot.is_empty() || boot.len() > 64 {
            return None;
        }
        let installed_ns = field("installed_ns")?.parse().ok()?;
        let hard_secs = field("hard_secs")?.parse().ok()?;
        let rx = counters(field("rx")?)?;
        let tx = counters(field("tx")?)?;
        let (soft_in, soft_out) = match field("soft")? {
            "00" => (false, false),
            "01" => (false, true),
            "10" => (true, false),
            "11" => (true, true),
            _ => return None,
        };
        if words.next().is_some() {
            return None;
        }
        Some(LifeRecord {
            boot,
            installed_ns,
            hard_secs,
            rx,
            tx,
            soft_in,
            soft_out,
        })
    }

    /// Whether the SA is over its hard time limit by more than the pruning grace at
    /// `now_ns` (CLOCK_MONOTONIC).
    fn long_dead(&self, now_ns: u64) -> bool {
        self.hard_secs > 0
            && now_ns.saturating_sub(self.installed_ns)
                > self
                    .hard_secs
                    .saturating_mul(1_000_000_000)
                    .saturating_add(PRUNE_GRACE_NS)
    }
}

/// CLOCK_MONOTONIC in ns: the clock behind `std::time::Instant` on Linux, kept across a
/// process restart (not across a reboot).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The directory of records.
#[derive(Debug, Clone)]
pub struct LifeStore {
    dir: PathBuf,
    boot: String,
}

impl LifeStore {
    /// Opens (creates, mode 0700) `<run_dir>/espd-life` and prunes the records of another
    /// boot and of SAs long past their hard time limit.
    pub fn open(run_dir: &Path) -> io::Result<LifeStore> {
        use std::os::unix::fs::PermissionsExt;
        let dir = run_dir.join("espd-life");
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let boot = if boot.is_empty() || boot.len() > 64 || boot.contains(char::is_whitespace) {
            "unknown".to_string()
        } else {
            boot
        };
        let store = LifeStore { dir, boot };
        store.prune(monotonic_ns());
        Ok(store)
    }

    /// This boot's id, for new records.
    pub fn boot(&self) -> &str {
        &self.boot
    }

    fn prune(&self, now_ns: u64) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let keep = fs::read_to_string(&p)
                .ok()
                .and_then(|s| LifeRecord::parse(&s))
                .is_some_and(|r| r.boot == self.boot && !r.long_dead(now_ns));
            if !keep {
                let _ = fs::remove_file(&p);
            }
        }
    }

    fn path(&self, tunnel: &str, spi_in: u32) -> PathBuf {
        self.dir.join(super::seqstore::sa_file_name(tunnel, spi_in))
    }

    /// The record of this boot for the SA, if there is a readable one.
    pub fn load(&self, tunnel: &str, spi_in: u32) -> Option<LifeRecord> {
        let p = self.path(tunnel, spi_in);
        let s = match fs::read_to_string(&p) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::error!("{}: {e}", p.display());
                return None;
            }
        };
        match LifeRecord::parse(&s) {
            Some(r) if r.boot == self.boot => Some(r),
            Some(_) => None,
            None => {
                tracing::error!("{}: unreadable lifetime record {s:?}", p.display());
                None
            }
        }
    }

    /// Writes the record (temporary file renamed over the old one).
    pub fn store(&self, tunnel: &str, spi_in: u32, rec: &LifeRecord) -> io::Result<()> {
        let p = self.path(tunnel, spi_in);
        let tmp = p.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(rec.encode().as_bytes())?;
        }
        fs::rename(&tmp, &p)
    }

    /// Forgets the record of a removed SA.
    pub fn remove(&self, tunnel: &str, spi_in: u32) {
        let _ = fs::remove_file(self.path(tunnel, spi_in));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(boot: &str) -> LifeRecord {
        LifeRecord {
            boot: boot.into(),
            installed_ns: 5_000_000_000,
            hard_secs: 120,
            rx: Counters {
                packets: 3,
                bytes: 4200,
            },
            tx: Counters {
                packets: 2,
                bytes: 2800,
            },
            soft_in: false,
            soft_out: true,
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let r = rec("0b8e1c2a-1111-2222-3333-444455556666");
        let line = r.encode();
        assert_eq!(
            line,
            "haven-espd-life/1 boot=0b8e1c2a-1111-2222-3333-444455556666 installed_ns=5000000000 hard_secs=120 rx=3/4200 tx=2/2800 soft=01\n"
        );
        assert_eq!(LifeRecord::parse(&line), Some(r));
        for bad in [
            "",
            "haven-espd-life/2 boot=x installed_ns=1 hard_secs=0 rx=0/0 tx=0/0 soft=00",
            "haven-espd-life/1 boot=x installed_ns=1 hard_secs=0 rx=0/0 tx=0/0 soft=02",
            "haven-espd-life/1 boot=x installed_ns=-1 hard_secs=0 rx=0/0 tx=0/0 soft=00",
            "haven-espd-life/1 boot=x installed_ns=1 hard_secs=0 rx=0 tx=0/0 soft=00",
            "haven-espd-life/1 boot=x installed_ns=1 hard_secs=0 rx=0/0 tx=0/0",
            "haven-espd-life/1 boot=x installed_ns=1 hard_secs=0 rx=0/0 tx=0/0 soft=00 more",
            "haven-espd-life/1 boot= installed_ns=1 hard_secs=0 rx=0/0 tx=0/0 soft=00",
            "haven-espd-life/1 installed_ns=1 boot=x hard_secs=0 rx=0/0 tx=0/0 soft=00",
            "haven-espd-life/1 boot=x installed_ns=1 hard_secs=0 rx=99999999999999999999/0 tx=0/0 soft=00",
        ] {
            assert_eq!(LifeRecord::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn store_keeps_this_boot_and_prunes_the_rest() {
        let dir = std::env::temp_dir().join(format!("espd-lifestore-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let s = LifeStore::open(&dir).unwrap();
        assert_eq!(s.load("vpn1", 0x1234), None);
        let mut r = rec(s.boot());
        r.installed_ns = monotonic_ns();
        s.store("vpn1", 0x1234, &r).unwrap();
        s.store("a/b", 1, &r).unwrap();
        // Another boot's record and one long past its hard limit.
        s.store("old", 2, &rec("another-boot")).unwrap();
        let mut dead = rec(s.boot());
        dead.installed_ns = 0;
        dead.hard_secs = 1;
        if monotonic_ns() > PRUNE_GRACE_NS + 1_000_000_000 {
            s.store("dead", 3, &dead).unwrap();
        }
        fs::write(s.path("junk", 4), "junk").unwrap();
        let s2 = LifeStore::open(&dir).unwrap();
        assert_eq!(s2.load("vpn1", 0x1234), Some(r.clone()));
        assert_eq!(s2.load("a/b", 1), Some(r));
        assert_eq!(fs::read_dir(dir.join("espd-life")).unwrap().count(), 2);
        s2.remove("vpn1", 0x1234);
        assert_eq!(s2.load("vpn1", 0x1234), None);
        let _ = fs::remove_dir_all(dir);
    }
}
