//! [`SimDisk`]: a [`StorageBackend`] that remembers what an fsync has made durable, so a test
//! can cut the power at any sync and look at what a real disk could then hold, and that fails
//! chosen I/O calls with EIO or ENOSPC.
//!
//! The model of a disk (as SQLite's crash tests have it): writes land in a cache that reads
//! see at once; `sync_data` makes everything written so far durable. At a power cut, each
//! write since the last sync is independently lost, kept, or garbled, where a garbled write
//! reaches the platter sector by sector (512 bytes) and each of its sectors holds the old
//! bytes, the new bytes or garbage. The one exception is the file's first sector: redb keeps
//! its magic number and both commit slots there and, like every engine that commits by
//! rewriting a header in place, relies on that sector never turning to garbage; there a
//! garbled write is torn instead (a prefix of it lands).

use std::fmt;
use std::io;
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::Mutex;
use redb::{BackendError, StorageBackend};

use super::rng::Rng;

/// The sector a disk writes atomically or, when garbled, replaces whole.
pub const SECTOR: usize = 512;

/// Which backend call a [`Fault`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, arbitrary::Arbitrary)]
pub enum IoCall {
    /// `StorageBackend::write`.
    Write,
    /// `StorageBackend::set_len`.
    SetLen,
    /// `StorageBackend::sync_data`.
    Sync,
}

/// The error a failed call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, arbitrary::Arbitrary)]
pub enum IoFailure {
    /// An I/O error (EIO).
    Eio,
    /// No space left on the device (ENOSPC).
    Enospc,
}

impl IoFailure {
    fn error(self, call: IoCall) -> io::Error {
        match self {
            IoFailure::Eio => io::Error::other(format!("simulated EIO in {call:?}")),
            IoFailure::Enospc => io::Error::new(
                io::ErrorKind::StorageFull,
                format!("simulated ENOSPC in {call:?}"),
            ),
        }
    }
}

/// An armed fault: the `nth` call of kind `call` from now fails, and so do the `times - 1`
/// calls of that kind after it (a disk that stays full for a while).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The call that fails.
    pub call: IoCall,
    /// 1 for the next such call.
    pub nth: u64,
    /// How many calls in a row fail (at least 1).
    pub times: u64,
    /// The error they return.
    pub failure: IoFailure,
}

/// What happens to the writes made since the last sync when the power is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// None of them reached the disk.
    DropAll,
    /// All of them did (the cache was written back just in time; also what a `kill -9`
    /// leaves, since the operating system keeps the cache).
    KeepAll,
    /// Each is lost, kept or garbled, at random from this seed.
    Random(u64),
}

/// How many calls of each kind the backend has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounts {
    /// Calls to `write`.
    pub writes: u64,
    /// Calls to `set_len`.
    pub set_lens: u64,
    /// Calls to `sync_data`.
    pub syncs: u64,
    /// Calls an armed fault failed.
    pub failed: u64,
}

impl IoCounts {
    /// The count for one kind of call.
    pub fn of(&self, call: IoCall) -> u64 {
        match call {
            IoCall::Write => self.writes,
            IoCall::SetLen => self.set_lens,
            IoCall::Sync => self.syncs,
        }
    }
}

#[derive(Debug, Clone)]
enum Unsynced {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

struct State {
    /// What the disk holds for sure: the bytes as of the last successful sync.
    durable: Vec<u8>,
    /// What reads see: `durable` with every unsynced change applied.
    current: Vec<u8>,
    unsynced: Vec<Unsynced>,
    counts: IoCounts,
    faults: Vec<(Fault, u64)>,
    /// Whether a failed sync forgets the writes it was to persist (see
    /// [`SimDisk::failed_sync_forgets_writes`]).
    failed_sync_forgets: bool,
    /// Cut the power at this sync (by the running count of syncs).
    power_cut_at: Option<(u64, Fate)>,
    /// The image the last power cut left; every call fails once it is set.
    cut: Option<Vec<u8>>,
}

/// A simulated disk. Clones share the same disk, so a test keeps one clone to arm faults and
/// cut the power while the store owns another.
#[derive(Clone)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("SimDisk")
            .field("len", &state.current.len())
            .field("unsynced", &state.unsynced.len())
            .field("counts", &state.counts)
            .finish_non_exhaustive()
    }
}

impl Default for SimDisk {
    fn default() -> Self {
        SimDisk::new()
    }
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> SimDisk {
        SimDisk::from_image(Vec::new())
    }

    /// A disk holding `image`, all of it durable.
    pub fn from_image(image: Vec<u8>) -> SimDisk {
        SimDisk {
            state: Arc::new(Mutex::new(State {
                durable: image.clone(),
                current: image,
                unsynced: Vec::new(),
                counts: IoCounts::default(),
                faults: Vec::new(),
                power_cut_at: None,
                failed_sync_forgets: false,
                cut: None,
            })),
        }
    }

    /// The calls seen so far.
    pub fn counts(&self) -> IoCounts {
        self.state.lock().counts
    }

    /// Arms a fault, counted from the calls seen so far.
    pub fn arm(&self, fault: Fault) {
        let mut state = self.state.lock();
        let base = state.counts.of(fault.call);
        state.faults.push((fault, base));
    }

    /// Makes a failed sync behave as Linux's does on many filesystems ("fsyncgate"): the
    /// pages it failed to write are marked clean, so reads still see the new bytes but no
    /// later sync persists them, and a power cut loses them. Default: off (a failed sync
    /// leaves its writes pending, and a later sync may persist them).
    pub fn failed_sync_forgets_writes(&self, forgets: bool) {
        self.state.lock().failed_sync_forgets = forgets;
    }

    /// Disarms every fault and any planned power cut.
    pub fn disarm(&self) {
        let mut state = self.state.lock();
        state.faults.clear();
        state.power_cut_at = None;
    }

    /// Cuts the power at the `nth` sync from now (1 = the next one): that sync fails, and
    /// so does every call after it. [`SimDisk::power_cut_image`] then gives what the disk holds.
    pub fn cut_power_at_sync(&self, nth: u64, fate: Fate) {
        let mut state = self.state.lock();
        let at = state.counts.syncs.saturating_add(nth.max(1));
        state.power_cut_at = Some((at, fate));
    }

    /// Cuts the power now.
    pub fn cut_power(&self, fate: Fate) {
        let mut state = self.state.lock();
        let image = crash_image(&state, fate);
        state.cut = Some(image);
    }

    /// Whether the power was cut.
    pub fn is_cut(&self) -> bool {
        self.state.lock().cut.is_some()
    }

    /// What the disk held when the power was cut, if it was.
    pub fn power_cut_image(&self) -> Option<Vec<u8>> {
        self.state.lock().cut.clone()
    }

    /// Everything reads see now (the cache included), as a process crash would leave it.
    pub fn current_image(&self) -> Vec<u8> {
        self.state.lock().current.clone()
    }

    /// Only what is durable.
    pub fn durable_image(&self) -> Vec<u8> {
        self.state.lock().durable.clone()
    }

    /// Returns the error of the fault this call triggers, if any, and counts the call.
    fn check(state: &mut State, call: IoCall) -> io::Result<()> {
        if state.cut.is_some() {
            return Err(io::Error::other("simulated power loss: the disk is gone"));
        }
        let count = match call {
            IoCall::Write => &mut state.counts.writes,
            IoCall::SetLen => &mut state.counts.set_lens,
            IoCall::Sync => &mut state.counts.syncs,
        };
        *count += 1;
        let seen = *count;
        if call == IoCall::Sync
            && let Some((at, fate)) = state.power_cut_at
            && seen >= at
        {
            let image = crash_image(state, fate);
            state.cut = Some(image);
            return Err(io::Error::other("simulated power loss during fsync"));
        }
        for (fault, base) in &state.faults {
            if fault.call != call {
                continue;
            }
            let first = base.saturating_add(fault.nth.max(1));
            if seen >= first && seen < first.saturating_add(fault.times.max(1)) {
                let error = fault.failure.error(call);
                state.counts.failed += 1;
                return Err(error);
            }
        }
        Ok(())
    }
}

fn apply(image: &mut Vec<u8>, change: &Unsynced) {
    match change {
        Unsynced::Write { offset, data } => write_at(image, *offset, data),
        Unsynced::SetLen(len) => image.resize(usize::try_from(*len).unwrap_or(usize::MAX), 0),
    }
}

fn write_at(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    let end = offset.saturating_add(data.len());
    if image.len() < end {
        image.resize(end, 0);
    }
    image[offset..end].copy_from_slice(data);
}

/// The durable image with each unsynced change lost, kept or garbled as `fate` says.
fn crash_image(state: &State, fate: Fate) -> Vec<u8> {
    match fate {
        Fate::DropAll => state.durable.clone(),
        Fate::KeepAll => state.current.clone(),
        Fate::Random(seed) => {
            let mut rng = Rng::new(seed);
            let mut image = state.durable.clone();
            for change in &state.unsynced {
                match rng.below(3) {
                    0 => {}
                    1 => apply(&mut image, change),
                    _ => garble(&mut image, change, &mut rng),
                }
            }
            image
        }
    }
}

/// Lands `change` partly: sector by sector old, new or garbage, with the first sector of the
/// file torn (a prefix of the new bytes) rather than garbled.
fn garble(image: &mut Vec<u8>, change: &Unsynced, rng: &mut Rng) {
    let Unsynced::Write { offset, data } = change else {
        if rng.below(2) == 0 {
            apply(image, change);
        }
        return;
    };
    let Ok(start) = usize::try_from(*offset) else {
        return;
    };
    let end = start.saturating_add(data.len());
    if image.len() < end {
        image.resize(end, 0);
    }
    let mut at = start;
    while at < end {
        let sector_end = ((at / SECTOR) + 1) * SECTOR;
        let run_end = sector_end.min(end);
        let new = &data[at - start..run_end - start];
        if at < SECTOR {
            let prefix = rng.below_usize(new.len() + 1);
            image[at..at + prefix].copy_from_slice(&new[..prefix]);
        } else {
            match rng.below(3) {
                0 => {}
                1 => image[at..run_end].copy_from_slice(new),
                _ => image[at..run_end].iter_mut().for_each(|b| *b = rng.byte()),
            }
        }
        at = run_end;
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "read past the end of the disk")
}

impl StorageBackend for SimDisk {
    fn len(&self) -> io::Result<u64> {
        let state = self.state.lock();
        if state.cut.is_some() {
            return Err(io::Error::other("simulated power loss: the disk is gone"));
        }
        Ok(state.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.state.lock();
        if state.cut.is_some() {
            return Err(io::Error::other("simulated power loss: the disk is gone"));
        }
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let end = start.checked_add(out.len()).ok_or_else(out_of_range)?;
        let bytes = state.current.get(start..end).ok_or_else(out_of_range)?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        SimDisk::check(&mut state, IoCall::SetLen)?;
        let change = Unsynced::SetLen(len);
        apply(&mut state.current, &change);
        state.unsynced.push(change);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        // A failed sync leaves its writes in the cache, unsynced: a later sync may still
        // persist them (unless `failed_sync_forgets`), and a power cut before then loses them.
        if let Err(err) = SimDisk::check(&mut state, IoCall::Sync) {
            if state.failed_sync_forgets && state.cut.is_none() {
                state.unsynced.clear();
            }
            return Err(err);
        }
        // Replaying the few pages written since the last sync is much cheaper than copying
        // the whole image at every sync.
        let unsynced = std::mem::take(&mut state.unsynced);
        for change in &unsynced {
            apply(&mut state.durable, change);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.state.lock();
        SimDisk::check(&mut state, IoCall::Write)?;
        let change = Unsynced::Write {
            offset,
            data: data.to_vec(),
        };
        apply(&mut state.current, &change);
        state.unsynced.push(change);
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        Ok(())
    }

    fn try_lock_range(&self, _: Bound<u64>, _: Bound<u64>) -> Result<bool, BackendError> {
        Err(BackendError::Unsupported)
    }
}
