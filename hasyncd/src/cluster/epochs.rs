//! This member's HA link epochs, kept across restarts.
//!
//! A sender's link key and AES-GCM nonces are unique only while no two of its starts share
//! an epoch (ha-core `link`): a repeated epoch repeats the key, and its counters start at 0
//! again, so nonces repeat under one key. The epoch is the wall clock in ms, which a clock
//! stepped back (NTP after a cold boot, a VM restored from a snapshot) can bring below one
//! already used. Each epoch is therefore also above every epoch this member used before:
//! the last one is kept in `<run-dir>/ha-link-epoch`, written (and synced) before the link
//! seals anything with the new one.
//!
//! A file that cannot be read or written is logged (with its path and the error) and the
//! link starts all the same on the wall clock: the HA link matters more than the margin the
//! file adds against a clock stepped back at that same restart.

use std::io::Write;
use std::path::{Path, PathBuf};

/// File name in the run-dir.
pub const EPOCH_FILE: &str = "ha-link-epoch";

/// Hands out epochs above the wall clock and above every earlier one.
#[derive(Debug)]
pub struct EpochStore {
    path: Option<PathBuf>,
    last: Option<u64>,
}

impl EpochStore {
    /// Epochs kept in `run_dir`.
    pub fn open(run_dir: &Path) -> EpochStore {
        EpochStore {
            path: Some(run_dir.join(EPOCH_FILE)),
            last: None,
        }
    }

    /// Epochs kept in memory only (unit tests).
    #[cfg(test)]
    pub fn in_memory() -> EpochStore {
        EpochStore {
            path: None,
            last: None,
        }
    }

    /// A new epoch at wall-clock `now_ms`, recorded before it is returned.
    pub fn next(&mut self, now_ms: u64) -> u64 {
        let stored = match self.read() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("HA link epoch: {e}; starting from the wall clock");
                None
            }
        };
        let before = self.last.max(stored);
        let epoch = ha_core::link::next_epoch(before, now_ms)
            .unwrap_or(now_ms)
            .max(1);
        if let Err(e) = self.write(epoch) {
            tracing::error!("HA link epoch {epoch} not kept: {e}");
        }
        self.last = Some(epoch);
        epoch
    }

    fn read(&self) -> Result<Option<u64>, String> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                text.trim().parse::<u64>().map(Some).map_err(|e| {
                    format!("{}: not an epoch ({e}): {:?}", path.display(), text.trim())
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Replaces the file atomically (temporary file, fsync, rename, fsync of the directory).
    fn write(&self, epoch: u64) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let tmp = path.with_extension("tmp");
        let what = |e: std::io::Error, p: &Path| format!("{}: {e}", p.display());
        let mut f = std::fs::File::create(&tmp).map_err(|e| what(e, &tmp))?;
        f.write_all(format!("{epoch}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| what(e, &tmp))?;
        std::fs::rename(&tmp, path).map_err(|e| what(e, path))?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| what(e, dir))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_grow_across_restarts_even_when_the_clock_goes_back() {
        let dir = std::env::temp_dir().join(format!("hasyncd-epochs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t = 1_800_000_000_000;
        let first = EpochStore::open(&dir).next(t);
        assert_eq!(first, t);
        // The same start again within the millisecond: above it.
        let mut s = EpochStore::open(&dir);
        assert_eq!(s.next(t), t + 1);
        // A restart after the wall clock was stepped back an hour.
        let mut after = EpochStore::open(&dir);
        assert_eq!(after.next(t - 3_600_000), t + 2);
        // The clock ahead again: the clock wins.
        assert_eq!(after.next(t + 10), t + 10);
        assert_eq!(
            std::fs::read_to_string(dir.join(EPOCH_FILE))
                .unwrap()
                .trim(),
            (t + 10).to_string()
        );
        // A damaged file is reported and replaced; the epoch comes from the clock and what
        // this process used.
        std::fs::write(dir.join(EPOCH_FILE), "garbage").unwrap();
        assert_eq!(after.next(t - 5), t + 11);
        assert_eq!(EpochStore::open(&dir).next(t - 5), t + 12);
        let _ = std::fs::remove_dir_all(&dir);
        // In memory: still strictly increasing within the process.
        let mut m = EpochStore::in_memory();
        assert_eq!(m.next(5), 5);
        assert_eq!(m.next(5), 6);
        assert_eq!(m.next(0), 7);
    }
}
