//! Decode -> encode -> decode must agree, and decoding must not panic.
//! The same body runs on stable in `wire::tests::fuzz_body_over_corpus_and_mutations`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ike_proto::wire::fuzz_decode(data);
});
