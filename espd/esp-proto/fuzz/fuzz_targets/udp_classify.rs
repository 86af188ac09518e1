//! UDP/4500 demultiplexing (RFC 3948) and its builders round-trip.
//! Run: `cd espd/esp-proto/fuzz && cargo +nightly fuzz run udp_classify`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    esp_proto::fuzzing::udp_classify_round_trip(data);
});
