//! Operation sequences with failing writes, set_lens and syncs (EIO, ENOSPC) and power cuts
//! mixed in: failed calls may or may not have happened, acknowledged ones must survive.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let steps = dedupe_store::testing::steps_from_bytes(data);
    if let Err(divergence) = dedupe_store::testing::run(&steps, true) {
        panic!("store and model disagree: {divergence}");
    }
});
