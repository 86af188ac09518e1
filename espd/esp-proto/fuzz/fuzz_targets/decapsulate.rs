//! Hostile ESP packets and hostile authenticated payloads through `DecryptSa::decapsulate`.
//! Run: `cd espd/esp-proto/fuzz && cargo +nightly fuzz run decapsulate`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = esp_proto::fuzzing::decapsulate_and_classify(data);
});
