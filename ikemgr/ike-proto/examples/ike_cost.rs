//! What one IKE SA + first CHILD SA costs in the sans-IO core, measured in process (no
//! sockets, no daemon): CPU time per setup on each side, heap allocations per setup, and
//! the heap an established responder `IkeSa` keeps (counted by a global allocator that
//! tracks live bytes). The same proposal as `tests/bench/ike-setups.sh`
//! (aes128gcm16-prfsha256-ecp256, ESP aes128gcm16, PSK). Prints figures; asserts nothing.
//!
//! usage: ike_cost [SETUPS]   (default 2000)

use ike_proto::proposal::{dhgrp_list, phase1_list, phase2_list};
use ike_proto::sa::{Accepted, Addresses, Event, IkeConfig, IkeSa, OsEntropy};
use ike_proto::wire::IdPayload;
use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counts live heap bytes and allocation calls.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        CALLS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: p was allocated by System with l.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        CALLS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: p was allocated by System with l.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn cfg(id: &str) -> Arc<IkeConfig> {
    let mut c = IkeConfig::psk(b"haven-ike-bench-psk", IdPayload::fqdn(id));
    c.ike_proposals = phase1_list("aes128gcm-prfsha256").expect("proposal");
    c.ike_groups = dhgrp_list("19").expect("group");
    c.esp_proposals = phase2_list("aes128gcm").expect("proposal");
    Arc::new(c)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(2000, |s| s.parse().expect("SETUPS"));
    let (ci, cr) = (cfg("bench.haven.test"), cfg("gw.bench"));
    let a: SocketAddr = "10.231.1.1:500".parse().expect("addr");
    let b: SocketAddr = "10.231.1.2:500".parse().expect("addr");
    let (ai, ar) = (
        Addresses {
            local: a,
            remote: b,
        },
        Addresses {
            local: b,
            remote: a,
        },
    );
    let mut kept = Vec::with_capacity(n);
    let (mut t_init, mut t_resp) = (Duration::ZERO, Duration::ZERO);
    let (mut calls_resp, mut ok) = (0usize, 0usize);
    let live0 = LIVE.load(Ordering::Relaxed);
    let mut resp_live = 0isize;
    let now = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let mut i = IkeSa::initiate(now, ci.clone(), ai, Box::new(OsEntropy)).expect("initiate");
        let req = i.poll_transmit().expect("IKE_SA_INIT").payload;
        t_init += t.elapsed();

        let (l0, c0, t) = (
            LIVE.load(Ordering::Relaxed),
            CALLS.load(Ordering::Relaxed),
            Instant::now(),
        );
        let Ok(Accepted::Sa(mut r)) = IkeSa::accept(now, cr.clone(), ar, Box::new(OsEntropy), &req)
        else {
            panic!("accept");
        };
        let resp = r.poll_transmit().expect("IKE_SA_INIT response").payload;
        t_resp += t.elapsed();
        let (dl, dc) = (
            LIVE.load(Ordering::Relaxed) as isize - l0 as isize,
            CALLS.load(Ordering::Relaxed) - c0,
        );
        resp_live += dl;
        calls_resp += dc;

        let t = Instant::now();
        i.handle_datagram(now, ai, &resp).expect("init response");
        let auth = i.poll_transmit().expect("IKE_AUTH").payload;
        t_init += t.elapsed();

        let (l0, c0, t) = (
            LIVE.load(Ordering::Relaxed),
            CALLS.load(Ordering::Relaxed),
            Instant::now(),
        );
        r.handle_datagram(now, ar, &auth).expect("IKE_AUTH");
        let done = r.poll_transmit().expect("IKE_AUTH response").payload;
        let mut up = false;
        while let Some(ev) = r.poll_event() {
            up |= matches!(ev, Event::ChildSaEstablished(_));
        }
        t_resp += t.elapsed();
        resp_live += LIVE.load(Ordering::Relaxed) as isize - l0 as isize;
        calls_resp += CALLS.load(Ordering::Relaxed) - c0;

        let t = Instant::now();
        i.handle_datagram(now, ai, &done).expect("auth response");
        while i.poll_event().is_some() {}
        t_init += t.elapsed();
        ok += usize::from(up && i.is_established() && r.is_established());
        drop(i);
        kept.push(r);
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "{ok}/{n} setups; CPU per setup: responder {:.0} us, initiator {:.0} us",
        per(t_resp),
        per(t_init)
    );
    println!(
        "responder: {:.1} heap allocations per setup, {:.0} bytes kept per established IKE SA \
         (+ CHILD SA), size_of::<IkeSa>() = {}",
        calls_resp as f64 / n as f64,
        resp_live as f64 / n as f64,
        std::mem::size_of::<IkeSa>()
    );
    println!(
        "heap now {} bytes more than before the run ({} SAs kept)",
        LIVE.load(Ordering::Relaxed) as isize - live0 as isize,
        kept.len()
    );
}
