//! A hash map in shards shared between versions of the workers' table.
//!
//! The workers read one immutable [`super::table::Table`] at a time, and every install or
//! removal publishes a new one. Built whole, a table of 100 000 SAs cost about 100 ms per
//! publication (its SPI map and peer set hashed again, each device's routes sorted again),
//! so a dial-up client coming or a rekey cost that much of espd's control thread. In
//! [`SHARDS`] shards, each behind an `Arc`, a new version copies the shard pointers and
//! copies only the shards a change touches (`Arc::make_mut`): at 100 000 entries, a change
//! costs one shard of about 400 entries. A shard no change touched stays shared with the
//! older versions that workers may still read.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

/// Shards per map (a power of two).
pub const SHARDS: usize = 256;

/// Which shard a key belongs to: cheap for SPIs (looked up per inbound packet; they are
/// random already), a fixed hash for addresses (looked up only for unknown SPIs).
pub trait ShardKey: Hash + Eq {
    fn shard(&self) -> usize;
}

impl ShardKey for u32 {
    #[inline]
    fn shard(&self) -> usize {
        // Fibonacci hashing: the top bits of the product mix every bit of the SPI.
        (self.wrapping_mul(0x9E37_79B9) >> 24) as usize & (SHARDS - 1)
    }
}

impl ShardKey for IpAddr {
    fn shard(&self) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        (h.finish() >> 56) as usize & (SHARDS - 1)
    }
}

/// A map from `K` to `V` in [`SHARDS`] shared shards.
#[derive(Clone)]
pub struct Sharded<K, V> {
    shards: Vec<Arc<HashMap<K, V>>>,
    len: usize,
}

impl<K: ShardKey, V> Default for Sharded<K, V> {
    fn default() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| Arc::new(HashMap::new())).collect(),
            len: 0,
        }
    }
}

impl<K: ShardKey + Clone, V: Clone> Sharded<K, V> {
    #[inline]
    pub fn get(&self, k: &K) -> Option<&V> {
        self.shards[k.shard()].get(k)
    }

    #[inline]
    pub fn contains_key(&self, k: &K) -> bool {
        self.shards[k.shard()].contains_key(k)
    }

    #[cfg(any(test, debug_assertions))]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|s| s.values())
    }

    #[cfg(any(test, debug_assertions))]
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// Inserts, copying the key's shard first if another version shares it.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        let old = Arc::make_mut(&mut self.shards[k.shard()]).insert(k, v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes, copying the key's shard first if another version shares it (not when the
    /// key is absent).
    pub fn remove(&mut self, k: &K) -> Option<V> {
        let i = k.shard();
        if !self.shards[i].contains_key(k) {
            return None;
        }
        let old = Arc::make_mut(&mut self.shards[i]).remove(k);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The entry of `k`, for an update in place (its shard copied first if shared).
    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        let i = k.shard();
        if !self.shards[i].contains_key(k) {
            return None;
        }
        Arc::make_mut(&mut self.shards[i]).get_mut(k)
    }

    /// How many shards this version shares with `other`.
    #[cfg(test)]
    pub fn shared_with(&self, other: &Sharded<K, V>) -> usize {
        self.shards
            .iter()
            .zip(&other.shards)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count()
    }
}

impl<K: ShardKey + Clone, V: Clone> FromIterator<(K, V)> for Sharded<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut s = Sharded::default();
        for (k, v) in iter {
            s.insert(k, v);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_schema::test_rng::Rng;
    use std::collections::BTreeMap;

    /// Random inserts and removals against a `BTreeMap` model; every version taken along
    /// the way keeps what the map held then, and a change copies at most one shard.
    #[test]
    fn versions_stay_apart_and_share_what_no_change_touched() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut map: Sharded<u32, u64> = Sharded::default();
        let mut model = BTreeMap::new();
        let mut versions: Vec<(Sharded<u32, u64>, BTreeMap<u32, u64>)> = Vec::new();
        for step in 0..20_000u64 {
            let k = rng.below(3_000) as u32;
            let before = map.clone();
            if rng.below(3) == 0 {
                assert_eq!(map.remove(&k), model.remove(&k));
            } else {
                assert_eq!(map.insert(k, step), model.insert(k, step));
            }
            assert!(map.shared_with(&before) >= SHARDS - 1);
            assert_eq!(map.len(), model.len());
            if step % 1_000 == 0 {
                versions.push((map.clone(), model.clone()));
            }
        }
        for (v, m) in versions.iter().chain([(map.clone(), model.clone())].iter()) {
            let mut got: Vec<(u32, u64)> = v.iter().map(|(k, v)| (*k, *v)).collect();
            got.sort_unstable();
            let want: Vec<(u32, u64)> = m.iter().map(|(k, v)| (*k, *v)).collect();
            assert_eq!(got, want);
            for (k, x) in m {
                assert_eq!(v.get(k), Some(x));
            }
            assert!(!v.contains_key(&5_000));
        }
        // Keys spread over the shards.
        let used = map.shards.iter().filter(|s| !s.is_empty()).count();
        assert!(used > SHARDS * 9 / 10, "{used}");
    }

    #[test]
    fn addresses_spread_over_the_shards() {
        let mut s: Sharded<IpAddr, usize> = Sharded::default();
        for i in 0..10_000u32 {
            s.insert(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)), 1);
        }
        let used = s.shards.iter().filter(|x| !x.is_empty()).count();
        assert!(used > SHARDS * 9 / 10, "{used}");
        assert_eq!(s.len(), 10_000);
    }
}
