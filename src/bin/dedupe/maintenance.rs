//! The operator's commands that change the file: `expire`, `sweep` and `compact`.

use crate::args::ExpireArgs;
use crate::console;
use crate::failure::Failure;
use crate::open::StoreFile;

/// `dedupe expire KEY`: forget the key now, whatever its state.
pub fn expire(file: &StoreFile, args: &ExpireArgs) -> Result<u8, Failure> {
    let doing = format!("cannot expire key {}", args.key);
    let was_live = file.with(&doing, |store| store.expire(args.key.as_bytes()))?;
    let line = if was_live {
        format!(
            "expired key {}; the next run or mark of it starts afresh\n",
            args.key
        )
    } else {
        format!("key {} was not live; nothing to do\n", args.key)
    };
    console::out(line.as_bytes());
    Ok(0)
}

/// `dedupe sweep`: remove expired records now.
pub fn sweep(file: &StoreFile) -> Result<u8, Failure> {
    let removed = file.with("cannot sweep expired records", |store| store.sweep())?;
    console::out(format!("removed {removed} expired records\n").as_bytes());
    Ok(0)
}

/// `dedupe compact`: give free space back to the operating system.
pub fn compact(file: &StoreFile) -> Result<u8, Failure> {
    let before = file_size(file);
    let compacted = file.with("cannot compact the store", |store| store.compact())?;
    let after = file_size(file);
    let db = file.name();
    let line = if file.path().is_none() {
        format!("{db}: nothing to compact (PostgreSQL gives space back by itself: autovacuum)\n")
    } else if compacted {
        format!("compacted {db}: {before} -> {after} bytes\n")
    } else {
        format!("{db} was already compact ({after} bytes)\n")
    };
    console::out(line.as_bytes());
    Ok(0)
}

fn file_size(file: &StoreFile) -> u64 {
    file.path()
        .and_then(|path| std::fs::metadata(path).ok())
        .map_or(0, |meta| meta.len())
}
