//! Helpers shared by the ZeroMQ integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A unique run directory under /tmp, removed on drop (also when the test fails).
pub struct RunDir(PathBuf);

impl RunDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = PathBuf::from(format!(
            "/tmp/haven-bus-{tag}-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            now_ns() % 1_000_000_007
        ));
        std::fs::create_dir_all(&p).expect("create run dir");
        RunDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Generous bound for a test step; tests never assert timings, this only stops a hung test.
pub const PATIENCE: Duration = Duration::from_secs(30);
