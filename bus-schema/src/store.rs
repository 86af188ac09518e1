//! The replicated key-value state and its single writer (sans-IO).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::chunked::ChunkMap;
use crate::codec::encode_body;
use crate::schema::{Body, DaemonKind, Envelope, StateOp, SCHEMA_VERSION};

/// Stateful bodies keyed by `(table, key)` (see [`Body::state_op`]). Each table is a
/// [`ChunkMap`]: its entries sit in key order in shared chunks, and each key and body is held
/// behind an `Arc`. A copy of the store (a daemon shell hands one to its logic after every
/// burst of updates) copies one pointer per chunk, and an update copies only the chunk it
/// changes, so copying, comparing ([`StateStore::changes_since`]) and freeing copies of
/// 300 000 items costs what the changed chunks cost, not the whole store.
#[derive(Default, Clone, Debug, PartialEq)]
pub struct StateStore {
    tables: BTreeMap<&'static str, ChunkMap>,
    len: usize,
    /// Running value of [`StateStore::digest`]: the wrapping sum of [`item_hash`] over every
    /// stored item, kept up to date by `apply` (add the new item's hash, subtract the one it
    /// replaces or removes), so reading it costs nothing per record.
    digest: u64,
}

impl StateStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply one body. Returns true when the store changed; events never change it.
    pub fn apply(&mut self, body: &Body) -> bool {
        match body.state_op() {
            None => false,
            Some(StateOp::Put { table, key }) => {
                let h = item_hash(table, &key, body);
                let t = self.tables.entry(table).or_default();
                match t.get(key.as_str()) {
                    Some(old) if **old == *body => false,
                    Some(old) => {
                        let old_h = item_hash(table, &key, old);
                        t.insert(&key, Arc::new(body.clone()));
                        self.digest = self.digest.wrapping_sub(old_h).wrapping_add(h);
                        true
                    }
                    None => {
                        t.insert(&key, Arc::new(body.clone()));
                        self.len += 1;
                        self.digest = self.digest.wrapping_add(h);
                        true
                    }
                }
            }
            Some(StateOp::Del { table, key }) => {
                let Some(t) = self.tables.get_mut(table) else {
                    return false;
                };
                let removed = t.remove(key.as_str());
                if t.is_empty() {
                    self.tables.remove(table);
                }
                match removed {
                    Some(old) => {
                        self.len = self.len.saturating_sub(1);
                        self.digest = self.digest.wrapping_sub(item_hash(table, &key, &old));
                        true
                    }
                    None => false,
                }
            }
        }
    }

    /// Every stored body, ordered by table then key.
    pub fn items(&self) -> impl Iterator<Item = &Body> {
        self.tables
            .values()
            .flat_map(|t| t.iter().map(|(_, b)| b.as_ref()))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.tables.clear();
        self.len = 0;
        self.digest = 0;
    }

    pub fn get(&self, table: &str, key: &str) -> Option<&Body> {
        self.tables.get(table)?.get(key).map(Arc::as_ref)
    }

    /// The bodies of one table, ordered by key.
    pub fn table(&self, t: &str) -> impl Iterator<Item = &Body> {
        self.tables
            .get(t)
            .into_iter()
            .flat_map(|t| t.iter().map(|(_, b)| b.as_ref()))
    }

    /// The items of `table` that differ between `older` and this store, in key order: the
    /// key and this store's body (`None`: removed here). Both copies come from one follower
    /// (the shell hands its logic a copy after every burst of updates): chunks the two
    /// share are skipped without looking into them, and within the others most bodies are
    /// told apart by pointer; a body stored anew (a snapshot after a bus gap) is compared by
    /// value. Only the changed keys are copied.
    pub fn changes_since<'a>(
        &'a self,
        older: &StateStore,
        table: &str,
    ) -> Vec<(String, Option<&'a Body>)> {
        let mut out = Vec::new();
        let empty = ChunkMap::default();
        let then = older.tables.get(table).unwrap_or(&empty);
        match self.tables.get(table) {
            Some(now) => {
                now.changes_since(then, |k, b| out.push((k.to_string(), b.map(Arc::as_ref))))
            }
            // Nothing here: every key there was removed.
            None => out.extend(then.iter().map(|(k, _)| (k.to_string(), None))),
        }
        out
    }

    /// Order-independent, process-independent digest of the contents: the wrapping sum of the
    /// FNV-1a-64 hashes of each item's table, key and encoded body. Equal stores have equal
    /// digests on every build that encodes bodies the same way. Maintained incrementally by
    /// [`StateStore::apply`]: O(1) to read, whatever the number of records.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// The same value as [`StateStore::digest`], recomputed from every item (O(records)); for
    /// tests and audits of the running value.
    pub fn recompute_digest(&self) -> u64 {
        self.tables
            .iter()
            .flat_map(|(t, items)| items.iter().map(move |(k, b)| (*t, k, b)))
            .map(|(t, k, b)| item_hash(t, k, b))
            .fold(0u64, u64::wrapping_add)
    }
}

/// One item's share of [`StateStore::digest`].
fn item_hash(table: &str, key: &str, body: &Body) -> u64 {
    let mut h = Fnv::new();
    h.write(table.as_bytes());
    h.write(&[0]);
    h.write(key.as_bytes());
    h.write(&[0]);
    h.write(&encode_body(body));
    h.finish()
}

/// FNV-1a, 64-bit (offset basis and prime from draft-eastlake-fnv).
struct Fnv(u64);

impl Fnv {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    fn new() -> Self {
        Fnv(Self::OFFSET)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// An owner's state as of `seq`, served over the control socket.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub src: DaemonKind,
    #[serde(with = "crate::boot::serde_u128")]
    pub boot: u128,
    /// The snapshot contains every update with a sequence number up to and including this.
    pub seq: u64,
    pub items: Vec<Body>,
}

/// The publishing side: stamps bodies with the sequence and keeps the authoritative store.
#[derive(Clone, Debug)]
pub struct Owner {
    kind: DaemonKind,
    boot: u128,
    seq: u64,
    store: StateStore,
}

impl Owner {
    pub fn new(kind: DaemonKind, boot: u128) -> Self {
        Owner {
            kind,
            boot,
            seq: 0,
            store: StateStore::default(),
        }
    }

    /// Assign the next sequence number, apply the body to the store and return the envelope
    /// to publish. Every call consumes a sequence number, even when the store did not change,
    /// so followers see every message.
    pub fn stamp(&mut self, body: Body, ts_ns: u64) -> Envelope {
        self.seq = self.seq.wrapping_add(1);
        self.store.apply(&body);
        Envelope {
            schema: SCHEMA_VERSION,
            src: self.kind,
            boot: self.boot,
            seq: self.seq,
            ts_ns,
            body,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            src: self.kind,
            boot: self.boot,
            seq: self.seq,
            items: self.store.items().cloned().collect(),
        }
    }

    pub fn store(&self) -> &StateStore {
        &self.store
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn boot(&self) -> u128 {
        self.boot
    }

    pub fn kind(&self) -> DaemonKind {
        self.kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::bodies;

    #[test]
    fn apply_put_del_and_events() {
        let mut s = StateStore::new();
        assert!(!s.apply(&Body::Heartbeat { uptime_ms: 1 }));
        for b in bodies() {
            s.apply(&b);
        }
        // Each removal sample removes its put sample, except HaMemberRemoved (member 2 vs 1).
        assert_eq!(s.len(), 1);
        assert!(s.get(crate::table::HA_MEMBER, "1").is_some());
        assert_eq!(s.table(crate::table::HA_MEMBER).count(), 1);
        assert_eq!(s.table(crate::table::TUNNEL).count(), 0);
        let b = Body::TunnelRole {
            tunnel: "t".into(),
            role: "standby".into(),
        };
        assert!(s.apply(&b));
        assert!(!s.apply(&b), "same value again is no change");
        assert!(s.apply(&Body::TunnelRoleRemoved { tunnel: "t".into() }));
        assert!(!s.apply(&Body::TunnelRoleRemoved { tunnel: "t".into() }));
        assert_eq!(s.len(), s.items().count());
    }

    #[test]
    fn changes_since_lists_what_was_put_changed_and_removed_in_key_order() {
        let tunnel = |name: &str, local: &str| {
            let mut t = crate::samples::tunnel();
            t.name = name.into();
            t.local_gw = Some(local.into());
            Body::Tunnel(t)
        };
        let mut s = StateStore::new();
        for n in ["a", "b", "c", "d"] {
            s.apply(&tunnel(n, "192.0.2.1"));
        }
        s.apply(&Body::TunnelRole {
            tunnel: "a".into(),
            role: "standby".into(),
        });
        let before = s.clone();
        assert!(s.changes_since(&before, crate::table::TUNNEL).is_empty());
        s.apply(&tunnel("b", "192.0.2.9"));
        s.apply(&Body::TunnelRemoved { name: "c".into() });
        s.apply(&tunnel("e", "192.0.2.1"));
        // The same value put again is no change (apply keeps the stored body).
        s.apply(&tunnel("d", "192.0.2.1"));
        let got: Vec<(String, Option<Body>)> = s
            .changes_since(&before, crate::table::TUNNEL)
            .into_iter()
            .map(|(k, b)| (k, b.cloned()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("b".to_string(), Some(tunnel("b", "192.0.2.9"))),
                ("c".to_string(), None),
                ("e".to_string(), Some(tunnel("e", "192.0.2.1"))),
            ]
        );
        // Other tables are compared on their own.
        assert!(s.changes_since(&before, crate::table::HA_ROLE).is_empty());
        // Against an empty store: everything; a store rebuilt from the same bodies (new
        // allocations, as from a snapshot) differs in nothing.
        assert_eq!(
            s.changes_since(&StateStore::new(), crate::table::TUNNEL)
                .len(),
            4
        );
        let mut rebuilt = StateStore::new();
        for b in s.items() {
            rebuilt.apply(b);
        }
        assert!(rebuilt.changes_since(&s, crate::table::TUNNEL).is_empty());
        assert_eq!(
            StateStore::new()
                .changes_since(&s, crate::table::TUNNEL)
                .len(),
            4
        );
    }

    #[test]
    fn digest_depends_on_contents_not_history() {
        let all = bodies();
        let puts: Vec<&Body> = all
            .iter()
            .filter(|b| matches!(b.state_op(), Some(StateOp::Put { .. })))
            .collect();
        let mut a = StateStore::new();
        let mut b = StateStore::new();
        for p in &puts {
            a.apply(p);
        }
        for p in puts.iter().rev() {
            b.apply(p);
        }
        b.apply(&Body::TunnelRemoved { name: "zz".into() });
        assert_eq!(a, b);
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), StateStore::new().digest());
        b.apply(&Body::TunnelRole {
            tunnel: "vpn1".into(),
            role: "standby".into(),
        });
        assert_ne!(a.digest(), b.digest());
        // Pinned: the digest is stable across processes and builds.
        assert_eq!(StateStore::new().digest(), 0);
    }

    use crate::test_rng::Rng;

    /// A random stateful body over a small key space (so puts replace and removals hit).
    fn random_body(r: &mut Rng) -> Body {
        let name = format!("t{}", r.below(12));
        match r.below(6) {
            0 | 1 => {
                let mut t = crate::samples::tunnel();
                t.name = name;
                t.dpd.retry_interval_ms = r.below(3);
                Body::Tunnel(t)
            }
            2 => Body::TunnelRemoved { name },
            3 => Body::TunnelRole {
                tunnel: name,
                role: if r.below(2) == 0 {
                    "standby"
                } else {
                    "sync-primary"
                }
                .into(),
            },
            4 => Body::TunnelRoleRemoved { tunnel: name },
            _ => Body::Heartbeat {
                uptime_ms: r.next_u64(),
            },
        }
    }

    #[test]
    fn incremental_digest_equals_recomputation_after_any_sequence() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..500 {
            let mut s = StateStore::new();
            let steps = r.below(60);
            for _ in 0..steps {
                let b = random_body(&mut r);
                s.apply(&b);
                assert_eq!(s.digest(), s.recompute_digest(), "after {b:?}");
                assert_eq!(s.len(), s.items().count());
            }
            // A store built from its own items (a snapshot) agrees too.
            let mut copy = StateStore::new();
            for b in s.items() {
                copy.apply(b);
            }
            assert_eq!(copy.digest(), s.digest());
            assert_eq!(copy, s);
            if r.below(4) == 0 {
                s.clear();
                assert_eq!((s.digest(), s.recompute_digest()), (0, 0));
            }
        }
        // Every sample body, in and out.
        let mut s = StateStore::new();
        for b in bodies() {
            s.apply(&b);
            assert_eq!(s.digest(), s.recompute_digest());
        }
    }

    #[test]
    fn owner_stamps_in_sequence_and_snapshots_its_store() {
        let mut o = Owner::new(DaemonKind::Espd, 9);
        let e1 = o.stamp(Body::Heartbeat { uptime_ms: 0 }, 5);
        let e2 = o.stamp(bodies()[5].clone(), 6);
        assert_eq!(
            (e1.seq, e2.seq, e2.boot, e2.src, e2.ts_ns),
            (1, 2, 9, DaemonKind::Espd, 6)
        );
        assert_eq!(e1.schema, SCHEMA_VERSION);
        let snap = o.snapshot();
        assert_eq!((snap.seq, snap.items.len()), (2, 1));
        let mut s = StateStore::new();
        for i in &snap.items {
            s.apply(i);
        }
        assert_eq!(&s, o.store());
    }
}
