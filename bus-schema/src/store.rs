//! The replicated key-value state and its single writer (sans-IO).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::encode_body;
use crate::schema::{Body, DaemonKind, Envelope, StateOp, SCHEMA_VERSION};

/// Stateful bodies keyed by `(table, key)` (see [`Body::state_op`]).
#[derive(Default, Clone, Debug, PartialEq)]
pub struct StateStore {
    tables: BTreeMap<&'static str, BTreeMap<String, Body>>,
    len: usize,
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
                match self
                    .tables
                    .entry(table)
                    .or_default()
                    .insert(key, body.clone())
                {
                    Some(old) => old != *body,
                    None => {
                        self.len += 1;
                        true
                    }
                }
            }
            Some(StateOp::Del { table, key }) => {
                let Some(t) = self.tables.get_mut(table) else {
                    return false;
                };
                let removed = t.remove(&key).is_some();
                if t.is_empty() {
                    self.tables.remove(table);
                }
                if removed {
                    self.len = self.len.saturating_sub(1);
                }
                removed
            }
        }
    }

    /// Every stored body, ordered by table then key.
    pub fn items(&self) -> impl Iterator<Item = &Body> {
        self.tables.values().flat_map(|t| t.values())
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
    }

    pub fn get(&self, table: &str, key: &str) -> Option<&Body> {
        self.tables.get(table)?.get(key)
    }

    /// The bodies of one table, ordered by key.
    pub fn table(&self, t: &str) -> impl Iterator<Item = &Body> {
        self.tables.get(t).into_iter().flat_map(|t| t.values())
    }

    /// Order-independent, process-independent digest of the contents: the wrapping sum of the
    /// FNV-1a-64 hashes of each item's table, key and encoded body. Equal stores have equal
    /// digests on every build that encodes bodies the same way.
    pub fn digest(&self) -> u64 {
        self.tables
            .iter()
            .flat_map(|(t, items)| items.iter().map(move |(k, b)| (t, k, b)))
            .map(|(t, k, b)| {
                let mut h = Fnv::new();
                h.write(t.as_bytes());
                h.write(&[0]);
                h.write(k.as_bytes());
                h.write(&[0]);
                h.write(&encode_body(b));
                h.finish()
            })
            .fold(0u64, u64::wrapping_add)
    }
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
