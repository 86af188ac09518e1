//! IKE load initiator for the setups/s and memory benchmark (`tests/bench/ike-setups.sh`
//! runs it against ikemgr and against strongSwan's charon in the same run).
//!
//! It drives many `IkeSa` initiators (a blocking std driver around the sans-IO core, not the
//! daemon): one worker thread per `--local` address, each with its own UDP socket and at
//! most `--concurrency` handshakes in flight (IKE_SA_INIT + IKE_AUTH with the first CHILD
//! SA); established SAs are kept by the responder (never deleted), until `--target` SAs
//! (all workers together) or `--seconds` pass. Several source addresses keep enough
//! handshakes in flight for the responder to always have work queued, while each source
//! stays under both responders' per-source half-open limits (ikemgr: 5; charon:
//! `cookie_threshold_ip` 3) and all of them under their COOKIE thresholds (30).
//!
//! It prints the setups per second and, with `--pid`, the responder's CPU time during the
//! run (utime + stime from `/proc/PID/stat`): its share of one core, CPU per setup and
//! setups per CPU-second; the load initiator's own CPU share (if the responder's share is
//! well under what it could use while the initiator's is high, the initiator limits the
//! figure); and the responder's resident memory before and after, per SA. Nothing is asserted.
//!
//! usage: ike_bench --local IP[,IP...] --remote IP --psk KEY [--seconds S] [--target N]
//!                  [--concurrency C] [--pid PID] [--label TEXT]

use ike_proto::proposal::{dhgrp_list, phase1_list, phase2_list};
use ike_proto::sa::{Addresses, Event, IkeConfig, IkeSa, OsEntropy};
use ike_proto::wire::IdPayload;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn rss_kib(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of a process, in seconds (`/proc/PID/stat` fields 14 and 15, in clock
/// ticks of 1/100 s on Linux).
fn cpu_secs(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Shared counters of all workers.
struct Shared {
    cfg: Arc<IkeConfig>,
    remote: IpAddr,
    deadline: Instant,
    target: usize,
    conc: usize,
    /// Handshakes started (a worker starts one only while this is below the target).
    started: AtomicUsize,
    done: AtomicUsize,
    failed: AtomicUsize,
    unfinished: AtomicUsize,
}

fn worker(sh: &Shared, local: IpAddr) {
    let sock = UdpSocket::bind(SocketAddr::new(local, 0)).expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(2)))
        .expect("timeout");
    let addrs = Addresses {
        local: sock.local_addr().expect("local addr"),
        remote: SocketAddr::new(sh.remote, 500),
    };
    let mut sas: HashMap<u64, IkeSa> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    let mut next_timer_scan = Instant::now();
    // After a NAT float (charon with kernel-libipsec always fakes one) IKE goes to port 4500
    // with the RFC 3948 non-ESP marker (four zero octets) in front.
    let send_all = |sa: &mut IkeSa| {
        while let Some(t) = sa.poll_transmit() {
            if t.destination.port() == 4500 {
                let mut d = vec![0u8; 4];
                d.extend_from_slice(&t.payload);
                let _ = sock.send_to(&d, t.destination);
            } else {
                let _ = sock.send_to(&t.payload, t.destination);
            }
        }
    };
    let finish = |ok: bool| {
        if ok { &sh.done } else { &sh.failed }.fetch_add(1, Ordering::Relaxed);
    };
    while Instant::now() < sh.deadline {
        let now = Instant::now();
        while sas.len() < sh.conc {
            if sh.started.fetch_add(1, Ordering::Relaxed) >= sh.target {
                sh.started.fetch_sub(1, Ordering::Relaxed);
                break;
            }
            match IkeSa::initiate(now, sh.cfg.clone(), addrs, Box::new(OsEntropy)) {
                Ok(mut sa) => {
                    send_all(&mut sa);
                    sas.insert(sa.spis().0, sa);
                }
                Err(e) => panic!("initiate: {e}"),
            }
        }
        if sas.is_empty() {
            break;
        }
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut d = buf.get(..n).unwrap_or(&[]);
            if from.port() == 4500 {
                match d.strip_prefix(&[0u8; 4][..]) {
                    Some(ike) => d = ike,
                    None => continue,
                }
            }
            let spi_i = d
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if let Some(sa) = sas.get_mut(&spi_i) {
                // The core's view of the path: its own (floated) local port.
                let path = Addresses {
                    local: sa.addresses().local,
                    remote: from,
                };
                let _ = sa.handle_datagram(Instant::now(), path, d);
                send_all(sa);
                let mut finished = None;
                while let Some(ev) = sa.poll_event() {
                    match ev {
                        Event::ChildSaEstablished(_) => finished = Some(true),
                        Event::ChildSaFailed { .. } | Event::AuthFailed { .. } => {
                            finished = Some(false)
                        }
                        _ => {}
                    }
                }
                if sa.is_closed() {
                    finished = finished.or(Some(false));
                }
                if let Some(ok) = finished {
                    finish(ok);
                    sas.remove(&spi_i);
                }
            }
        }
        let now = Instant::now();
        if now >= next_timer_scan {
            next_timer_scan = now + Duration::from_millis(50);
            let due: Vec<u64> = sas
                .iter()
                .filter(|(_, s)| s.poll_timeout().is_some_and(|t| t <= now))
                .map(|(k, _)| *k)
                .collect();
            for k in due {
                if let Some(sa) = sas.get_mut(&k) {
                    sa.handle_timeout(now);
                    send_all(sa);
                    if sa.is_closed() {
                        finish(false);
                        sas.remove(&k);
                    }
                }
            }
        }
    }
    sh.unfinished.fetch_add(sas.len(), Ordering::Relaxed);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let need =
        |n: &str| arg(&args, n).unwrap_or_else(|| panic!("missing {n}; see the doc comment"));
    let locals: Vec<IpAddr> = need("--local")
        .split(',')
        .map(|s| s.parse().expect("--local IP[,IP...]"))
        .collect();
    let remote: IpAddr = need("--remote").parse().expect("--remote IP");
    let psk = need("--psk");
    let secs: u64 = arg(&args, "--seconds").map_or(10, |s| s.parse().expect("--seconds"));
    let target: usize = arg(&args, "--target").map_or(usize::MAX, |s| s.parse().expect("--target"));
    let conc: usize = arg(&args, "--concurrency").map_or(3, |s| s.parse().expect("--concurrency"));
    let pid = arg(&args, "--pid");
    let label = arg(&args, "--label").unwrap_or_else(|| remote.to_string());

    // The benchmark's one proposal set: AES-GCM-128, PRF SHA-256, ECP-256; ESP AES-GCM-128.
    let mut cfg = IkeConfig::psk(psk.as_bytes(), IdPayload::fqdn("bench.haven.test"));
    cfg.ike_proposals = phase1_list("aes128gcm-prfsha256").expect("proposal");
    cfg.ike_groups = dhgrp_list("19").expect("group");
    cfg.esp_proposals = phase2_list("aes128gcm").expect("proposal");
    cfg.retransmit.timeouts = [1, 2, 4].map(Duration::from_secs).to_vec();

    let rss0 = pid.as_deref().and_then(rss_kib);
    let cpu0 = pid.as_deref().and_then(cpu_secs);
    let self_cpu0 = cpu_secs("self");
    let start = Instant::now();
    let sh = Arc::new(Shared {
        cfg: Arc::new(cfg),
        remote,
        deadline: start + Duration::from_secs(secs),
        target,
        conc,
        started: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        unfinished: AtomicUsize::new(0),
    });
    let workers: Vec<_> = locals
        .iter()
        .map(|ip| {
            let (sh, ip) = (sh.clone(), *ip);
            std::thread::spawn(move || worker(&sh, ip))
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = pid.as_deref().and_then(cpu_secs);
    let self_cpu1 = cpu_secs("self");
    let done = sh.done.load(Ordering::Relaxed);
    println!(
        "{label}: {done} IKE SA + CHILD SA setups in {elapsed:.1} s = {:.0}/s ({} failed, {} \
         unfinished; {} sources x {conc} in flight)",
        done as f64 / elapsed,
        sh.failed.load(Ordering::Relaxed),
        sh.unfinished.load(Ordering::Relaxed),
        locals.len()
    );
    if done == 0 {
        println!("{label}: no setup completed: no CPU or memory figures");
        return;
    }
    if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
        let cpu = c1 - c0;
        let load = match (self_cpu0, self_cpu1) {
            (Some(a), Some(b)) => format!("{:.0}%", (b - a) * 100.0 / elapsed),
            _ => "?".into(),
        };
        println!(
            "{label}: responder CPU {cpu:.2} s = {:.0}% of one core, {:.0} us per setup = \
             {:.0} setups per CPU-second (load initiator: {load} of one core)",
            cpu * 100.0 / elapsed,
            cpu * 1e6 / done.max(1) as f64,
            done as f64 / cpu.max(0.01),
        );
    }
    if let (Some(p), Some(r0)) = (pid.as_deref(), rss0) {
        // Let the responder finish its last answers before reading its memory.
        std::thread::sleep(Duration::from_millis(500));
        if let Some(r1) = rss_kib(p) {
            let per = (r1.saturating_sub(r0) as f64 * 1024.0) / done.max(1) as f64;
            println!(
                "{label}: responder RSS {r0} KiB -> {r1} KiB with {done} SAs = {per:.0} bytes per IKE SA \
                 (+CHILD SA); 100 000 SAs would need about {:.0} MiB",
                per * 100_000.0 / 1_048_576.0
            );
        }
    }
}
