//! An append-only file of text records, one per line, each ending in a check word (the
//! FNV-1a hash of the rest of the line as 8 hex digits), shared by the sequence marks
//! ([`super::seqstore`]) and the lifetime records ([`super::lifestore`]). The owner keeps
//! the live state in memory, appends a line per change, writes the appended lines in one
//! `write` (and, for the marks, one `fdatasync`), and rewrites the file with its live
//! records once the file holds many more lines than that.
//!
//! When it opens, a line whose check does not match (damaged on disk) is skipped and
//! counted, and an unfinished last line (torn by a crash in the middle of a write) is cut
//! off, so the next line written starts on a line of its own. A failed write is cut off too.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The file is rewritten when it holds more than this many lines per live record...
const COMPACT_RATIO: usize = 4;
/// ...and more than this many lines in all.
pub(crate) const COMPACT_MIN: usize = 4_096;

/// FNV-1a, 32 bits: enough to tell a torn or damaged line from a whole one.
fn check(body: &str) -> u32 {
    body.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// `line` without its check word, if the check matches.
pub(crate) fn verified(line: &str) -> Option<&str> {
    let (body, sum) = line.rsplit_once(' ')?;
    (sum.len() == 8 && u32::from_str_radix(sum, 16).ok()? == check(body)).then_some(body)
}

/// What [`Journal::open`] read.
pub(crate) struct Opened {
    /// The file's valid lines, in order, without their check words.
    pub lines: Vec<String>,
    /// Lines skipped for a check that did not match.
    pub damaged: usize,
    /// Bytes of an unfinished last line that were cut off.
    pub torn: usize,
}

#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    name: &'static str,
    file: File,
    /// Bytes of the file that hold whole lines.
    len: u64,
    /// Lines in the file.
    lines: usize,
    /// Lines appended and not yet written.
    pending: Vec<u8>,
    pending_lines: usize,
    /// Whether writes are followed by `fdatasync` (and a rewrite by fsyncs of the file and
    /// the directory).
    durable: bool,
}

impl Journal {
    /// Opens (creates) `dir/name` and reads it.
    pub fn open(dir: &Path, name: &'static str, durable: bool) -> io::Result<(Journal, Opened)> {
        let path = dir.join(name);
        let mut raw = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut raw)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let whole = raw.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut opened = Opened {
            lines: Vec::new(),
            damaged: 0,
            torn: raw.len() - whole,
        };
        for line in raw[..whole]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
        {
            match std::str::from_utf8(line).ok().and_then(verified) {
                Some(body) => opened.lines.push(body.to_string()),
                None => opened.damaged += 1,
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if opened.torn > 0 {
            file.set_len(whole as u64)?;
            if durable {
                file.sync_all()?;
            }
        }
        let j = Journal {
            dir: dir.to_path_buf(),
            name,
            file,
            len: whole as u64,
            lines: opened.lines.len() + opened.damaged,
            pending: Vec::new(),
            pending_lines: 0,
            durable,
        };
        Ok((j, opened))
    }

    /// The file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(self.name)
    }

    /// Appends `body` (no newline in it) with its check word; written by the next
    /// [`Journal::write`].
    pub fn append(&mut self, body: &str) {
        let _ = writeln!(self.pending, "{body} {:08x}", check(body));
        self.pending_lines += 1;
    }

    /// Lines appended and not yet written.
    pub fn pending(&self) -> usize {
        self.pending_lines
    }

    /// Writes what was appended (one write; durable: and one `fdatasync`). On a failure the
    /// file is cut back to the lines it was known to hold, and the same lines are written
    /// again next time.
    pub fn write(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut written = self.file.write_all(&self.pending);
        if self.durable {
            written = written.and_then(|()| self.file.sync_data());
        }
        if let Err(e) = written {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += self.pending.len() as u64;
        self.lines += self.pending_lines;
        self.pending.clear();
        self.pending_lines = 0;
        Ok(())
    }

    /// Whether the file holds enough more lines than the `live` records to be rewritten.
    pub fn wants_rewrite(&self, live: usize) -> bool {
        self.lines > COMPACT_MIN && self.lines > COMPACT_RATIO.saturating_mul(live)
    }

    /// Replaces the file with `bodies` (the live records; what was pending is dropped, the
    /// bodies stand for it): a temporary file, (durable: synced,) renamed over the file,
    /// (and the directory synced).
    pub fn rewrite<'a>(&mut self, bodies: impl Iterator<Item = &'a str>) -> io::Result<()> {
        let mut out = Vec::new();
        let mut n = 0;
        for body in bodies {
            let _ = writeln!(out, "{body} {:08x}", check(body));
            n += 1;
        }
        let tmp = self.dir.join(format!("{}.tmp", self.name));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&out)?;
            if self.durable {
                f.sync_all()?;
            }
        }
        fs::rename(&tmp, self.path())?;
        if self.durable {
            File::open(&self.dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(self.path())?;
        self.len = out.len() as u64;
        self.lines = n;
        self.pending.clear();
        self.pending_lines = 0;
        Ok(())
    }

    /// Lines in the file (for tests).
    #[cfg(test)]
    pub fn lines(&self) -> usize {
        self.lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crash in the middle of a write leaves an unfinished last line: it is cut off, and
    /// the next line starts on a line of its own. A damaged line in the middle is skipped.
    #[test]
    fn torn_and_damaged_lines_are_refused() {
        let dir = std::env::temp_dir().join(format!("espd-journal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (mut j, o) = Journal::open(&dir, "t", true).unwrap();
        assert!(o.lines.is_empty());
        j.append("a 1");
        j.append("b 8192");
        j.write().unwrap();
        let path = j.path();
        drop(j);
        let mut text = fs::read_to_string(&path).unwrap();
        text = text.replacen(" 8192 ", " 9192 ", 1);
        text.push_str("c 12");
        fs::write(&path, &text).unwrap();
        let (mut j, o) = Journal::open(&dir, "t", true).unwrap();
        assert_eq!(o.lines, vec!["a 1".to_string()]);
        assert_eq!((o.damaged, o.torn), (1, 4));
        j.append("c 1228");
        j.write().unwrap();
        let (_, o) = Journal::open(&dir, "t", true).unwrap();
        assert_eq!(o.lines, vec!["a 1".to_string(), "c 1228".to_string()]);
        assert_eq!((o.damaged, o.torn), (1, 0));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_rewrite_keeps_only_the_live_lines() {
        let dir = std::env::temp_dir().join(format!("espd-journal-rw-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (mut j, _) = Journal::open(&dir, "t", false).unwrap();
        for i in 0..=COMPACT_MIN {
            j.append(&format!("k {i}"));
        }
        j.write().unwrap();
        assert!(j.wants_rewrite(1));
        assert!(!j.wants_rewrite(COMPACT_MIN));
        j.rewrite(["k 4096"].into_iter()).unwrap();
        assert_eq!(j.lines(), 1);
        j.append("k 4097");
        j.write().unwrap();
        let (_, o) = Journal::open(&dir, "t", false).unwrap();
        assert_eq!(o.lines, vec!["k 4096".to_string(), "k 4097".to_string()]);
        let _ = fs::remove_dir_all(dir);
    }
}
