//! Creating and opening a store file: new files are private to their owner, and their
//! directory entry is made durable before the store acknowledges anything.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// The mode of a new store file unless the builder says otherwise: read and write for the
/// owner only, since the file holds other people's responses.
pub(crate) const DEFAULT_FILE_MODE: u32 = 0o600;

/// Opens the store file at `path` for reading and writing, creating it with `mode` (less the
/// process umask) if it does not exist. The mode of an existing file is never changed.
pub(crate) fn open_or_create(path: &Path, mode: u32) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    // Creating exclusively tells a new file from an existing one. A file removed between the
    // two attempts is created by the next round.
    for _ in 0..3 {
        match options.clone().create_new(true).open(path) {
            Ok(file) => {
                sync_parent(path)?;
                return Ok(file);
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
        match options.open(path) {
            Ok(file) => return Ok(file),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    Err(io::Error::other(
        "another process kept creating and removing the file while it was being opened",
    ))
}

/// Makes a new file's directory entry durable. POSIX leaves a file's creation undecided until
/// its directory is synced; without this a power cut after the store's first acknowledged
/// write could lose the whole file on a file system that does not order the two.
fn sync_parent(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
        #[cfg(feature = "testing")]
        synced::record(parent);
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The directories synced after creating a store file, for the power-loss tests.
#[cfg(feature = "testing")]
pub(crate) mod synced {
    use std::path::{Path, PathBuf};

    use parking_lot::Mutex;

    static DIRECTORIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub(crate) fn record(directory: &Path) {
        let directory = directory
            .canonicalize()
            .unwrap_or_else(|_| directory.to_path_buf());
        DIRECTORIES.lock().push(directory);
    }

    /// Whether a store file was created in `directory` and the directory then synced.
    pub(crate) fn contains(directory: &Path) -> bool {
        let directory = directory
            .canonicalize()
            .unwrap_or_else(|_| directory.to_path_buf());
        DIRECTORIES.lock().contains(&directory)
    }
}
