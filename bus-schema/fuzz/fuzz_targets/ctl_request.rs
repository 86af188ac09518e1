//! Control request decoder: never panics; decode -> encode -> decode is stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = bus_schema::fuzzing::check_request(data) {
        panic!("{e}");
    }
});
