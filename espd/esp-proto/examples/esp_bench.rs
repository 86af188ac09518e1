//! One-core ESP throughput with AES-128-GCM for 64, 512 and 1400-byte inner packets, printed
//! beside `openssl speed -evp aes-128-gcm` (streaming) and `openssl speed -aead -evp
//! aes-128-gcm` (IV + AAD + update + final per buffer, like a packet) measured in the same
//! run. A counting allocator reports heap allocations inside the measured loops. Prints
//! figures; asserts nothing about time.
//!
//! Run: `cargo run --release -p esp-proto --example esp_bench [-- --seconds N] [--all]`
//! (about 15 x N seconds of CPU, N defaults to 1; `--all` adds every transform at 1400
//! bytes, 18 x N seconds more).

use esp_proto::inner::sample_ipv4;
use esp_proto::{
    DecryptSa, EncryptSa, LifetimeConfig, OutboundOptions, SaConfig, SaKeys, Transform,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// CPU time of this thread: the machine is shared, so both our figures and openssl's
/// (its default divisor is user CPU time) leave out time spent waiting for a core.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Run `f` in batches until `secs` of CPU time passed; returns (ops per CPU second,
/// allocations per op).
fn measure(secs: f64, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..1000 {
        f(); // warm up
    }
    let a0 = ALLOCS.load(Ordering::Relaxed);
    let start = thread_cpu();
    let limit = Duration::from_secs_f64(secs);
    let mut ops = 0u64;
    loop {
        for _ in 0..256 {
            f();
        }
        ops += 256;
        if thread_cpu() - start >= limit {
            break;
        }
    }
    let dt = (thread_cpu() - start).as_secs_f64();
    let allocs = ALLOCS.load(Ordering::Relaxed) - a0;
    (ops as f64 / dt, allocs as f64 / ops as f64)
}

/// `openssl speed` bytes per second for one buffer size, from its `-mr` `+F:` line.
fn openssl_speed(aead: bool, size: usize, secs: u64) -> Option<f64> {
    let mut cmd = Command::new("openssl");
    cmd.arg("speed").arg("-mr");
    if aead {
        cmd.arg("-aead");
    }
    cmd.args([
        "-evp",
        "aes-128-gcm",
        "-bytes",
        &size.to_string(),
        "-seconds",
        &secs.to_string(),
    ]);
    let out = cmd.output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("+F:"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// Rate of the seal step alone (header, copy, IV, AAD, in-place update, final, tag), the
/// part of encapsulation that openssl's `-aead` mode also does per buffer.
fn seal_rate(cfg: &SaConfig, keymat: &[u8], size: usize, secs: f64) -> f64 {
    let keys = SaKeys {
        enc: keymat,
        integ: &[],
    };
    let mut esp = vec![0u8; size + Transform::AES128GCM.max_overhead()];
    let mut payload = sample_ipv4(size, 1);
    payload.extend_from_slice(&[1, 2, 2, 4]);
    let mut enc =
        EncryptSa::new(cfg, keys, OutboundOptions::default(), Instant::now()).expect("SA");
    let mut seq = 0u64;
    measure(secs, || {
        seq += 1;
        let n = enc
            .seal_payload(seq, &seq.to_be_bytes(), &payload, &mut esp)
            .expect("seal");
        std::hint::black_box(n);
    })
    .0
}

fn main() {
    let mut secs = 1.0f64;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--seconds") {
        secs = args
            .get(i + 1)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(1.0)
            .max(1.0);
    }
    let osecs = secs.round().max(1.0) as u64;
    let version = Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "openssl binary not found".into());
    println!("esp-proto AES-128-GCM (aes128gcm), one core, {secs:.0} s per figure; {version}");
    println!("MB/s = 10^6 inner bytes per second (openssl: buffer bytes per second)");
    println!();
    println!(
        "{:>5} | {:>7} {:>7} {:>7} {:>7} {:>8} | {:>8} {:>9} | {:>9} {:>9} {:>10}",
        "size",
        "encap",
        "decap",
        "enc+dec",
        "seal",
        "allocs/p",
        "ossl-evp",
        "ossl-aead",
        "encap/evp",
        "decap/evp",
        "rt/(evp/2)"
    );

    let cfg = SaConfig {
        spi: 0x1234_5678,
        transform: Transform::AES128GCM,
        esn: false,
        lifetime: LifetimeConfig::default(),
    };
    let keymat: Vec<u8> = (0..20u8).collect();
    let keys = SaKeys {
        enc: &keymat,
        integ: &[],
    };

    for size in [64usize, 512, 1400] {
        let now = Instant::now();
        let inner = sample_ipv4(size, 1);
        let mut esp = vec![0u8; size + Transform::AES128GCM.max_overhead()];
        let mut out = vec![0u8; esp.len()];

        let mut enc = EncryptSa::new(&cfg, keys, OutboundOptions::default(), now).expect("SA");
        let (enc_ops, enc_allocs) = measure(secs, || {
            let n = enc.encapsulate(&inner, &mut esp).expect("encapsulate");
            std::hint::black_box(n);
        });

        let mut enc = EncryptSa::new(&cfg, keys, OutboundOptions::default(), now).expect("SA");
        let mut dec = DecryptSa::new(&cfg, keys, esp_proto::DEFAULT_WINDOW, now).expect("SA");
        let (rt_ops, rt_allocs) = measure(secs, || {
            let n = enc.encapsulate(&inner, &mut esp).expect("encapsulate");
            let d = dec.decapsulate(&esp[..n], &mut out).expect("decapsulate");
            std::hint::black_box(d);
        });
        // Decapsulation alone: a ring of distinct packets, replayed into a fresh SA (new
        // replay window) each time the ring wraps; one SA setup per 4096 packets.
        const RING: usize = 4096;
        let mut enc = EncryptSa::new(&cfg, keys, OutboundOptions::default(), now).expect("SA");
        let ring: Vec<Vec<u8>> = (0..RING)
            .map(|_| {
                let n = enc.encapsulate(&inner, &mut esp).expect("encapsulate");
                esp[..n].to_vec()
            })
            .collect();
        let mut i = 0usize;
        let mut dec = DecryptSa::new(&cfg, keys, esp_proto::DEFAULT_WINDOW, now).expect("SA");
        let (dec_ops, _) = measure(secs, || {
            if i == RING {
                i = 0;
                dec = DecryptSa::new(&cfg, keys, esp_proto::DEFAULT_WINDOW, now).expect("SA");
            }
            let d = dec.decapsulate(&ring[i], &mut out).expect("decapsulate");
            std::hint::black_box(d);
            i += 1;
        });

        let seal_ops = seal_rate(&cfg, &keymat, size, secs);

        let evp = openssl_speed(false, size, osecs);
        let aead = openssl_speed(true, size, osecs);
        let mb = |ops: f64| ops * size as f64 / 1e6;
        let fmt_o = |v: Option<f64>| v.map_or("n/a".to_string(), |b| format!("{:.0}", b / 1e6));
        let pct = |ours: f64, reference: Option<f64>| {
            reference.map_or("n/a".to_string(), |r| format!("{:.0}%", 100.0 * ours / r))
        };
        println!(
            "{:>5} | {:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>8.2} | {:>8} {:>9} | {:>9} {:>9} {:>10}",
            size,
            mb(enc_ops),
            mb(dec_ops),
            mb(rt_ops),
            mb(seal_ops),
            enc_allocs.max(rt_allocs),
            fmt_o(evp),
            fmt_o(aead),
            pct(mb(enc_ops) * 1e6, evp),
            pct(mb(dec_ops) * 1e6, evp),
            pct(mb(rt_ops) * 1e6, evp.map(|e| e / 2.0)),
        );
    }
    if args.iter().any(|a| a == "--all") {
        // Every transform at 1400 bytes (no openssl reference for the CBC+HMAC pairs).
        println!();
        println!(
            "{:>18} | {:>7} {:>7} (1400-byte inner, MB/s)",
            "transform", "encap", "enc+dec"
        );
        for t in Transform::all() {
            let (mut enc, mut dec) = esp_proto::fuzzing::sa_pair(t, false);
            let inner = sample_ipv4(1400, 1);
            let mut esp = vec![0u8; 1400 + t.max_overhead()];
            let mut out = vec![0u8; esp.len()];
            let (e, _) = measure(secs, || {
                let n = enc.encapsulate(&inner, &mut esp).expect("encapsulate");
                std::hint::black_box(n);
            });
            let (mut enc, _) = esp_proto::fuzzing::sa_pair(t, false);
            let (rt, _) = measure(secs, || {
                let n = enc.encapsulate(&inner, &mut esp).expect("encapsulate");
                let d = dec.decapsulate(&esp[..n], &mut out).expect("decapsulate");
                std::hint::black_box(d);
            });
            println!(
                "{:>18} | {:>7.0} {:>7.0}",
                t.name(),
                e * 1400.0 / 1e6,
                rt * 1400.0 / 1e6
            );
        }
    }
    println!();
    println!("All rates per second of CPU time of the measuring thread (openssl: user CPU time).");
    println!("encap/decap: one direction per packet (decap includes one SA setup per 4096");
    println!("packets to reset the replay window); enc+dec: both on one core, compared with");
    println!("half of openssl's single-pass rate. seal: the crypto step of encap alone (what");
    println!("openssl -aead does per buffer). allocs/p: heap allocations per packet, measured.");
}
