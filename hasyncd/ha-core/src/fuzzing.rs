//! Fuzz bodies, shared by the cargo-fuzz targets in `fuzz/` (nightly) and the unit tests
//! below (stable): each runs one input and panics only on a broken invariant.

use crate::link::{ClusterKind, HaLink, LinkKey};
use crate::msg::Message;
use crate::wire::{Header, MemberId, MsgType, HEADER_LEN};

fn link(me: u32, epoch: u64) -> Option<HaLink> {
    // One PBKDF2 iteration: the fuzzer exercises parsing, not key stretching.
    let key = LinkKey::derive(ClusterKind::Fgcp, 7, Some(b"fuzz"), 1).ok()?;
    HaLink::new(key, MemberId(me), epoch).ok()
}

/// Feed `data` to the link receiver as a datagram, and as a body of every type through an
/// authentic sender. Invariants: no panic; a header that parses re-encodes to the same
/// bytes; an accepted body decodes to a message that re-encodes and decodes to itself; a
/// rejected datagram leaves the receiver's counters unchanged except its drop count.
pub fn link_open(data: &[u8]) {
    let (Some(mut tx), Some(mut rx)) = (link(1, 1), link(2, 1)) else {
        return;
    };
    if let Ok((h, _)) = Header::parse(data) {
        assert_eq!(h.encode()[..], data[..HEADER_LEN]);
    }
    let before = rx.stats().clone();
    match rx.open(data) {
        Ok(r) => check_message(&r.message),
        Err(_) => {
            assert_eq!(rx.stats().received, before.received);
            assert_eq!(rx.stats().drops_total(), before.drops_total() + 1);
        }
    }
    let ty = MsgType(data.first().copied().unwrap_or(0) % 12);
    let body = data.get(1..).unwrap_or(&[]);
    if let Ok(d) = tx.seal_raw(ty, body) {
        match rx.open(&d) {
            Ok(r) => {
                assert_eq!(r.message.msg_type(), ty);
                check_message(&r.message);
            }
            Err(reason) => assert!(
                reason.after_authentication() || !ty.is_known() || {
                    // A known type whose body failed to decode.
                    Message::decode_body(ty, body).is_err()
                }
            ),
        }
    }
}

fn check_message(m: &Message) {
    let body = m.encode_body().expect("a decoded message encodes");
    let back = Message::decode_body(m.msg_type(), &body).expect("and decodes again");
    assert_eq!(&back, m);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::tests::all_samples;

    fn corpus() -> Vec<Vec<u8>> {
        let mut tx = link(1, 1).unwrap();
        let mut out = Vec::new();
        for m in all_samples() {
            let body = m.encode_body().unwrap();
            let mut raw = vec![m.msg_type().0];
            raw.extend_from_slice(&body);
            out.push(raw);
            out.push(tx.seal(&m).unwrap());
        }
        out.push(Vec::new());
        out.push(vec![1; 40]);
        // A deeply nested unknown field (found to overflow the stack before MAX_DEPTH).
        let mut deep = vec![MsgType::SNAPSHOT_REQUEST.0, 0x81, 0xa1, b'x'];
        deep.extend(std::iter::repeat_n(0x91u8, 20_000));
        out.push(deep);
        out
    }

    /// With `HA_FUZZ_SEED_DIR` set, writes the corpus there (seeds for `cargo fuzz`).
    #[test]
    fn write_seed_corpus_when_asked() {
        let Ok(dir) = std::env::var("HA_FUZZ_SEED_DIR") else {
            return;
        };
        std::fs::create_dir_all(&dir).unwrap();
        for (i, c) in corpus().iter().enumerate() {
            std::fs::write(format!("{dir}/seed-{i:02}"), c).unwrap();
        }
    }

    /// Runs the fuzz body over the corpus and deterministic mutations of it (bit flips,
    /// truncations, byte insertions, splices). `HA_FUZZ_ITERS` raises the mutation count.
    #[test]
    fn fuzz_body_over_corpus_and_mutations() {
        let iters: usize = std::env::var("HA_FUZZ_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        let corpus = corpus();
        for c in &corpus {
            link_open(c);
        }
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..iters {
            let mut d = corpus[next() as usize % corpus.len()].clone();
            for _ in 0..1 + next() % 4 {
                let r = next();
                match r % 5 {
                    0 if !d.is_empty() => {
                        let i = (r >> 8) as usize % d.len();
                        d[i] ^= 1 << ((r >> 40) % 8);
                    }
                    1 if !d.is_empty() => d.truncate((r >> 8) as usize % d.len()),
                    2 => {
                        let i = (r >> 8) as usize % (d.len() + 1);
                        d.insert(i, (r >> 32) as u8);
                    }
                    3 => {
                        let other = &corpus[(r >> 8) as usize % corpus.len()];
                        let cut = (r >> 32) as usize % (other.len() + 1);
                        d.extend_from_slice(&other[cut..]);
                    }
                    _ if !d.is_empty() => {
                        let i = (r >> 8) as usize % d.len();
                        d[i] = (r >> 48) as u8;
                    }
                    _ => {}
                }
            }
            link_open(&d);
        }
    }
}
