//! Outbound sequence-number high-water marks, persisted in one journal,
//! `<run-dir>/espd-seq/marks`. Each record is a text line
//! `<tunnel>-<spi_out as 8 hex digits> <mark> <unix seconds> <check>`, where the check is
//! the FNV-1a hash of what precedes it, so a line torn by a crash or damaged on disk is
//! recognised and skipped. A mark is appended ([`SeqStore::append`]) and made durable by
//! [`SeqStore::sync`] (one `fdatasync` for every mark appended since the last one) before
//! any number below it is used, so after a `kill -9` (or a power loss) the SA resumes at
//! or above every number it ever sent. The latest valid record of an SA wins; its mark
//! never goes down, and a mark of 0 forgets it.
//!
//! One file and one sync for a batch is what makes this cheap: a replica update that
//! installs a hundred SAs costs one `fdatasync`, where one file per SA cost two fsyncs, an
//! inode and a rename each, on the control actor's thread (with the per-SA lifetime files,
//! up to 1.8 s per update in a 1 000-tunnel soak; espd/README.md has the figures). When the journal holds several times more records than live
//! marks it is rewritten with the live ones (a temporary file, synced, renamed over it,
//! and the directory synced). A store that still has per-SA files of an earlier espd takes
//! their marks in when it opens, writes them to the journal and only then deletes them.
//!
//! A removed SA's mark stays: the same SA can come back (an HA member that handed a tunnel
//! over and takes it back from a standby copy without a lease record for it, a manual-key
//! tunnel removed from the configuration and added again) and must then resume above it.
//! Marks of SAs not installed are dropped once untouched for [`RETAIN`]. The exception is an
//! SA replaced by a rekey (its successor installed, the old one deleted by the IKE exchange
//! that replaced it): it never comes back, and with every CHILD SA rekeyed every few
//! minutes keeping its mark for two days would grow the journal, so its mark goes with it
//! ([`SeqStore::forget`]).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::journal::Journal;

/// How long the mark of an SA that is not installed is kept: FortiOS's longest phase2
/// key lifetime (172 800 s), so an SA that may still be alive somewhere keeps its mark.
pub const RETAIN: Duration = Duration::from_secs(172_800);

/// The journal's file name in the store's directory.
const JOURNAL: &str = "marks";

/// The journal of marks; cheap to clone (the datapath's control side and its housekeeping
/// thread share one).
#[derive(Debug, Clone)]
pub struct SeqStore {
    inner: Arc<Mutex<Marks>>,
}

#[derive(Debug)]
struct Marks {
    journal: Journal,
    /// Live marks by [`sa_file_name`]: (mark, unix seconds it was last written).
    live: HashMap<String, (u64, u64)>,
}

/// The name of an SA's record: `<tunnel>-<spi as 8 hex digits>`. Tunnel names are
/// FortiOS object names; the name keeps only safe characters (also used by the lifetime
/// records, [`super::lifestore`]).
pub(crate) fn sa_file_name(tunnel: &str, spi: u32) -> String {
    let safe: String = tunnel
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}-{spi:08x}")
}

/// A journal line without its check word: (name, mark, seconds).
fn parse_record(body: &str) -> Option<(&str, u64, u64)> {
    let mut it = body.split(' ');
    let (key, hw, secs) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || key.is_empty() {
        return None;
    }
    Some((key, hw.parse().ok()?, secs.parse().ok()?))
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Whether `name` is an SA's per-file mark of an earlier espd (`<name>-<8 hex digits>`).
fn is_old_mark_file(name: &str) -> bool {
    name.rsplit_once('-').is_some_and(|(t, spi)| {
        !t.is_empty() && spi.len() == 8 && spi.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

impl Marks {
    /// Applies a record to the live marks: the highest mark wins, 0 forgets.
    fn apply(&mut self, key: &str, hw: u64, secs: u64) {
        if hw == 0 {
            self.live.remove(key);
            return;
        }
        let m = self.live.entry(key.to_string()).or_insert((0, secs));
        m.0 = m.0.max(hw);
        m.1 = m.1.max(secs);
    }

    fn append(&mut self, key: &str, hw: u64, secs: u64) {
        self.journal.append(&format!("{key} {hw} {secs}"));
        self.apply(key, hw, secs);
    }

    fn sync(&mut self) -> io::Result<()> {
        self.journal.write()?;
        if self.journal.wants_rewrite(self.live.len()) {
            if let Err(e) = self.rewrite() {
                tracing::warn!("{}: cannot rewrite: {e}", self.journal.path().display());
            }
        }
        Ok(())
    }

    /// Rewrites the journal with the live marks only (pending records included).
    fn rewrite(&mut self) -> io::Result<()> {
        let bodies: Vec<String> = self
            .live
            .iter()
            .map(|(key, (hw, secs))| format!("{key} {hw} {secs}"))
            .collect();
        self.journal.rewrite(bodies.iter().map(String::as_str))
    }
}

impl SeqStore {
    /// Opens (creates, mode 0700) `<run_dir>/espd-seq` and reads its journal: damaged lines
    /// are skipped and a torn last line is cut off (both logged); per-SA files of an
    /// earlier espd are taken in.
    pub fn open(run_dir: &Path) -> io::Result<SeqStore> {
        use std::os::unix::fs::PermissionsExt;
        let dir = run_dir.join("espd-seq");
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let (journal, opened) = Journal::open(&dir, JOURNAL, true)?;
        let mut m = Marks {
            journal,
            live: HashMap::new(),
        };
        let mut damaged = opened.damaged;
        for body in &opened.lines {
            match parse_record(body) {
                Some((key, hw, secs)) => m.apply(key, hw, secs),
                None => damaged += 1,
            }
        }
        let path = m.journal.path();
        if damaged > 0 {
            tracing::error!(
                "{}: skipped {damaged} damaged sequence-mark records",
                path.display()
            );
        }
        if opened.torn > 0 {
            tracing::warn!(
                "{}: cut off {} bytes of a record torn by a crash (it was never synced, so no number below it was used)",
                path.display(),
                opened.torn
            );
        }
        // Per-SA files of an earlier espd: into the journal, durably, before they go.
        let mut old = Vec::new();
        for e in fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == JOURNAL || name == format!("{JOURNAL}.tmp") {
                continue;
            }
            if name.ends_with(".tmp") {
                old.push((e.path(), false));
                continue;
            }
            if !is_old_mark_file(&name) {
                continue;
            }
            let secs = e
                .metadata()
                .and_then(|md| md.modified())
                .map_or(0, unix_secs);
            match fs::read_to_string(e.path()).map(|s| s.trim().parse::<u64>()) {
                Ok(Ok(hw)) => {
                    m.append(&name, hw.max(1), secs);
                    old.push((e.path(), true));
                }
                _ => tracing::error!(
                    "{}: unreadable sequence mark; left alone",
                    e.path().display()
                ),
            }
        }
        if !old.is_empty() {
            m.sync()?;
            let taken = old.iter().filter(|(_, mark)| *mark).count();
            for (p, _) in &old {
                let _ = fs::remove_file(p);
            }
            if taken > 0 {
                tracing::info!(
                    "{}: took {taken} per-SA sequence marks into the journal",
                    dir.display()
                );
            }
        }
        Ok(SeqStore {
            inner: Arc::new(Mutex::new(m)),
        })
    }

    fn marks(&self) -> MutexGuard<'_, Marks> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stored mark, 0 if there is none.
    pub fn load(&self, tunnel: &str, spi_out: u32) -> u64 {
        self.marks()
            .live
            .get(&sa_file_name(tunnel, spi_out))
            .map_or(0, |m| m.0)
    }

    /// Appends `hw` for the SA; it is durable after the next successful
    /// [`SeqStore::sync`], and no number below it may be used before.
    pub fn append(&self, tunnel: &str, spi_out: u32, hw: u64) {
        let secs = unix_secs(SystemTime::now());
        self.marks()
            .append(&sa_file_name(tunnel, spi_out), hw.max(1), secs);
    }

    /// Whether marks were appended since the last sync.
    pub fn pending(&self) -> bool {
        self.marks().journal.pending() > 0
    }

    /// Makes every mark appended so far durable (one write and one `fdatasync`).
    pub fn sync(&self) -> io::Result<()> {
        self.marks().sync()
    }

    /// Stores `hw` durably ([`SeqStore::append`] and [`SeqStore::sync`]).
    #[cfg(test)]
    pub fn store(&self, tunnel: &str, spi_out: u32, hw: u64) -> io::Result<()> {
        self.append(tunnel, spi_out, hw);
        self.sync()
    }

    /// Forgets an SA's mark (an SA that was replaced and never comes back). Written with
    /// the next sync (the datapath syncs when it publishes the table without the SA): if
    /// espd dies first, the mark stays until [`SeqStore::prune`].
    pub fn forget(&self, tunnel: &str, spi_out: u32) {
        let secs = unix_secs(SystemTime::now());
        let key = sa_file_name(tunnel, spi_out);
        let mut m = self.marks();
        if m.live.contains_key(&key) {
            m.append(&key, 0, secs);
        }
    }

    /// Drops the marks last written more than `retain` before `now` whose name is not in
    /// `installed` ([`sa_file_name`] of the SAs in use), rewriting the journal when any
    /// went. Returns how many went.
    pub fn prune(&self, now: SystemTime, retain: Duration, installed: &BTreeSet<String>) -> usize {
        let now = unix_secs(now);
        let mut m = self.marks();
        let before = m.live.len();
        m.live.retain(|k, (_, secs)| {
            installed.contains(k) || now.saturating_sub(*secs) <= retain.as_secs()
        });
        let gone = before - m.live.len();
        if gone > 0 {
            if let Err(e) = m.rewrite() {
                tracing::warn!("{}: cannot rewrite: {e}", m.journal.path().display());
            }
        }
        gone
    }

    /// Lines in the journal file and live marks (for tests).
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let m = self.marks();
        (m.journal.lines(), m.live.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("espd-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn marks_survive_reopen() {
        let dir = scratch("seqstore");
        let s = SeqStore::open(&dir).unwrap();
        assert_eq!(s.load("vpn1", 0x1234), 0);
        s.store("vpn1", 0x1234, 1 << 20).unwrap();
        s.store("vpn1", 0x1234, 2 << 20).unwrap();
        s.store("a/b", 1, 7).unwrap();
        let s2 = SeqStore::open(&dir).unwrap();
        assert_eq!(s2.load("vpn1", 0x1234), 2 << 20);
        assert_eq!(s2.load("a/b", 1), 7);
        assert_eq!(s2.load("vpn1", 0x1235), 0);
        s2.forget("vpn1", 0x1234);
        s2.forget("vpn1", 0x1234);
        assert_eq!(s2.load("vpn1", 0x1234), 0);
        s2.sync().unwrap();
        let s3 = SeqStore::open(&dir).unwrap();
        assert_eq!(s3.load("vpn1", 0x1234), 0);
        assert_eq!(s3.load("a/b", 1), 7);
        let _ = fs::remove_dir_all(dir);
    }

    /// Nothing appended is on disk before the sync; after it, all of it is, in one write.
    #[test]
    fn a_batch_is_durable_only_after_its_sync() {
        let dir = scratch("seqbatch");
        let s = SeqStore::open(&dir).unwrap();
        for spi in 1..=100 {
            s.append("vpn1", spi, u64::from(spi) * 1000);
        }
        assert_eq!(SeqStore::open(&dir).unwrap().load("vpn1", 7), 0);
        s.sync().unwrap();
        let again = SeqStore::open(&dir).unwrap();
        assert_eq!(again.load("vpn1", 7), 7000);
        assert_eq!(again.counts(), (100, 100));
        let _ = fs::remove_dir_all(dir);
    }

    /// A mark never goes down, whatever order the records come in.
    #[test]
    fn a_lower_mark_does_not_replace_a_higher_one() {
        let dir = scratch("seqmax");
        let s = SeqStore::open(&dir).unwrap();
        s.store("vpn1", 1, 5000).unwrap();
        s.store("vpn1", 1, 3000).unwrap();
        assert_eq!(s.load("vpn1", 1), 5000);
        assert_eq!(SeqStore::open(&dir).unwrap().load("vpn1", 1), 5000);
        let _ = fs::remove_dir_all(dir);
    }

    /// A crash in the middle of a write leaves a torn last line: it is cut off, and the
    /// next record starts on a line of its own. A damaged line in the middle is skipped,
    /// not taken for another mark.
    #[test]
    fn torn_and_damaged_records_are_refused() {
        let dir = scratch("seqtorn");
        let s = SeqStore::open(&dir).unwrap();
        s.store("vpn1", 1, 4096).unwrap();
        s.store("vpn1", 2, 8192).unwrap();
        drop(s);
        let path = dir.join("espd-seq").join(JOURNAL);
        let mut text = fs::read_to_string(&path).unwrap();
        // Damage the second record's mark (8192 -> 9192) and tear a third one.
        text = text.replacen(" 8192 ", " 9192 ", 1);
        text.push_str("vpn1-00000003 1228");
        fs::write(&path, &text).unwrap();
        let s = SeqStore::open(&dir).unwrap();
        assert_eq!(s.load("vpn1", 1), 4096);
        assert_eq!(s.load("vpn1", 2), 0, "a damaged record is not a mark");
        assert_eq!(s.load("vpn1", 3), 0, "a torn record is not a mark");
        s.store("vpn1", 3, 12288).unwrap();
        let s = SeqStore::open(&dir).unwrap();
        assert_eq!(s.load("vpn1", 3), 12288);
        assert_eq!(s.load("vpn1", 1), 4096);
        let _ = fs::remove_dir_all(dir);
    }

    /// The journal is rewritten once it holds many times more records than live marks;
    /// the marks are the same afterwards.
    #[test]
    fn the_journal_is_compacted() {
        let dir = scratch("seqcompact");
        let s = SeqStore::open(&dir).unwrap();
        use super::super::journal::COMPACT_MIN;
        for i in 1..=(COMPACT_MIN as u64 + 10) {
            s.append("vpn1", (i % 3) as u32, i * 2048);
            if i % 64 == 0 {
                s.sync().unwrap();
            }
        }
        s.sync().unwrap();
        let (records, live) = s.counts();
        assert_eq!(live, 3);
        assert!(records < COMPACT_MIN, "{records} records after compaction");
        let again = SeqStore::open(&dir).unwrap();
        let top = COMPACT_MIN as u64 + 10;
        assert_eq!(again.load("vpn1", (top % 3) as u32), top * 2048);
        assert_eq!(again.load("vpn1", ((top - 1) % 3) as u32), (top - 1) * 2048);
        let _ = fs::remove_dir_all(dir);
    }

    /// An espd that kept one file per SA is replaced by this one: its marks go into the
    /// journal before its files go.
    #[test]
    fn per_sa_files_of_an_earlier_espd_are_taken_in() {
        let dir = scratch("seqmigrate");
        let d = dir.join("espd-seq");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(sa_file_name("vpn1", 0xc0ffee)), "77340033\n").unwrap();
        fs::write(d.join(sa_file_name("vpn1", 0xc0ffef)), "garbage\n").unwrap();
        fs::write(d.join("vpn1-00c0fff0.tmp"), "1\n").unwrap();
        let s = SeqStore::open(&dir).unwrap();
        assert_eq!(s.load("vpn1", 0xc0ffee), 77_340_033);
        assert!(!d.join(sa_file_name("vpn1", 0xc0ffee)).exists());
        assert!(!d.join("vpn1-00c0fff0.tmp").exists());
        assert!(
            d.join(sa_file_name("vpn1", 0xc0ffef)).exists(),
            "an unreadable file is left for the operator"
        );
        assert_eq!(
            SeqStore::open(&dir).unwrap().load("vpn1", 0xc0ffee),
            77_340_033
        );
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn prune_keeps_installed_and_recent_marks() {
        let dir = scratch("seqprune");
        let s = SeqStore::open(&dir).unwrap();
        s.store("vpn1", 1, 100).unwrap();
        s.store("vpn1", 2, 200).unwrap();
        let installed: BTreeSet<String> = [sa_file_name("vpn1", 1)].into();
        let now = SystemTime::now();
        // Just written: nothing is old enough.
        assert_eq!(s.prune(now, RETAIN, &installed), 0);
        assert_eq!(s.load("vpn1", 2), 200);
        // Three days on: the mark of the SA not installed goes, the installed one stays.
        let later = now + Duration::from_secs(3 * 86_400);
        assert_eq!(s.prune(later, RETAIN, &installed), 1);
        assert_eq!(s.load("vpn1", 1), 100);
        assert_eq!(s.load("vpn1", 2), 0);
        let again = SeqStore::open(&dir).unwrap();
        assert_eq!(again.load("vpn1", 2), 0);
        assert_eq!(again.load("vpn1", 1), 100);
        let _ = fs::remove_dir_all(dir);
    }
}
