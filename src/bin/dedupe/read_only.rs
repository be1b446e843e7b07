//! Reading a store file without writing to it: the readers (`get`, `list`, `stats`,
//! `verify`) open the file read-only, so they work on a file the user may only read, and
//! never change one.
//!
//! The store, and redb under it, write even when only asked to read: opening a file marks it
//! open, a file left by a crash is repaired, a clean close saves the allocator state. So the
//! readers open the store on [`ReadOnlyFile`], a storage backend that reads the file through
//! a read-only descriptor and keeps every write in memory, copy on write: the store sees its
//! own writes, and the file is left exactly as it was. A reader takes a *shared* lock on the
//! file, so readers run side by side while no writer can change the file under them, and a
//! writer that holds the file makes the reader wait as before.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::sync::Mutex;

use redb::StorageBackend;
use redb::backends::FileBackend;

/// The unit in which writes are kept in memory.
const BLOCK: u64 = 4096;

/// A store file read through a read-only descriptor, its writes kept in memory.
#[derive(Debug)]
pub struct ReadOnlyFile {
    file: FileBackend,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The length the store sees.
    len: u64,
    /// Bytes of the file below this are still the store's; above it the file was cut by a
    /// `set_len` (in memory), and reads see zeros unless written since.
    file_valid: u64,
    /// Blocks written since the open, by block number, each `BLOCK` bytes.
    written: BTreeMap<u64, Vec<u8>>,
}

impl ReadOnlyFile {
    /// Reads `file`, opened read-only.
    pub fn new(file: File) -> io::Result<ReadOnlyFile> {
        let len = file.metadata()?.len();
        Ok(ReadOnlyFile {
            file: FileBackend::new(file).map_err(io::Error::other)?,
            state: Mutex::new(State {
                len,
                file_valid: len,
                written: BTreeMap::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The block as the store sees it now.
    fn block(&self, state: &State, number: u64) -> io::Result<Vec<u8>> {
        if let Some(block) = state.written.get(&number) {
            return Ok(block.clone());
        }
        let mut block = vec![0u8; BLOCK as usize];
        let start = number * BLOCK;
        let from_file = state.file_valid.saturating_sub(start).min(BLOCK);
        if from_file > 0 {
            self.file.read(start, &mut block[..from_file as usize])?;
        }
        Ok(block)
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the store",
    )
}

impl StorageBackend for ReadOnlyFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.state();
        let end = offset
            .checked_add(out.len() as u64)
            .ok_or_else(out_of_range)?;
        if end > state.len {
            return Err(out_of_range());
        }
        // Unwritten ranges inside the file are read straight through, in one call.
        let first = offset / BLOCK;
        let last = end.div_ceil(BLOCK);
        if end <= state.file_valid && state.written.range(first..last).next().is_none() {
            return self.file.read(offset, out);
        }
        let mut done = 0usize;
        while done < out.len() {
            let at = offset + done as u64;
            let number = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let take = (BLOCK as usize - within).min(out.len() - done);
            let block = self.block(&state, number)?;
            out[done..done + take].copy_from_slice(&block[within..within + take]);
            done += take;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state();
        if len < state.len {
            state.file_valid = state.file_valid.min(len);
            // Bytes past the new end must read as zeros if the store grows again.
            let keep = len.div_ceil(BLOCK);
            state.written.split_off(&keep);
            if !len.is_multiple_of(BLOCK)
                && let Some(block) = state.written.get_mut(&(len / BLOCK))
            {
                block[(len % BLOCK) as usize..].fill(0);
            }
        }
        state.len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.state();
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let number = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let take = (BLOCK as usize - within).min(data.len() - done);
            let mut block = self.block(&state, number)?;
            block[within..within + take].copy_from_slice(&data[done..done + take]);
            state.written.insert(number, block);
            done += take;
        }
        let end = offset + data.len() as u64;
        state.len = state.len.max(end);
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        self.file.close()
    }

    // Every lock the store asks for is taken shared: other readers may read beside this one,
    // and no writer can change the file under it. (An exclusive lock would also need write
    // access to the file.)
    fn try_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.file.try_lock_shared_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.file.lock_shared_range(start, end)
    }

    fn lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.file.unlock_range(start, end)
    }

    fn query_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.file.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(contents: &[u8]) -> io::Result<(tempfile::NamedTempFile, ReadOnlyFile)> {
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), contents)?;
        let backend = ReadOnlyFile::new(File::open(file.path())?)?;
        Ok((file, backend))
    }

    #[test]
    fn writes_are_seen_by_reads_and_never_reach_the_file() -> io::Result<()> {
        let original: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (file, backend) = backend(&original)?;
        backend.write(4090, &[0xAA; 20])?;
        let mut got = vec![0u8; 30];
        backend.read(4080, &mut got)?;
        assert_eq!(&got[..10], &original[4080..4090]);
        assert_eq!(&got[10..30], &[0xAA; 20]);
        backend.write(12_000, b"grown")?;
        assert_eq!(backend.len()?, 12_005);
        let mut gap = vec![1u8; 10];
        backend.read(10_000, &mut gap)?;
        assert_eq!(gap, vec![0u8; 10], "new space reads as zeros");
        assert_eq!(
            std::fs::read(file.path())?,
            original,
            "the file was written"
        );
        Ok(())
    }

    #[test]
    fn a_cut_then_grown_store_reads_zeros_past_the_cut() -> io::Result<()> {
        let (_file, backend) = backend(&[7u8; 9000])?;
        backend.write(5000, &[9u8; 100])?;
        backend.set_len(4500)?;
        backend.set_len(9000)?;
        let mut got = vec![1u8; 9000];
        backend.read(0, &mut got)?;
        assert!(got[..4500].iter().all(|&b| b == 7));
        assert!(got[4500..].iter().all(|&b| b == 0));
        assert!(backend.read(8999, &mut [0u8; 2]).is_err());
        Ok(())
    }
}
