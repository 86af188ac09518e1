//! Bulk sync of N CHILD SAs to a joining member over a real UDP socket (issue 6: 100 000
//! SAs, goal under 5 s), in five shapes:
//! 1. one sealed datagram per SA, as hasyncd's cluster link sent its records to a member
//!    that (re)joined before it used snapshots;
//! 2. `snapshot_chunks` (many SAs per datagram, bodies of at most 1 400 bytes so that
//!    datagrams fit a 1 500-byte MTU), sent in one burst;
//! 3. the same chunks with flow control: at most [`WINDOW`] unacknowledged chunks in
//!    flight, the receiver acknowledging the chunks it has in order, the sender going back
//!    to the first unacknowledged one after 100 ms of silence (go-back-N). This is the
//!    shape a joining member's snapshot needs (shape 5 is hasyncd's version of it);
//! 4. (printed between 2 and 3) one datagram per SA paced at [`PACE_PER_TICK`] per 20 ms,
//!    without acknowledgements;
//! 5. hasyncd's snapshot to a joining member: ha-core's `SnapshotSender` / `SnapshotJoin`
//!    as the daemon drives them, each side reading its socket once per 20 ms tick, window
//!    [`DAEMON_WINDOW`], one stream update (a changed CHILD SA) sealed and sent on every
//!    tick during the transfer and applied by the joiner after the snapshot.
//!
//! Sender and receiver are two threads with their own `HaLink` and UDP socket on
//! 127.0.0.1 (the kernel's UDP path, not a veth between namespaces); the receiver opens,
//! decodes and counts each datagram until the sender is done and the socket has been
//! silent for 500 ms. Printed: SAs delivered (a UDP burst can overflow the receiving
//! socket: nothing here retransmits), datagrams, time. Reference in the same run: the same
//! datagrams sent unsealed through the same sockets and only counted. Asserts nothing.
//!
//! `cargo run --release -p ha-core --example ha_link_bench [N]` (default 100 000).

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use ha_core::link::{ClusterKind, HaLink, LinkKey};
use ha_core::msg::{snapshot_chunks, ChildLifetime, ChildSaSync, KeyBytes, Message, SnapshotItem};
use ha_core::snapshot::{SnapshotJoin, SnapshotSender};
use ha_core::MemberId;

fn child(i: u32) -> ChildSaSync {
    ChildSaSync {
        tunnel: format!("vpn1_{i}"),
        phase1: "vpn1".into(),
        phase2: "vpn1".into(),
        ike_spi_i: u64::from(i) << 32 | 0x1234,
        ike_spi_r: u64::from(i) << 32 | 0x5678,
        spi_in: 0x8000_0000 | i,
        spi_out: 0x4000_0000 | i,
        transform: "aes128-sha1".into(),
        esn: false,
        keys_in: KeyBytes(vec![(i & 0xff) as u8; 36]),
        keys_out: KeyBytes(vec![(i >> 8) as u8; 36]),
        local_ts: vec!["0.0.0.0/0".into()],
        remote_ts: vec![format!("10.{}.{}.0/24", (i >> 8) & 0xff, i & 0xff)],
        routes: vec![format!("10.{}.{}.0/24", (i >> 8) & 0xff, i & 0xff)],
        lifetime: ChildLifetime {
            soft_s: 10_480,
            hard_s: 10_800,
            ..Default::default()
        },
        replay_window: 2048,
    }
}

/// What the receiving side saw.
struct Outcome {
    sas: usize,
    datagrams: usize,
    dropped: usize,
    elapsed: Duration,
}

/// Sends `datagrams` from a fresh socket to a fresh receiving socket; `count` turns one
/// received datagram into SAs (None: counted as dropped by the link).
fn run(
    datagrams: Vec<Vec<u8>>,
    mut count: impl FnMut(&[u8]) -> Option<usize> + Send + 'static,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    let to = rx.local_addr()?;
    rx.set_read_timeout(Some(Duration::from_millis(500)))?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    let start = Instant::now();
    let receiver = std::thread::spawn(move || {
        let mut buf = vec![0u8; 70_000];
        let (mut sas, mut n, mut dropped) = (0usize, 0usize, 0usize);
        let mut last = Instant::now();
        while let Ok(len) = rx.recv(&mut buf) {
            last = Instant::now();
            n += 1;
            match count(buf.get(..len).unwrap_or(&[])) {
                Some(k) => sas += k,
                None => dropped += 1,
            }
        }
        (sas, n, dropped, last)
    });
    for d in &datagrams {
        // A full socket buffer on loopback is an error here, not a wait: count on.
        let _ = tx.send_to(d, to);
    }
    let (sas, n, dropped, last) = receiver.join().map_err(|_| "receiver panicked")?;
    Ok(Outcome {
        sas,
        datagrams: n,
        dropped,
        elapsed: last.saturating_duration_since(start),
    })
}

/// Datagrams per 20 ms in the paced shape (100 000 in about 4 s).
const PACE_PER_TICK: usize = 512;

/// [`run`], the sender sleeping 20 ms after every [`PACE_PER_TICK`] datagrams.
fn run_paced(
    datagrams: Vec<Vec<u8>>,
    mut count: impl FnMut(&[u8]) -> Option<usize> + Send + 'static,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    let to = rx.local_addr()?;
    rx.set_read_timeout(Some(Duration::from_millis(500)))?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    let start = Instant::now();
    let receiver = std::thread::spawn(move || {
        let mut buf = vec![0u8; 70_000];
        let (mut sas, mut n, mut dropped) = (0usize, 0usize, 0usize);
        let mut last = Instant::now();
        while let Ok(len) = rx.recv(&mut buf) {
            last = Instant::now();
            n += 1;
            match count(buf.get(..len).unwrap_or(&[])) {
                Some(k) => sas += k,
                None => dropped += 1,
            }
        }
        (sas, n, dropped, last)
    });
    for batch in datagrams.chunks(PACE_PER_TICK) {
        for d in batch {
            let _ = tx.send_to(d, to);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (sas, n, dropped, last) = receiver.join().map_err(|_| "receiver panicked")?;
    Ok(Outcome {
        sas,
        datagrams: n,
        dropped,
        elapsed: last.saturating_duration_since(start),
    })
}

/// Chunks in flight without acknowledgement in shape 3.
const WINDOW: usize = 64;

/// Shape 3: go-back-N over `datagrams` (sealed chunks, index = position). Returns SAs
/// applied, datagrams sent (retransmissions included) and the time to the last
/// acknowledgement.
fn run_windowed(
    datagrams: Vec<Vec<u8>>,
    mut rx_link: HaLink,
) -> Result<(usize, usize, Duration), Box<dyn std::error::Error>> {
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    let (to, back) = (rx.local_addr()?, tx.local_addr()?);
    rx.set_read_timeout(Some(Duration::from_millis(500)))?;
    tx.set_read_timeout(Some(Duration::from_millis(100)))?;
    let total = datagrams.len();
    let start = Instant::now();
    let receiver = std::thread::spawn(move || {
        let mut buf = vec![0u8; 70_000];
        let (mut next, mut sas) = (0u32, 0usize);
        while let Ok(len) = rx.recv(&mut buf) {
            if let Ok(r) = rx_link.open(buf.get(..len).unwrap_or(&[])) {
                if let Message::SnapshotChunk(c) = r.message {
                    if c.index == next {
                        next += 1;
                        sas += c.items.len();
                    }
                }
            }
            let _ = rx.send_to(&next.to_be_bytes(), back);
            if next as usize == total {
                break;
            }
        }
        sas
    });
    let (mut acked, mut next, mut sent) = (0usize, 0usize, 0usize);
    let mut ack = [0u8; 4];
    while acked < total {
        while next < total && next < acked + WINDOW {
            let _ = tx.send_to(&datagrams[next], to);
            next += 1;
            sent += 1;
        }
        match tx.recv(&mut ack) {
            Ok(4) => acked = acked.max(u32::from_be_bytes(ack) as usize),
            Ok(_) => {}
            // Silence: go back to the first unacknowledged chunk.
            Err(_) => next = acked,
        }
    }
    let elapsed = start.elapsed();
    let sas = receiver.join().map_err(|_| "receiver panicked")?;
    Ok((sas, sent, elapsed))
}

/// hasyncd's transfer parameters (`hasyncd/src/cluster/snapshot.rs`) and tick.
const DAEMON_WINDOW: u32 = 16;
const DAEMON_CHUNK_BODY: usize = 32_000;
const DAEMON_RTO_MS: u64 = 300;
const TICK: Duration = Duration::from_millis(20);

/// hasyncd's `LinkSocket` (src/io.rs): a reader thread moves datagrams from the socket into
/// a queue of 4 096 that the tick drains. Returns the queue.
fn reader(sock: UdpSocket) -> std::io::Result<std::sync::mpsc::Receiver<Vec<u8>>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(4096);
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 70_000];
        let deadline = Instant::now() + Duration::from_secs(70);
        while Instant::now() < deadline {
            if let Ok(n) = sock.recv(&mut buf) {
                if let Err(std::sync::mpsc::TrySendError::Disconnected(_)) =
                    tx.try_send(buf.get(..n).unwrap_or(&[]).to_vec())
                {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

/// Shape 5. Returns (CHILD SAs in the applied snapshot, stream updates applied after it,
/// updates sent during the transfer, go-back-N restarts, chunks, time from the start of
/// the snapshot (chunking included) to the joiner applying it).
#[allow(clippy::type_complexity)]
fn run_daemon_shape(
    n: u32,
    key: LinkKey,
) -> Result<(usize, usize, usize, u64, usize, Duration), Box<dyn std::error::Error>> {
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    let (to, back) = (rx.local_addr()?, tx.local_addr()?);
    let rx_queue = reader(rx.try_clone()?)?;
    let tx_queue = reader(tx.try_clone()?)?;
    let (a, b) = (MemberId(1), MemberId(2));
    let mut rx_link = HaLink::new(key.clone(), b, 5)?;
    let mut tx_link = HaLink::new(key, a, 5)?;
    let records: Vec<SnapshotItem> = (0..n).map(|i| SnapshotItem::ChildSa(child(i))).collect();
    let receiver = std::thread::spawn(move || {
        let mut join = SnapshotJoin::default();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            for d in rx_queue.try_iter() {
                let Ok(r) = rx_link.open(&d) else { continue };
                match r.message {
                    Message::SnapshotChunk(c) => {
                        let (ack, done) = join.chunk(r.sender, r.epoch, c);
                        if let Ok(d) = rx_link.seal(&Message::SnapshotRequest(ack)) {
                            let _ = rx.send_to(&d, back);
                        }
                        if let Some(done) = done {
                            let sas = done
                                .snapshot
                                .items
                                .iter()
                                .filter(|i| matches!(i, SnapshotItem::ChildSa(_)))
                                .count();
                            return Some((sas, done.then.len(), Instant::now()));
                        }
                    }
                    m => {
                        let _ = join.stream(r.epoch, r.counter, m);
                    }
                }
            }
            std::thread::sleep(TICK);
        }
        None
    });
    let start = Instant::now();
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let mut s = SnapshotSender::new(
        b,
        1,
        tx_link.next_counter(),
        records,
        env("BODY").map_or(DAEMON_CHUNK_BODY, |v| v as usize),
        0,
    )?
    .with_window(env("WIN").map_or(DAEMON_WINDOW, |v| v as u32))
    .with_retransmit_ms(env("RTO").unwrap_or(DAEMON_RTO_MS));
    let mut updates = 0usize;
    while !s.is_done() && start.elapsed() < Duration::from_secs(60) {
        let now_ms = start.elapsed().as_millis() as u64;
        for d in tx_queue.try_iter() {
            if let Ok(r) = tx_link.open(&d) {
                if let Message::SnapshotRequest(ack) = r.message {
                    s.handle_ack(r.sender, &ack, now_ms);
                }
            }
        }
        // A change on the carrier while the snapshot runs (the stream).
        let mut sa = child(updates as u32 % n.max(1));
        sa.replay_window = 4096;
        let _ = tx.send_to(&tx_link.seal(&Message::ChildSa(sa))?, to);
        updates += 1;
        while let Some(c) = s.poll_transmit(now_ms) {
            let _ = tx.send_to(&tx_link.seal(&Message::SnapshotChunk(c))?, to);
        }
        std::thread::sleep(TICK);
    }
    let (sas, then, at) = receiver
        .join()
        .map_err(|_| "receiver panicked")?
        .ok_or("the joiner never completed the snapshot")?;
    Ok((
        sas,
        then,
        updates,
        s.retransmissions(),
        // Cut as the window reached them: all of them once the transfer is done.
        s.chunk_count(),
        at.saturating_duration_since(start),
    ))
}

fn report(what: &str, sent: usize, n: u32, o: &Outcome) {
    println!(
        "  {what}: {} of {n} SAs delivered in {:?} ({} of {sent} datagrams arrived, {} refused)",
        o.sas, o.elapsed, o.datagrams, o.dropped
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    // A fast derivation: this measures the link, not PBKDF2.
    let key = LinkKey::derive(ClusterKind::Fgcp, 1, Some(b"bench-password"), 1_000)?;
    println!("bulk sync of {n} CHILD SAs over UDP on 127.0.0.1 (sealed with ha-core's HaLink)");

    // 1. One datagram per SA, as hasyncd sends to a member that (re)joined.
    let mut tx = HaLink::new(key.clone(), MemberId(1), 1)?;
    let t = Instant::now();
    let mut per_sa = Vec::with_capacity(n as usize);
    for i in 0..n {
        per_sa.push(tx.seal(&Message::ChildSa(child(i)))?);
    }
    let seal_time = t.elapsed();
    let bytes: usize = per_sa.iter().map(Vec::len).sum();
    let plain = per_sa.clone();
    let mut rx = HaLink::new(key.clone(), MemberId(2), 1)?;
    let o = run(per_sa, move |d| match rx.open(d) {
        Ok(r) => Some(usize::from(matches!(r.message, Message::ChildSa(_)))),
        Err(_) => None,
    })?;
    println!("one datagram per SA ({bytes} bytes; sealing took {seal_time:?} before sending):");
    report("sealed", n as usize, n, &o);
    let r = run(plain, |_| Some(1))?;
    report("reference, same datagrams unsealed", n as usize, n, &r);

    // 2. Snapshot chunks of at most 1 400 bytes.
    let mut tx = HaLink::new(key.clone(), MemberId(1), 2)?;
    let items: Vec<SnapshotItem> = (0..n).map(|i| SnapshotItem::ChildSa(child(i))).collect();
    let t = Instant::now();
    let chunks = snapshot_chunks(1, tx.next_counter(), items, 1_400)?;
    let mut sealed = Vec::with_capacity(chunks.len());
    for c in chunks {
        sealed.push(tx.seal(&Message::SnapshotChunk(c))?);
    }
    let seal_time = t.elapsed();
    let sent = sealed.len();
    let bytes: usize = sealed.iter().map(Vec::len).sum();
    let plain = sealed.clone();
    let mut rx = HaLink::new(key.clone(), MemberId(2), 2)?;
    let o = run(sealed, move |d| match rx.open(d) {
        Ok(r) => match r.message {
            Message::SnapshotChunk(c) => Some(c.items.len()),
            _ => Some(0),
        },
        Err(_) => None,
    })?;
    println!(
        "snapshot chunks ({sent} datagrams, {bytes} bytes; chunking + sealing took {seal_time:?}):"
    );
    report("sealed", sent, n, &o);
    let per = n as usize / sent.max(1);
    let r = run(plain, move |_| Some(per))?;
    report(
        "reference, same datagrams unsealed (SAs estimated)",
        sent,
        n,
        &r,
    );

    // 4. One datagram per SA again, paced: PACE_PER_TICK every 20 ms (hasyncd's tick).
    let mut tx = HaLink::new(key.clone(), MemberId(1), 4)?;
    let mut per_sa = Vec::with_capacity(n as usize);
    for i in 0..n {
        per_sa.push(tx.seal(&Message::ChildSa(child(i)))?);
    }
    let mut rx = HaLink::new(key.clone(), MemberId(2), 4)?;
    let o = run_paced(per_sa, move |d| match rx.open(d) {
        Ok(r) => Some(usize::from(matches!(r.message, Message::ChildSa(_)))),
        Err(_) => None,
    })?;
    println!("one datagram per SA, paced {PACE_PER_TICK} per 20 ms, no acknowledgements:");
    report("sealed", n as usize, n, &o);

    // 3. The same chunks with a window and acknowledgements.
    let mut tx = HaLink::new(key.clone(), MemberId(1), 3)?;
    let items: Vec<SnapshotItem> = (0..n).map(|i| SnapshotItem::ChildSa(child(i))).collect();
    let chunks = snapshot_chunks(1, tx.next_counter(), items, 1_400)?;
    let mut sealed = Vec::with_capacity(chunks.len());
    for c in chunks {
        sealed.push(tx.seal(&Message::SnapshotChunk(c))?);
    }
    let chunks_n = sealed.len();
    let (sas, sent, elapsed) = run_windowed(sealed, HaLink::new(key.clone(), MemberId(2), 3)?)?;
    println!("snapshot chunks, window {WINDOW} with acknowledgements (go-back-N):");
    println!(
        "  sealed: {sas} of {n} SAs delivered in {elapsed:?} ({sent} datagrams sent for {chunks_n} chunks)"
    );

    // 5. hasyncd's snapshot path (BODY, WIN, RTO in the environment override its values).
    let (sas, then, updates, restarts, chunks, elapsed) = run_daemon_shape(n, key)?;
    println!(
        "hasyncd's snapshot to a joining member (SnapshotSender/SnapshotJoin, window {DAEMON_WINDOW}, 20 ms ticks):"
    );
    println!(
        "  {sas} of {n} SAs applied in {elapsed:?} ({chunks} chunks, {restarts} go-back-N restarts); \
         {then} stream updates applied after the snapshot, {updates} sent by the carrier during it"
    );
    println!("goal (issue 6): the whole bulk sync of 100 000 SAs under 5 s, nothing lost");
    Ok(())
}
