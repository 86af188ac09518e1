//! Manual interop probe: drives one `ike_proto::IkeSa` over UDP 500/4500
//! against strongSwan in a network namespace (see run.sh).
//!
//! usage: probe PHASE1 DHGRP PHASE2 PFS_DHGRP [resp]
//! As initiator it runs a script (liveness, CHILD rekey, new CHILD, IKE
//! rekey, liveness, delete); as responder (`resp`) it answers whatever the
//! peer does. Prints every event and the negotiated CHILD SA keys, and ends
//! with `PROBE result OK|FAIL`. A test tool: it panics on setup errors.
use ike_proto::proposal::*;
use ike_proto::sa::*;
use ike_proto::wire::*;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (p1, g1, p2, pfs) = (&args[1], &args[2], &args[3], &args[4]);
    let local: SocketAddr = "10.231.0.1:500".parse().unwrap();
    let remote: SocketAddr = "10.231.0.2:500".parse().unwrap();
    let s500 = UdpSocket::bind(local).unwrap();
    let s4500 = UdpSocket::bind("10.231.0.1:4500").unwrap();
    s500.set_nonblocking(true).unwrap();
    s4500.set_nonblocking(true).unwrap();
    let mut c = IkeConfig::psk(b"interop-secret", IdPayload::from_ip(local.ip()));
    c.ike_proposals = phase1_list(p1).unwrap();
    c.ike_groups = dhgrp_list(g1).unwrap();
    c.esp_proposals = phase2_list(p2).unwrap();
    c.pfs_groups = dhgrp_list(pfs).unwrap();
    c.peer_id = Some(IdPayload::from_ip(remote.ip()));
    c.local_ts = vec![TrafficSelector::subnet("10.1.0.0".parse().unwrap(), 16)];
    c.remote_ts = vec![TrafficSelector::subnet("0.0.0.0".parse().unwrap(), 0)];
    c.retransmit = RetransmitPolicy {
        timeouts: vec![Duration::from_secs(1); 4],
    };
    let responder = args.get(5).map(|s| s == "resp").unwrap_or(false);
    let cfg = Arc::new(c);
    let mut sa = if responder {
        let mut buf = [0u8; 65536];
        loop {
            if let Ok((n, from)) = s500.recv_from(&mut buf) {
                match IkeSa::accept(
                    Instant::now(),
                    cfg.clone(),
                    Addresses {
                        local,
                        remote: from,
                    },
                    Box::new(OsEntropy),
                    &buf[..n],
                ) {
                    Ok(Accepted::Sa(sa)) => {
                        println!("PROBE accepted from {from}");
                        break *sa;
                    }
                    Ok(Accepted::Reply(t)) => {
                        println!("PROBE stateless reply");
                        s500.send_to(&t.payload, t.destination).unwrap();
                    }
                    Err(e) => println!("PROBE accept error {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    } else {
        IkeSa::initiate(
            Instant::now(),
            cfg,
            Addresses { local, remote },
            Box::new(OsEntropy),
        )
        .unwrap()
    };
    let start = Instant::now();
    let mut step = 0;
    let mut established = false;
    let mut ok = true;
    let mut buf = [0u8; 65536];
    let mut step_at = Instant::now();
    loop {
        let now = Instant::now();
        if now.duration_since(start) > Duration::from_secs(40) {
            println!("PROBE timeout");
            ok = false;
            break;
        }
        if responder {
            step = 7;
        }
        while let Some(t) = sa.poll_transmit() {
            if t.source.port() == 4500 {
                let mut d = vec![0u8; 4];
                d.extend_from_slice(&t.payload);
                s4500.send_to(&d, t.destination).unwrap();
            } else {
                s500.send_to(&t.payload, t.destination).unwrap();
            }
        }
        while let Some(e) = sa.poll_event() {
            match &e {
                Event::ChildSaEstablished(c) => {
                    let h = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
                    println!(
                        "KEYS in={:08x} encr_in={} integ_in={} encr_out={} integ_out={}",
                        c.inbound_spi,
                        h(c.keys.encr_in.as_bytes()),
                        h(c.keys.integ_in.as_bytes()),
                        h(c.keys.encr_out.as_bytes()),
                        h(c.keys.integ_out.as_bytes())
                    );
                    println!("EVENT ChildSaEstablished in={:08x} out={:08x} {:?}/{:?} pfs={:?} rekey_of={:?} lts={} rts={}", c.inbound_spi, c.outbound_spi, c.encr, c.integ, c.pfs_group, c.rekey_of, c.local_ts[0], c.remote_ts[0])
                }
                Event::IkeSaEstablished(i) => {
                    established = true;
                    println!(
                        "EVENT IkeSaEstablished {:016x}_i {:016x}_r {:?} nat={}/{}",
                        i.spi_i, i.spi_r, i.suite, i.local_behind_nat, i.remote_behind_nat
                    )
                }
                Event::IkeSaRekeyed { new, .. } => println!(
                    "EVENT IkeSaRekeyed new {:016x}_i {:016x}_r",
                    new.spi_i, new.spi_r
                ),
                Event::MessageIdUpdate { .. } => {}
                other => println!("EVENT {:?}", other),
            }
            if matches!(
                e,
                Event::AuthFailed { .. } | Event::ChildSaFailed { .. } | Event::LivenessTimeout
            ) {
                ok = false;
            }
            if let Event::IkeSaDeleted { reason, spi_i, .. } = e {
                if spi_i == sa.spis().0 {
                    println!("PROBE closed {:?}", reason);
                    if reason != DeleteReason::Local && !(responder && reason == DeleteReason::Peer)
                    {
                        ok = false;
                    }
                    break;
                }
            }
        }
        if sa.is_closed() {
            break;
        }
        if established && !responder && now.duration_since(step_at) > Duration::from_secs(2) {
            step_at = now;
            step += 1;
            let r = match step {
                1 => {
                    println!("PROBE liveness");
                    sa.start_liveness_check(now)
                }
                2 => {
                    let Some(&s) = sa.child_spis().first() else {
                        println!("PROBE no child");
                        ok = false;
                        continue;
                    };
                    println!("PROBE rekey child {s:08x}");
                    sa.rekey_child(now, s)
                }
                3 => {
                    println!("PROBE create child");
                    sa.create_child(now)
                }
                4 => {
                    println!("PROBE rekey IKE");
                    sa.rekey_ike(now)
                }
                5 => {
                    println!("PROBE liveness");
                    sa.start_liveness_check(now)
                }
                6 => Ok(()),
                7 => {
                    println!("PROBE delete");
                    sa.delete(now)
                }
                _ => Ok(()),
            };
            if let Err(e) = r {
                println!("PROBE error {e}");
                ok = false;
            }
        }
        let mut got = false;
        for (sock, marker) in [(&s500, false), (&s4500, true)] {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                got = true;
                let mut d = &buf[..n];
                if marker {
                    if d.len() < 4 || d[..4] != [0, 0, 0, 0] {
                        continue;
                    }
                    d = &d[4..];
                }
                let path = Addresses {
                    local: sock.local_addr().unwrap(),
                    remote: from,
                };
                if let Err(e) = sa.handle_datagram(Instant::now(), path, d) {
                    println!("PROBE dropped datagram: {e}");
                }
            }
        }
        if let Some(t) = sa.poll_timeout() {
            if t <= Instant::now() {
                sa.handle_timeout(Instant::now());
            }
        }
        if !got {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    println!(
        "PROBE result {}",
        if ok && step >= 7 { "OK" } else { "FAIL" }
    );
}
