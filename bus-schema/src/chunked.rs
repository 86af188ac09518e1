//! A sorted map from keys to bodies whose copies share their storage in chunks: the table
//! type of [`crate::StateStore`].
//!
//! The entries sit in key order in chunks of at most [`MAX`] entries, each chunk behind an
//! `Arc`. Copying the map copies one pointer per chunk; changing an entry copies the one
//! chunk that holds it if another copy still shares it (copy-on-write). Two copies of one
//! map therefore share every chunk that no change touched, and [`ChunkMap::changes_since`]
//! skips a shared chunk without looking into it: a daemon following a store of 300 000
//! items pays for the chunks an update touched, not for the whole store.

use std::cmp::Ordering;
use std::sync::Arc;

use crate::schema::Body;

/// The most entries a chunk holds: an insert into a full chunk splits it in two halves.
pub(crate) const MAX: usize = 128;

/// A removal that leaves a chunk with fewer entries than this merges it with a neighbour
/// when the two fit in one chunk, so that removals do not leave a trail of tiny chunks.
const MIN: usize = MAX / 4;

type Entry = (Arc<str>, Arc<Body>);
type Chunk = Arc<Vec<Entry>>;

/// See the module documentation. Every chunk is non-empty, and every key of a chunk is
/// below every key of the next one.
#[derive(Clone, Default)]
pub(crate) struct ChunkMap {
    chunks: Vec<Chunk>,
    len: usize,
}

impl ChunkMap {
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The index of the chunk that holds `key` or would hold it: the first chunk whose last
    /// key is not below `key` (`chunks.len()` when `key` is above every key).
    fn chunk_for(&self, key: &str) -> usize {
        self.chunks
            .partition_point(|c| c.last().is_some_and(|(k, _)| &**k < key))
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Arc<Body>> {
        let c = self.chunks.get(self.chunk_for(key))?;
        let at = c.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        c.get(at).map(|(_, b)| b)
    }

    /// Puts `body` under `key`; returns the body it replaced.
    pub(crate) fn insert(&mut self, key: &str, body: Arc<Body>) -> Option<Arc<Body>> {
        if self.chunks.is_empty() {
            self.chunks.push(Arc::new(vec![(Arc::from(key), body)]));
            self.len = 1;
            return None;
        }
        // Above every key: the last chunk takes it.
        let i = self.chunk_for(key).min(self.chunks.len() - 1);
        let chunk = Arc::make_mut(&mut self.chunks[i]);
        match chunk.binary_search_by(|(k, _)| (**k).cmp(key)) {
            Ok(at) => Some(std::mem::replace(&mut chunk[at].1, body)),
            Err(at) => {
                chunk.insert(at, (Arc::from(key), body));
                self.len += 1;
                if chunk.len() > MAX {
                    let upper = chunk.split_off(chunk.len() / 2);
                    self.chunks.insert(i + 1, Arc::new(upper));
                }
                None
            }
        }
    }

    /// Removes `key`; returns its body.
    pub(crate) fn remove(&mut self, key: &str) -> Option<Arc<Body>> {
        let i = self.chunk_for(key);
        let at = self
            .chunks
            .get(i)?
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()?;
        let chunk = Arc::make_mut(&mut self.chunks[i]);
        let (_, body) = chunk.remove(at);
        self.len -= 1;
        let left = chunk.len();
        if left == 0 {
            self.chunks.remove(i);
        } else if left < MIN {
            // Merge with the smaller neighbour if the two fit in one chunk.
            let next = self.chunks.get(i + 1).map(|c| c.len());
            let prev = i
                .checked_sub(1)
                .and_then(|p| self.chunks.get(p))
                .map(|c| c.len());
            let with = match (prev, next) {
                (Some(p), Some(n)) if n < p => Some(i + 1),
                (Some(_), _) => Some(i),
                (None, Some(_)) => Some(i + 1),
                (None, None) => None,
            };
            // `with` is the upper chunk of the pair; it joins the one below it.
            if let Some(upper) =
                with.filter(|u| self.chunks[*u - 1].len() + self.chunks[*u].len() <= MAX)
            {
                let taken = self.chunks.remove(upper);
                let lower = Arc::make_mut(&mut self.chunks[upper - 1]);
                match Arc::try_unwrap(taken) {
                    Ok(v) => lower.extend(v),
                    Err(shared) => lower.extend(shared.iter().cloned()),
                }
            }
        }
        Some(body)
    }

    /// The entries in key order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<Body>)> {
        self.chunks
            .iter()
            .flat_map(|c| c.iter().map(|(k, b)| (k, b)))
    }

    /// The entries that differ between `older` and this map, in key order: the key and this
    /// map's body (`None`: not here). Chunks the two maps share are skipped whole; bodies
    /// the two share are equal by pointer; others are compared by value (a body stored anew
    /// with the same content is no change).
    pub(crate) fn changes_since<'a>(
        &'a self,
        older: &ChunkMap,
        mut each: impl FnMut(&Arc<str>, Option<&'a Arc<Body>>),
    ) {
        let (mut a, mut b) = (Cursor::new(self), Cursor::new(older));
        loop {
            if let (Some(ca), Some(cb)) = (a.shared_start(), b.shared_start()) {
                if Arc::ptr_eq(ca, cb) {
                    a.skip_chunk();
                    b.skip_chunk();
                    continue;
                }
            }
            let order = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((k, _)), Some((ok, _))) => k.cmp(ok),
            };
            match order {
                Ordering::Less => {
                    if let Some((k, v)) = a.next() {
                        each(k, Some(v));
                    }
                }
                Ordering::Greater => {
                    if let Some((k, _)) = b.next() {
                        each(k, None);
                    }
                }
                Ordering::Equal => {
                    if let (Some((k, v)), Some((_, ov))) = (a.next(), b.next()) {
                        if !Arc::ptr_eq(v, ov) && v != ov {
                            each(k, Some(v));
                        }
                    }
                }
            }
        }
    }

    /// Chunk sizes, for tests of the layout.
    #[cfg(test)]
    fn chunk_lens(&self) -> Vec<usize> {
        self.chunks.iter().map(|c| c.len()).collect()
    }
}

/// A position in a [`ChunkMap`]: chunk and entry within it.
struct Cursor<'a> {
    map: &'a ChunkMap,
    chunk: usize,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(map: &'a ChunkMap) -> Self {
        Cursor {
            map,
            chunk: 0,
            at: 0,
        }
    }

    /// The current chunk, if the cursor stands at its first entry.
    fn shared_start(&self) -> Option<&'a Chunk> {
        (self.at == 0)
            .then(|| self.map.chunks.get(self.chunk))
            .flatten()
    }

    fn skip_chunk(&mut self) {
        self.chunk += 1;
        self.at = 0;
    }

    fn peek(&self) -> Option<&'a Entry> {
        self.map.chunks.get(self.chunk)?.get(self.at)
    }

    fn next(&mut self) -> Option<&'a Entry> {
        let e = self.peek()?;
        self.at += 1;
        if self
            .map
            .chunks
            .get(self.chunk)
            .is_some_and(|c| self.at >= c.len())
        {
            self.skip_chunk();
        }
        Some(e)
    }
}

impl PartialEq for ChunkMap {
    /// Equal contents, however they are chunked.
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self
                .iter()
                .zip(other.iter())
                .all(|((k, v), (ok, ov))| k == ok && (Arc::ptr_eq(v, ov) || v == ov))
    }
}

impl std::fmt::Debug for ChunkMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn body(n: u64) -> Arc<Body> {
        Arc::new(Body::Heartbeat { uptime_ms: n })
    }

    use crate::test_rng::Rng;

    /// Every chunk non-empty and at most MAX long, keys strictly rising across chunks, and
    /// the length right.
    fn check_layout(m: &ChunkMap) {
        assert!(m.chunks.iter().all(|c| !c.is_empty() && c.len() <= MAX));
        let keys: Vec<&Arc<str>> = m.iter().map(|(k, _)| k).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "keys out of order");
        assert_eq!(keys.len(), m.len);
    }

    #[test]
    fn behaves_as_a_sorted_map_and_copies_stay_apart_under_any_sequence() {
        let mut r = Rng(0x2545_f491_4f6c_dd1d);
        for round in 0..40 {
            // Key spaces from a few keys (replacements) to many (splits and merges).
            let space = [8, 300, 2_000][round % 3];
            let mut m = ChunkMap::default();
            let mut model: BTreeMap<String, u64> = BTreeMap::new();
            let mut copies: Vec<(ChunkMap, BTreeMap<String, u64>)> = Vec::new();
            for step in 0..3_000 {
                let key = format!("t{:05}", r.below(space));
                // Inserts outweigh removals at first, then the other way round.
                let remove = r.below(10) < if step < 1_500 { 3 } else { 7 };
                if remove {
                    let got = m.remove(&key).map(|b| (*b).clone());
                    let want = model.remove(&key).map(|n| (*body(n)).clone());
                    assert_eq!(got, want, "remove {key}");
                } else {
                    let n = r.below(4);
                    let got = m.insert(&key, body(n)).map(|b| (*b).clone());
                    let want = model.insert(key.clone(), n).map(|n| (*body(n)).clone());
                    assert_eq!(got, want, "insert {key}");
                }
                if r.below(200) == 0 {
                    copies.push((m.clone(), model.clone()));
                }
                if step % 97 == 0 {
                    check_layout(&m);
                    let probe = format!("t{:05}", r.below(space));
                    assert_eq!(
                        m.get(&probe).map(|b| (**b).clone()),
                        model.get(&probe).map(|n| (*body(*n)).clone())
                    );
                }
            }
            check_layout(&m);
            let got: Vec<(String, Body)> = m
                .iter()
                .map(|(k, b)| (k.to_string(), (**b).clone()))
                .collect();
            let want: Vec<(String, Body)> = model
                .iter()
                .map(|(k, n)| (k.clone(), (*body(*n)).clone()))
                .collect();
            assert_eq!(got, want);
            // Every earlier copy still holds what the map held then, and the changes since
            // it are exactly what differs between the two models.
            for (copy, then) in &copies {
                check_layout(copy);
                let held: BTreeMap<String, u64> = copy
                    .iter()
                    .map(|(k, b)| match **b {
                        Body::Heartbeat { uptime_ms } => (k.to_string(), uptime_ms),
                        _ => unreachable!(),
                    })
                    .collect();
                assert_eq!(&held, then);
                let mut changes = Vec::new();
                m.changes_since(copy, |k, b| {
                    changes.push((k.to_string(), b.map(|b| (**b).clone())))
                });
                let keys: BTreeMap<&String, ()> =
                    model.keys().chain(then.keys()).map(|k| (k, ())).collect();
                let want: Vec<(String, Option<Body>)> = keys
                    .into_keys()
                    .filter(|k| model.get(*k) != then.get(*k))
                    .map(|k| (k.clone(), model.get(k).map(|n| (*body(*n)).clone())))
                    .collect();
                assert_eq!(changes, want);
            }
        }
    }

    #[test]
    fn a_copy_shares_every_chunk_no_change_touched() {
        let mut m = ChunkMap::default();
        for i in 0..10_000u64 {
            m.insert(&format!("k{i:06}"), body(i));
        }
        check_layout(&m);
        let copy = m.clone();
        m.insert("k004242", body(1));
        let shared = m
            .chunks
            .iter()
            .zip(copy.chunks.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert_eq!(
            shared,
            m.chunks.len() - 1,
            "only the changed chunk is copied"
        );
        let mut changes = Vec::new();
        m.changes_since(&copy, |k, _| changes.push(k.to_string()));
        assert_eq!(changes, ["k004242"]);
        // Removals merge small chunks back: emptying most of the map leaves few chunks.
        for i in 0..10_000u64 {
            if i % 50 != 0 {
                m.remove(&format!("k{i:06}"));
            }
        }
        check_layout(&m);
        assert_eq!(m.len, 200);
        assert!(
            m.chunk_lens().len() <= 200 / MIN + 1,
            "{:?}",
            m.chunk_lens()
        );
        // A map built in another order holds the same and compares equal.
        let mut other = ChunkMap::default();
        for i in (0..10_000u64).rev().filter(|i| i % 50 == 0) {
            other.insert(&format!("k{i:06}"), body(i));
        }
        assert_eq!(m, other);
        let mut none = 0;
        m.changes_since(&other, |_, _| none += 1);
        assert_eq!(none, 0, "equal bodies stored apart are no change");
    }
}
