//! Bodies of the fuzz targets in `bus-schema/fuzz`, shared with a unit test that runs them
//! over a seed corpus on stable Rust. Not part of the API.

use crate::codec::{decode, decode_reply, decode_request, encode, encode_reply, encode_request};
use crate::samples;

/// A decoder that accepted some input did not reproduce itself on re-encoding.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unstable(pub String);

/// decode -> encode -> decode must give the same value, and the second encoding must equal the
/// first. Inputs that do not decode are fine (the decoder must only not panic).
pub fn check_envelope(data: &[u8]) -> Result<(), Unstable> {
    let Ok(env) = decode(data) else { return Ok(()) };
    let bytes = encode(&env);
    let again = decode(&bytes).map_err(|e| Unstable(format!("re-decode failed: {e}")))?;
    if again != env {
        return Err(Unstable(format!("{env:?} became {again:?}")));
    }
    if encode(&again) != bytes {
        return Err(Unstable("second encoding differs".into()));
    }
    Ok(())
}

/// Same property for control requests.
pub fn check_request(data: &[u8]) -> Result<(), Unstable> {
    let Ok(req) = decode_request(data) else {
        return Ok(());
    };
    let bytes = encode_request(&req);
    let again = decode_request(&bytes).map_err(|e| Unstable(format!("re-decode failed: {e}")))?;
    if again != req {
        return Err(Unstable(format!("{req:?} became {again:?}")));
    }
    if encode_request(&again) != bytes {
        return Err(Unstable("second encoding differs".into()));
    }
    Ok(())
}

/// Same property for control replies.
pub fn check_reply(data: &[u8]) -> Result<(), Unstable> {
    let Ok(rep) = decode_reply(data) else {
        return Ok(());
    };
    let bytes = encode_reply(&rep);
    let again = decode_reply(&bytes).map_err(|e| Unstable(format!("re-decode failed: {e}")))?;
    if again != rep {
        return Err(Unstable(format!("{rep:?} became {again:?}")));
    }
    if encode_reply(&again) != bytes {
        return Err(Unstable("second encoding differs".into()));
    }
    Ok(())
}

/// Seed corpus for the `decode` target: one envelope per body variant.
pub fn envelope_seeds() -> Vec<Vec<u8>> {
    samples::bodies()
        .into_iter()
        .map(|b| encode(&samples::envelope(b)))
        .collect()
}

/// Seed corpus for the `ctl_request` target: one request per variant.
pub fn request_seeds() -> Vec<Vec<u8>> {
    samples::requests().iter().map(encode_request).collect()
}

/// Seeds for replies (unit test only; replies come from daemons we run).
pub fn reply_seeds() -> Vec<Vec<u8>> {
    samples::replies().iter().map(encode_reply).collect()
}

/// Deterministic mutations of `seeds`: every truncation, byte substitutions with interesting
/// values at every position, insertions, splices of two seeds, and `random` xorshift-driven
/// multi-byte edits. Calls `f` on each.
pub fn for_each_mutation(seeds: &[Vec<u8>], random: usize, mut f: impl FnMut(&[u8])) {
    const INTERESTING: [u8; 12] = [
        0x00, 0x01, 0x7f, 0x80, 0x8f, 0x90, 0xa0, 0xc0, 0xc1, 0xc4, 0xdf, 0xff,
    ];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for seed in seeds {
        f(seed);
        for cut in 0..seed.len() {
            f(&seed[..cut]);
        }
        let mut m = seed.clone();
        // Invariant for the indexing below: i < m.len() == seed.len().
        for i in 0..m.len() {
            let orig = m[i];
            for v in INTERESTING
                .iter()
                .copied()
                .chain([orig ^ 1, orig.wrapping_add(1)])
            {
                m[i] = v;
                f(&m);
            }
            m[i] = orig;
        }
        for i in (0..=seed.len()).step_by(3) {
            let mut m = seed.clone();
            m.insert(i, 0xc0);
            f(&m);
        }
    }
    for a in seeds {
        for b in seeds {
            let cut_a = a.len() / 2;
            let cut_b = b.len() / 3;
            let mut m = a[..cut_a].to_vec();
            m.extend_from_slice(&b[cut_b..]);
            f(&m);
        }
    }
    if seeds.is_empty() {
        return;
    }
    // Invariant for the indexing below: seeds is not empty, and i < m.len() after the
    // emptiness check.
    for _ in 0..random {
        let seed = &seeds[(next() as usize) % seeds.len()];
        let mut m = seed.clone();
        let edits = 1 + next() % 4;
        for _ in 0..edits {
            if m.is_empty() {
                break;
            }
            let i = (next() as usize) % m.len();
            match next() % 4 {
                0 => m[i] = next() as u8,
                1 => {
                    m.remove(i);
                }
                2 => m.insert(i, next() as u8),
                _ => m.truncate(i),
            }
        }
        f(&m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns (inputs tried, inputs that decoded).
    fn run(
        seeds: &[Vec<u8>],
        check: fn(&[u8]) -> Result<(), Unstable>,
        decodes: fn(&[u8]) -> bool,
    ) -> (usize, usize) {
        let (mut n, mut ok) = (0, 0);
        for_each_mutation(seeds, 20_000, |data| {
            n += 1;
            ok += usize::from(decodes(data));
            if let Err(e) = check(data) {
                panic!("unstable on {}: {e}", crate::samples::hex(data));
            }
        });
        (n, ok)
    }

    #[test]
    fn fuzz_decode_over_seeds_and_mutations() {
        let seeds = envelope_seeds();
        let (n, ok) = run(&seeds, check_envelope, |d| decode(d).is_ok());
        // The mutations reach the re-encode path well beyond the seeds themselves.
        assert!(
            n > 20_000 && ok > 2 * seeds.len(),
            "{n} tried, {ok} decoded"
        );
    }

    #[test]
    fn fuzz_ctl_request_over_seeds_and_mutations() {
        let seeds = request_seeds();
        let (_, ok) = run(&seeds, check_request, |d| decode_request(d).is_ok());
        assert!(ok > 2 * seeds.len());
    }

    #[test]
    fn fuzz_ctl_reply_over_seeds_and_mutations() {
        let seeds = reply_seeds();
        let (_, ok) = run(&seeds, check_reply, |d| decode_reply(d).is_ok());
        assert!(ok > 2 * seeds.len());
    }
}
