//! Per-SA lifetime state persisted in the journal `<run-dir>/espd-life/records` (see
//! [`super::journal`]): per SA (`<tunnel>-<spi_in as 8 hex digits>`), when it was installed
//! (CLOCK_MONOTONIC, with the kernel's boot id), its inner packet and byte counts in each
//! direction, and whether its soft limits were reported. An espd restarted after `kill -9`
//! takes its SAs back from ikemgr's snapshot and, through these records, their age and
//! volume: a lifetime reached across the restart fires at the right total instead of
//! counting from zero.
//!
//! A line is `<name> <record>` ([`LifeRecord::encode`]) or `<name> -` (the SA was removed),
//! and the latest line of a name wins. The control side changes records in memory and
//! writes the changed ones in one append per tick ([`LifeStore::flush`]: no fsync, a power
//! loss ends the SAs anyway); it writes the counts every tick (200 ms) for SAs with a
//! volume limit and every second for the others, so a restart undercounts at most that
//! much traffic. An espd that finds per-SA files of an earlier version takes them in.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;

use esp_proto::Counters;

use super::journal::Journal;

/// The journal's file name in the store's directory.
const JOURNAL: &str = "records";

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

/// The SAs' records, in memory and in the journal.
#[derive(Debug)]
pub struct LifeStore {
    journal: Journal,
    live: HashMap<String, LifeRecord>,
    boot: String,
}

impl LifeStore {
    /// Opens (creates, mode 0700) `<run_dir>/espd-life`, reads its journal (and the per-SA
    /// files of an earlier espd), and drops the records of another boot and of SAs long
    /// past their hard time limit.
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
        let (journal, opened) = Journal::open(&dir, JOURNAL, false)?;
        let mut store = LifeStore {
            journal,
            live: HashMap::new(),
            boot,
        };
        let mut damaged = opened.damaged;
        for body in &opened.lines {
            match body.split_once(' ') {
                Some((name, "-")) => {
                    store.live.remove(name);
                }
                Some((name, rec)) => match LifeRecord::parse(rec) {
                    Some(r) => {
                        store.live.insert(name.to_string(), r);
                    }
                    None => damaged += 1,
                },
                None => damaged += 1,
            }
        }
        if damaged > 0 {
            tracing::warn!(
                "{}: skipped {damaged} damaged lifetime records",
                store.journal.path().display()
            );
        }
        // Per-SA files of an earlier espd.
        let mut old = Vec::new();
        for e in fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == JOURNAL || name == format!("{JOURNAL}.tmp") {
                continue;
            }
            if let Some(r) = fs::read_to_string(e.path())
                .ok()
                .and_then(|s| LifeRecord::parse(&s))
            {
                store.live.entry(name).or_insert(r);
            }
            old.push(e.path());
        }
        let now_ns = monotonic_ns();
        let before = store.live.len();
        let boot = store.boot.clone();
        store
            .live
            .retain(|_, r| r.boot == boot && !r.long_dead(now_ns));
        if store.live.len() < before || !old.is_empty() || damaged > 0 || opened.torn > 0 {
            store.rewrite()?;
        }
        for p in old {
            let _ = fs::remove_file(p);
        }
        Ok(store)
    }

    /// This boot's id, for new records.
    pub fn boot(&self) -> &str {
        &self.boot
    }

    fn rewrite(&mut self) -> io::Result<()> {
        let bodies: Vec<String> = self
            .live
            .iter()
            .map(|(name, r)| format!("{name} {}", r.encode().trim_end()))
            .collect();
        self.journal.rewrite(bodies.iter().map(String::as_str))
    }

    /// The record of this boot for the SA, if there is one.
    pub fn load(&self, tunnel: &str, spi_in: u32) -> Option<LifeRecord> {
        self.live
            .get(&super::seqstore::sa_file_name(tunnel, spi_in))
            .filter(|r| r.boot == self.boot)
            .cloned()
    }

    /// Sets the SA's record (written by the next [`LifeStore::flush`]).
    pub fn store(&mut self, tunnel: &str, spi_in: u32, rec: &LifeRecord) {
        let name = super::seqstore::sa_file_name(tunnel, spi_in);
        self.journal
            .append(&format!("{name} {}", rec.encode().trim_end()));
        self.live.insert(name, rec.clone());
    }

    /// Forgets the record of a removed SA (written by the next [`LifeStore::flush`]).
    pub fn remove(&mut self, tunnel: &str, spi_in: u32) {
        let name = super::seqstore::sa_file_name(tunnel, spi_in);
        if self.live.remove(&name).is_some() {
            self.journal.append(&format!("{name} -"));
        }
    }

    /// Writes the records changed since the last call (one append), and rewrites the
    /// journal with the live records once it holds many more lines than that.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.journal.pending() == 0 {
            return Ok(());
        }
        self.journal.write()?;
        if self.journal.wants_rewrite(self.live.len()) {
            self.rewrite()?;
        }
        Ok(())
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
        let mut s = LifeStore::open(&dir).unwrap();
        assert_eq!(s.load("vpn1", 0x1234), None);
        let mut r = rec(s.boot());
        r.installed_ns = monotonic_ns();
        s.store("vpn1", 0x1234, &r);
        s.store("a/b", 1, &r);
        // Another boot's record and one long past its hard limit.
        s.store("old", 2, &rec("another-boot"));
        let mut dead = rec(s.boot());
        dead.installed_ns = 0;
        dead.hard_secs = 1;
        if monotonic_ns() > PRUNE_GRACE_NS + 1_000_000_000 {
            s.store("dead", 3, &dead);
        }
        s.flush().unwrap();
        let mut s2 = LifeStore::open(&dir).unwrap();
        assert_eq!(s2.load("vpn1", 0x1234), Some(r.clone()));
        assert_eq!(s2.load("a/b", 1), Some(r.clone()));
        assert_eq!(s2.live.len(), 2, "{:?}", s2.live.keys());
        s2.remove("vpn1", 0x1234);
        assert_eq!(s2.load("vpn1", 0x1234), None);
        // Not written yet: a restart now would still find it.
        assert!(LifeStore::open(&dir)
            .unwrap()
            .load("vpn1", 0x1234)
            .is_some());
        let mut s2 = LifeStore::open(&dir).unwrap();
        s2.remove("vpn1", 0x1234);
        let mut later = r.clone();
        later.rx.packets += 10;
        s2.store("a/b", 1, &later);
        s2.flush().unwrap();
        let s3 = LifeStore::open(&dir).unwrap();
        assert_eq!(s3.load("vpn1", 0x1234), None);
        assert_eq!(s3.load("a/b", 1), Some(later));
        let _ = fs::remove_dir_all(dir);
    }

    /// An espd that kept one file per SA is replaced by this one: the records of this
    /// boot are taken in, every old file goes.
    #[test]
    fn per_sa_files_of_an_earlier_espd_are_taken_in() {
        let dir = std::env::temp_dir().join(format!("espd-lifemigrate-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let d = dir.join("espd-life");
        fs::create_dir_all(&d).unwrap();
        let boot = LifeStore::open(&dir).unwrap().boot().to_string();
        let mut r = rec(&boot);
        r.installed_ns = monotonic_ns();
        fs::write(
            d.join(super::super::seqstore::sa_file_name("vpn1", 7)),
            r.encode(),
        )
        .unwrap();
        fs::write(d.join("vpn1-00000008"), rec("another-boot").encode()).unwrap();
        fs::write(d.join("junk"), "junk").unwrap();
        let s = LifeStore::open(&dir).unwrap();
        assert_eq!(s.load("vpn1", 7), Some(r.clone()));
        assert_eq!(s.load("vpn1", 8), None);
        let names: Vec<String> = fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![JOURNAL.to_string()]);
        assert_eq!(LifeStore::open(&dir).unwrap().load("vpn1", 7), Some(r));
        let _ = fs::remove_dir_all(dir);
    }
}
