//! IKE load initiator for the setups/s and memory benchmark (`tests/bench/ike-setups.sh`
//! runs it against ikemgr and against strongSwan's charon in the same run).
//!
//! It drives many `IkeSa` initiators over one UDP socket (a blocking std driver around the
//! sans-IO core, not the daemon): at most `--concurrency` handshakes in flight, each
//! IKE_SA_INIT + IKE_AUTH with the first CHILD SA, established SAs are kept by the responder
//! (never deleted), until `--target` SAs or `--seconds` pass. It prints the setups per
//! second, and with `--pid` the responder's resident memory before and after and per SA.
//! Nothing is asserted.
//!
//! usage: ike_bench --local IP --remote IP --psk KEY [--seconds S] [--target N]
//!                  [--concurrency C] [--pid PID] [--label TEXT]

use ike_proto::proposal::{dhgrp_list, phase1_list, phase2_list};
use ike_proto::sa::{Addresses, Event, IkeConfig, IkeSa, OsEntropy};
use ike_proto::wire::IdPayload;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let need =
        |n: &str| arg(&args, n).unwrap_or_else(|| panic!("missing {n}; see the doc comment"));
    let local: IpAddr = need("--local").parse().expect("--local IP");
    let remote: IpAddr = need("--remote").parse().expect("--remote IP");
    let psk = need("--psk");
    let secs: u64 = arg(&args, "--seconds").map_or(10, |s| s.parse().expect("--seconds"));
    let target: usize = arg(&args, "--target").map_or(usize::MAX, |s| s.parse().expect("--target"));
    let conc: usize = arg(&args, "--concurrency").map_or(4, |s| s.parse().expect("--concurrency"));
    let pid = arg(&args, "--pid");
    let label = arg(&args, "--label").unwrap_or_else(|| remote.to_string());

    // The benchmark's one proposal set: AES-GCM-128, PRF SHA-256, ECP-256; ESP AES-GCM-128.
    let mut cfg = IkeConfig::psk(psk.as_bytes(), IdPayload::fqdn("bench.haven.test"));
    cfg.ike_proposals = phase1_list("aes128gcm-prfsha256").expect("proposal");
    cfg.ike_groups = dhgrp_list("19").expect("group");
    cfg.esp_proposals = phase2_list("aes128gcm").expect("proposal");
    cfg.retransmit.timeouts = [1, 2, 4].map(Duration::from_secs).to_vec();
    let cfg = Arc::new(cfg);

    let sock = UdpSocket::bind(SocketAddr::new(local, 0)).expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(2)))
        .expect("timeout");
    let addrs = Addresses {
        local: sock.local_addr().expect("local addr"),
        remote: SocketAddr::new(remote, 500),
    };
    let rss0 = pid.as_deref().and_then(rss_kib);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut sas: HashMap<u64, IkeSa> = HashMap::new();
    let (mut done, mut failed) = (0usize, 0usize);
    let mut buf = vec![0u8; 65536];
    let mut next_timer_scan = start;
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
    while Instant::now() < deadline && done < target {
        let now = Instant::now();
        while sas.len() < conc && done + sas.len() < target {
            match IkeSa::initiate(now, cfg.clone(), addrs, Box::new(OsEntropy)) {
                Ok(mut sa) => {
                    send_all(&mut sa);
                    sas.insert(sa.spis().0, sa);
                }
                Err(e) => panic!("initiate: {e}"),
            }
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
                match finished {
                    Some(true) => {
                        done += 1;
                        sas.remove(&spi_i);
                    }
                    Some(false) => {
                        failed += 1;
                        sas.remove(&spi_i);
                    }
                    None => {}
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
                        failed += 1;
                        sas.remove(&k);
                    }
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rate = done as f64 / elapsed;
    println!(
        "{label}: {done} IKE SA + CHILD SA setups in {elapsed:.1} s = {rate:.0}/s \
         ({failed} failed, {} unfinished, concurrency {conc})",
        sas.len()
    );
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
