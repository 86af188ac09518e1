//! Outbound sequence-number high-water marks persisted in `<run-dir>/espd-seq/`, one file
//! per outbound SA (`<tunnel>-<spi_out as 8 hex digits>`, holding the mark in decimal). A
//! mark is written to a temporary file, fsynced, renamed over the old one and the directory
//! fsynced before any number below it is used, so after a `kill -9` (or a power loss) the
//! SA resumes at or above every number it ever sent.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

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

    /// Forgets the mark of a removed SA.
    pub fn remove(&self, tunnel: &str, spi_out: u32) {
        let _ = fs::remove_file(self.path(tunnel, spi_out));
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
        s2.remove("vpn1", 0x1234);
        assert_eq!(s2.load("vpn1", 0x1234), 0);
        let _ = fs::remove_dir_all(dir);
    }
}
