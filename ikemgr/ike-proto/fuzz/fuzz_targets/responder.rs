//! The IKE responder fed whole message sequences (see `ike_proto::sa::fuzz`).
//! The same body runs on stable in `sa::fuzz::tests::fuzz_body_over_seeds_and_mutations`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ike_proto::sa::fuzz::fuzz_responder(data);
});
