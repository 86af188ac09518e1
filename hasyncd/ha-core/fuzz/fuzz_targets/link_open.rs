#![no_main]
//! Any bytes as an HA link datagram, and as a message body sealed by an authentic sender.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ha_core::fuzzing::link_open(data);
});
