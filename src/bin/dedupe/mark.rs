//! `dedupe mark KEY`: the dedupe set for shell scripts.

use crate::args::MarkArgs;
use crate::failure::{Failure, IO_ERROR};
use crate::open::StoreFile;

/// Exit 0 when `KEY` is new (it is now marked), 1 when it was seen within its TTL. A store
/// error exits 74 rather than 1, so that `if dedupe mark "$id"` never skips work because the
/// disk was full.
pub fn mark(file: &StoreFile, args: &MarkArgs) -> Result<u8, Failure> {
    let doing = format!("cannot mark key {}", args.key);
    let first = file
        .with(&doing, |store| {
            store.mark_seen_with_ttl(args.key.as_bytes(), args.ttl)
        })
        .map_err(|failure| failure.store_code(IO_ERROR))?;
    Ok(if first { 0 } else { 1 })
}
