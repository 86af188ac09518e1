//! Bulk sync of N CHILD SAs to a joining member, through the core only: snapshot items →
//! chunks → sealed datagrams → opened → decoded → applied to a `TunnelTable`. Prints the
//! figures beside a reference measured in the same run: AES-256-GCM over the same bytes
//! with OpenSSL directly (the floor any protected sync pays). Asserts nothing about time.
//!
//! `cargo run --release -p ha-core --example ha_bench [N [MAX_BODY]]` (default 100 000 and
//! 64 KiB chunks; 1400 keeps datagrams under a 1 500-byte MTU).

use std::time::Instant;

use ha_core::link::{ClusterKind, HaLink, LinkKey, DEFAULT_PBKDF2_ITERATIONS};
use ha_core::msg::{snapshot_chunks, ChildLifetime, ChildSaSync, KeyBytes, Message, SnapshotItem};
use ha_core::{MemberId, TunnelTable};
use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    // Second argument: chunk body limit (default: the 64 KiB link maximum).
    let max_body: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(ha_core::wire::MAX_BODY_LEN);

    let t = Instant::now();
    let key = LinkKey::derive(
        ClusterKind::Fgsp,
        1,
        Some(b"bench-psk"),
        DEFAULT_PBKDF2_ITERATIONS,
    )?;
    let kdf = t.elapsed();
    let mut tx = HaLink::new(key.clone(), MemberId(1), 1)?;
    let mut rx = HaLink::new(key, MemberId(2), 1)?;

    let items: Vec<SnapshotItem> = (0..n).map(|i| SnapshotItem::ChildSa(child(i))).collect();

    let t = Instant::now();
    let chunks = snapshot_chunks(1, tx.next_counter(), items, max_body)?;
    let mut datagrams = Vec::with_capacity(chunks.len());
    for c in chunks {
        datagrams.push(tx.seal(&Message::SnapshotChunk(c))?);
    }
    let send = t.elapsed();
    let bytes: usize = datagrams.iter().map(Vec::len).sum();

    let t = Instant::now();
    let mut table = TunnelTable::new(MemberId(2));
    table.peer_joined(MemberId(1));
    let mut applied = 0usize;
    for d in &datagrams {
        let r = rx.open(d).map_err(|e| format!("drop: {e}"))?;
        if let Message::SnapshotChunk(c) = &r.message {
            applied += c.items.len();
        }
        table.handle_message(r.sender, &r.message);
    }
    let recv = t.elapsed();

    // Reference: AES-256-GCM seal + open of the same byte count, same chunking.
    let k = [7u8; 32];
    let t = Instant::now();
    for d in &datagrams {
        let mut tag = [0u8; 16];
        let ct = encrypt_aead(Cipher::aes_256_gcm(), &k, Some(&[0; 12]), &[], d, &mut tag)?;
        let pt = decrypt_aead(Cipher::aes_256_gcm(), &k, Some(&[0; 12]), &[], &ct, &tag)?;
        std::hint::black_box(pt);
    }
    let reference = t.elapsed();

    println!("ha-core bulk sync of {n} CHILD SAs ({applied} applied), chunk body <= {max_body}");
    println!(
        "  datagrams: {} ({} bytes, {:.0} bytes/SA)",
        datagrams.len(),
        bytes,
        bytes as f64 / f64::from(n.max(1))
    );
    println!("  key derivation (PBKDF2 x{DEFAULT_PBKDF2_ITERATIONS}): {kdf:?} once per start");
    println!("  owner: encode + chunk + seal:           {send:?}");
    println!("  joiner: open + decode + apply to table: {recv:?}");
    println!(
        "  total core time:                        {:?}",
        send + recv
    );
    println!("  reference, raw AES-256-GCM seal+open of the same bytes: {reference:?}");
    println!("  goal for the whole bulk sync (issue 6): under 5 s for 100 000 SAs");
    Ok(())
}
