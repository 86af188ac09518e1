//! The fuzz target's body (`haven_config::fuzz_one`) over the fuzz corpus
//! plus a few thousand deterministic mutations, so the no-panic property is
//! checked on stable Rust in every test run (cargo-fuzz needs nightly).

use std::path::Path;

/// xorshift64*: deterministic, seedable, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const DICT: &[&str] = &[
    "config ",
    "edit ",
    "set ",
    "unset ",
    "next\n",
    "end\n",
    "\"",
    "'",
    "\\",
    "\n",
    "\r\n",
    "#",
    " ",
    "\t",
    "0",
    "99999999999999999999999",
    "-1",
    "255.255.255.0",
    "0.0.0.0/0",
    "ENC ",
    "********",
    "phase1-interface",
    "phase2-interface",
    "system ha",
    "router static",
    "standalone-cluster",
    "cluster-peer",
    "phase1name",
    "hbdev ",
    "dpd-retryinterval ",
    "remote-gw ",
    "proposal aes128gcm-prfsha256",
    "é",
    "\u{feff}",
    "vdom",
    "global",
    "vpn ipsec manualkey-interface",
    "enc-key 0102030405060708-",
    "local-spi 0x",
    "enc-alg aes128gcm",
];

fn mutate(rng: &mut Rng, seed: &[char]) -> String {
    let mut v: Vec<char> = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let len = v.len();
        match rng.below(6) {
            0 if len > 0 => {
                // Truncate.
                v.truncate(rng.below(len));
            }
            1 if len > 0 => {
                // Delete a range.
                let a = rng.below(len);
                let b = (a + rng.below(64)).min(len);
                v.drain(a..b);
            }
            2 if len > 0 => {
                // Duplicate a range somewhere else.
                let a = rng.below(len);
                let b = (a + rng.below(256)).min(len);
                let chunk: Vec<char> = v[a..b].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            3 if len > 0 => {
                // Replace one character.
                let at = rng.below(len);
                v[at] = char::from_u32(rng.below(0x80) as u32).unwrap_or('x');
            }
            _ => {
                // Insert a dictionary word.
                let w = DICT[rng.below(DICT.len())];
                let at = rng.below(v.len() + 1);
                v.splice(at..at, w.chars());
            }
        }
    }
    v.into_iter().collect()
}

#[test]
fn corpus_and_mutations_never_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse");
    let mut seeds: Vec<Vec<char>> = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        haven_config::fuzz_one(&text);
        seeds.push(text.chars().collect());
    }
    assert!(seeds.len() >= 10, "corpus at {} is missing", dir.display());
    seeds.sort();
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let mut runs = 0;
    for _ in 0..3000 {
        let seed = &seeds[rng.below(seeds.len())];
        let text = mutate(&mut rng, seed);
        haven_config::fuzz_one(&text);
        runs += 1;
    }
    // Pure noise made of the dialect's own words.
    for _ in 0..500 {
        let mut s = String::new();
        for _ in 0..rng.below(200) {
            s.push_str(DICT[rng.below(DICT.len())]);
        }
        haven_config::fuzz_one(&s);
        runs += 1;
    }
    assert_eq!(runs, 3500);
}
