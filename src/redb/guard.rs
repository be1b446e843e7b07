//! Defences at the boundary with redb, for files that are damaged or were left half made:
//! a panic inside redb becomes [`Error::CorruptFile`], and a file whose creation a crash cut
//! short is created again instead of being refused forever.

use std::path::Path;
use std::sync::Arc;

use redb::StorageBackend;

use crate::error::{Error, Result};

/// redb's header size: its magic number, god byte and both commit slots.
const REDB_HEADER_LEN: usize = 320;

/// redb's magic number, the first bytes of every redb file (its file format, version 3).
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// The largest file [`inspect_file`] reads through; a larger one is never an
/// interrupted creation (redb creates files of a few hundred KiB).
const MAX_CREATION_LEN: u64 = 64 * 1024 * 1024;

/// What a file holds, as far as its first bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileStart {
    /// Nothing: a new file, or one whose creation was cut short (now emptied).
    Empty,
    /// redb's magic number.
    Redb,
    /// Something else: not a redb file.
    Foreign,
}

/// Says what the file starts as, and empties a file whose creation was cut short, so that it
/// is created again.
///
/// redb initialises a new file by sizing it, writing its header without the magic number,
/// syncing, and only then writing the magic number. A crash (or power loss) before that last
/// write leaves a non-empty file without the magic number, which redb then refuses to open,
/// forever. Such a file holds nothing: no byte past the header is set, and where the magic
/// number goes each byte is either zero or the magic number's byte at that place (the power
/// went while that write was landing, and a disk that keeps only single bytes atomic may have
/// written any of them, not only a prefix). Only a file in exactly that state is emptied;
/// anything else is left as it is: a complete magic number for redb to open, anything more is
/// foreign.
pub(crate) fn inspect_file(backend: &dyn StorageBackend, path: Option<&Path>) -> Result<FileStart> {
    let failed = |action: &'static str| {
        move |err: std::io::Error| match path {
            Some(path) => Error::Io {
                path: path.to_path_buf(),
                action,
                source: Arc::new(err),
            },
            None => Error::from(redb::Error::Io(err)),
        }
    };
    let io = failed("read");
    let len = backend.len().map_err(io)?;
    if len == 0 {
        return Ok(FileStart::Empty);
    }
    let mut head = [0u8; 9];
    let head_len = head.len().min(len as usize);
    backend.read(0, &mut head[..head_len]).map_err(io)?;
    if head == REDB_MAGIC {
        return Ok(FileStart::Redb);
    }
    let torn_magic = head
        .iter()
        .zip(REDB_MAGIC)
        .all(|(&byte, magic)| byte == 0 || byte == magic);
    if len > MAX_CREATION_LEN || !torn_magic {
        return Ok(FileStart::Foreign);
    }
    let mut offset = REDB_HEADER_LEN as u64;
    let mut chunk = vec![0u8; 64 * 1024];
    while offset < len {
        let take = chunk.len().min((len - offset) as usize);
        backend.read(offset, &mut chunk[..take]).map_err(io)?;
        if chunk[..take].iter().any(|&byte| byte != 0) {
            return Ok(FileStart::Foreign);
        }
        offset += take as u64;
    }
    backend.set_len(0).map_err(failed("empty"))?;
    backend.sync_data().map_err(failed("sync"))?;
    Ok(FileStart::Empty)
}

/// Runs a call into redb, turning a panic into [`Error::CorruptFile`].
///
/// redb documents that opening a corrupt file "may panic", and on some damaged pages its
/// reads do (a slice index taken from the page). A store must answer a damaged file with an
/// error, never by taking its caller down, so every call into redb goes through here. The
/// outer `Err` is the panic, so the caller can discard a database that may be left
/// inconsistent by it. This costs nothing unless redb panics; under `panic = "abort"` it cannot
/// help, and the panic message still reaches the panic hook (stderr by default).
pub(crate) fn guarded_call<T>(
    what: &str,
    call: impl FnOnce() -> Result<T>,
) -> Result<Result<T>, Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|text| (*text).to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_string());
        Error::CorruptFile {
            reason: format!("the storage engine panicked while {what}: {message}"),
        }
    })
}

/// [`guarded_call`] with the panic as the error.
pub(crate) fn guarded<T>(what: &str, call: impl FnOnce() -> Result<T>) -> Result<T> {
    guarded_call(what, call).unwrap_or_else(Err)
}

/// Drops a database that a panic may have left inconsistent; its drop may panic too.
pub(crate) fn drop_quietly<T>(value: T) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(value)));
}
