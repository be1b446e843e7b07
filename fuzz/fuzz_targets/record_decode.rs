//! Any bytes as a stored record envelope: decoding never panics and never allocates what a
//! corrupt length prefix claims; whatever decodes round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dedupe_store::testing::decode_record(data);
});
