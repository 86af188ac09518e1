//! Encapsulation and decapsulation allocate nothing per packet, for good packets and for
//! hostile ones (forged ICV, replay, truncation), for every transform.

use esp_proto::fuzzing::sa_pair;
use esp_proto::inner::sample_ipv4;
use esp_proto::{EspError, Transform};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct PerThreadCounting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only counts calls per thread.
unsafe impl GlobalAlloc for PerThreadCounting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: PerThreadCounting = PerThreadCounting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

#[test]
fn hot_path_does_not_allocate() {
    // The counter sees allocations on this thread.
    let b = allocs();
    drop(std::hint::black_box(vec![1u8; 10]));
    assert!(allocs() > b);

    for t in Transform::all() {
        for esn in [false, true] {
            let (mut enc, mut dec) = sa_pair(t, esn);
            let inner = sample_ipv4(1400, 3);
            let mut esp = vec![0u8; 1400 + t.max_overhead()];
            let mut out = vec![0u8; esp.len()];
            // Warm up (lazy OpenSSL initialisation, thread-local error state).
            let n = enc.encapsulate(&inner, &mut esp).unwrap();
            dec.decapsulate(&esp[..n], &mut out).unwrap();
            let mut forged = esp[..n].to_vec();
            forged[n - 1] ^= 1;
            let _ = dec.decapsulate(&forged, &mut out);

            let before = allocs();
            for _ in 0..100 {
                let n = enc.encapsulate(&inner, &mut esp).unwrap();
                let good = &esp[..n];
                let mut bad = [0u8; 1600];
                bad[..n].copy_from_slice(good);
                bad[n - 1] ^= 1;
                assert_eq!(dec.decapsulate(&bad[..n], &mut out), Err(EspError::Auth));
                assert!(dec.decapsulate(&good[..n - 1], &mut out).is_err());
                dec.decapsulate(good, &mut out).unwrap();
                assert_eq!(dec.decapsulate(good, &mut out), Err(EspError::Replay));
            }
            assert_eq!(allocs() - before, 0, "{} esn={esn}", t.name());
        }
    }
}
