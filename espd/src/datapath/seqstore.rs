//! Outbound sequence-number high-water marks persisted in `<run-dir>/espd-seq/`, one file
//! per outbound SA (`<tunnel>-<spi_out as 8 hex digits>`, holding the mark in decimal). A
//! mark is written to a temporary file, fsynced, renamed over the old one and the directory
//! fsynced before any number below it is used, so after a `kill -9` (or a power loss) the
//! SA resumes at or above every number it ever sent.
//!
//! A removed SA's mark stays: the same SA can come back (an HA member that handed a tunnel
//! over and takes it back from a standby copy without a lease record for it, a manual-key
//! tunnel removed from the configuration and added again) and must then resume above it.
//! Marks of SAs not installed are deleted once untouched for [`RETAIN`]. The exception is an
//! SA replaced by a rekey (its successor installed, the old one deleted by the IKE exchange
//! that replaced it): it never comes back, and with every CHILD SA rekeyed every few
//! minutes keeping its mark for two days would fill the directory, so its mark goes with
//! it ([`SeqStore::forget`]).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// How long the mark of an SA that is not installed is kept: FortiOS's longest phase2
/// key lifetime (172 800 s), so an SA that may still be alive somewhere keeps its mark.
pub const RETAIN: std::time::Duration = std::time::Duration::from_secs(172_800);

/// The directory of marks.
#[derive(Debug, Clone)]
pub struct SeqStore {
    dir: PathBuf,
}

/// The file name of an SA's record in a run-dir store: `<tunnel>-<spi as 8 hex digits>`.
/// Tunnel names are FortiOS object names; the file name keeps only safe characters.
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

impl SeqStore {
    /// Opens (creates, mode 0700) `<run_dir>/espd-seq`.
    pub fn open(run_dir: &Path) -> io::Result<SeqStore> {
        use std::os::unix::fs::PermissionsExt;
        let dir = run_dir.join("espd-seq");
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        Ok(SeqStore { dir })
    }

    fn path(&self, tunnel: &str, spi_out: u32) -> PathBuf {
        self.dir.join(sa_file_name(tunnel, spi_out))
    }

    /// The stored mark, 0 if there is none (or it is unreadable, which is logged).
    pub fn load(&self, tunnel: &str, spi_out: u32) -> u64 {
        let p = self.path(tunnel, spi_out);
        match fs::read_to_string(&p) {
            Ok(s) => match s.trim().parse() {
                Ok(v) => v,
                Err(_) => {
                    tracing::error!("{}: unreadable sequence mark {s:?}", p.display());
                    0
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => {
                tracing::error!("{}: {e}", p.display());
                0
            }
        }
    }

    /// Stores `hw` durably.
    pub fn store(&self, tunnel: &str, spi_out: u32, hw: u64) -> io::Result<()> {
        let p = self.path(tunnel, spi_out);
        let tmp = p.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            writeln!(f, "{hw}")?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &p)?;
        File::open(&self.dir)?.sync_all()
    }

    /// Deletes an SA's mark (an SA that was replaced and never comes back). A missing file
    /// is fine; another failure is logged and left to [`SeqStore::prune`].
    pub fn forget(&self, tunnel: &str, spi_out: u32) {
        let p = self.path(tunnel, spi_out);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("{}: cannot delete sequence mark: {e}", p.display()),
        }
    }

    /// Deletes the marks last written more than `retain` before `now` whose file name is
    /// not in `installed` ([`sa_file_name`] of the SAs in use), and leftover temporary
    /// files. Returns how many went.
    pub fn prune(
        &self,
        now: std::time::SystemTime,
        retain: std::time::Duration,
        installed: &std::collections::BTreeSet<String>,
    ) -> usize {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut gone = 0;
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if installed.contains(&name) {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > retain);
            if old && fs::remove_file(e.path()).is_ok() {
                gone += 1;
            }
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("espd-seqstore-{}", std::process::id()));
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
        assert_eq!(s.load("vpn1", 0x1234), 0);
        assert_eq!(s.load("a/b", 1), 7);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn prune_keeps_installed_and_recent_marks() {
        use std::collections::BTreeSet;
        use std::time::{Duration, SystemTime};
        let dir = std::env::temp_dir().join(format!("espd-seqprune-{}", std::process::id()));
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
        let _ = fs::remove_dir_all(dir);
    }
}
