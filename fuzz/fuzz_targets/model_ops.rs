//! Operation sequences (claims, completes, releases, extends, expires, marks, sweeps, clock
//! jumps, reopens) against the store and the reference model side by side, on a healthy disk.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let steps = dedupe_store::testing::steps_from_bytes(data);
    if let Err(divergence) = dedupe_store::testing::run(&steps, false) {
        panic!("store and model disagree: {divergence}");
    }
});
