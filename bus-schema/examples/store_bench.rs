//! What a follower pays per update of a large store: the copy a daemon shell hands its logic
//! after every burst of updates, one applied change, the logic's `changes_since` over three
//! tables, and freeing the previous copy. Printed beside the same copy and free of a flat
//! map of the same items (one `BTreeMap<Arc<str>, Arc<Body>>` per table, as the store was
//! held before chunking), measured in the same run. Asserts nothing.
//!
//! `cargo run --release -p bus-schema --example store_bench [TUNNELS ...]` (default 1000
//! 10000 100000; three items per tunnel: tunnel, IKE SA, CHILD SA).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_schema::samples::{child_sa, ike_sa, tunnel};
use bus_schema::{table, Body, StateStore};

const ROUNDS: u32 = 20;

fn bodies(n: usize) -> Vec<Body> {
    let mut out = Vec::with_capacity(3 * n);
    for i in 0..n {
        let name = format!("dial_{i}");
        let mut t = tunnel();
        t.name = name.clone();
        out.push(Body::Tunnel(t));
        let mut ike = ike_sa();
        ike.tunnel = name.clone();
        out.push(Body::IkeSa(ike));
        let mut c = child_sa();
        c.tunnel = name;
        c.spi_in = i as u32;
        out.push(Body::ChildSa(c));
    }
    out
}

fn mean(total: Duration) -> String {
    let us = total.as_secs_f64() * 1e6 / f64::from(ROUNDS);
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

fn run(n: usize) {
    let items = bodies(n);
    let mut store = StateStore::new();
    for b in &items {
        store.apply(b);
    }
    // The reference: the same items as flat maps, one per table.
    let mut flat: BTreeMap<&'static str, BTreeMap<Arc<str>, Arc<Body>>> = BTreeMap::new();
    for b in &items {
        if let Some(bus_schema::StateOp::Put { table, key }) = b.state_op() {
            flat.entry(table)
                .or_default()
                .insert(Arc::from(key.as_str()), Arc::new(b.clone()));
        }
    }
    let (mut copy_t, mut change_t, mut diff_t, mut drop_t) = Default::default();
    let (mut flat_copy_t, mut flat_drop_t) = (Duration::ZERO, Duration::ZERO);
    let mut changed = 0;
    for round in 0..ROUNDS {
        let t = Instant::now();
        let copy = store.clone();
        copy_t += t.elapsed();
        // One IKE SA's message IDs move (a DPD exchange).
        let mut ike = ike_sa();
        ike.tunnel = format!("dial_{}", (round as usize * 7919) % n);
        ike.next_send = 100 + round;
        let t = Instant::now();
        store.apply(&Body::IkeSa(ike));
        change_t += t.elapsed();
        let t = Instant::now();
        for tb in [table::TUNNEL, table::IKE_SA, table::CHILD_SA] {
            changed += store.changes_since(&copy, tb).len();
        }
        diff_t += t.elapsed();
        let t = Instant::now();
        drop(copy);
        drop_t += t.elapsed();

        let t = Instant::now();
        let fc = black_box(flat.clone());
        flat_copy_t += t.elapsed();
        let t = Instant::now();
        drop(fc);
        flat_drop_t += t.elapsed();
    }
    assert_eq!(changed, ROUNDS as usize, "one change per round");
    println!(
        "{:>7} tunnels ({:>7} items): copy {:>9}  apply {:>9}  changes_since x3 {:>9}  free {:>9}   | flat maps: copy {:>9}  free {:>9}",
        n,
        store.len(),
        mean(copy_t),
        mean(change_t),
        mean(diff_t),
        mean(drop_t),
        mean(flat_copy_t),
        mean(flat_drop_t),
    );
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000, 100_000]
    } else {
        sizes
    };
    println!("per update, mean of {ROUNDS} (release build; the flat maps are the reference)");
    for n in sizes {
        run(n);
    }
}
