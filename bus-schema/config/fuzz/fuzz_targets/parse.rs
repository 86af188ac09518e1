//! Arbitrary UTF-8 into `haven_config::parse`: must never panic, and every
//! error must carry a position (checked inside `fuzz_one`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        haven_config::fuzz_one(text);
    }
});
