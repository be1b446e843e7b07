//! Runs a sequence of [`Step`]s against a real [`Store`] on a [`SimDisk`] and against the
//! [`Model`] side by side, and reports the first place they disagree.
//!
//! Faults (failed I/O calls, power cuts) make some calls fail. A failed call was not
//! acknowledged, so it may or may not have happened: the runner reads back the whole file
//! (every record, expired ones too, and the last token) and accepts either outcome, but
//! nothing else. A power cut may lose what was written since the
//! last durable commit and nothing before it: the reopened store must equal the model as of
//! the last durable commit, the model now, or the model with the interrupted call applied.

use crate::{Error, ManualClock, Store, Ticket};

use super::disk::{Fate, Fault, IoCounts, SimDisk};
use super::model::Model;
use super::raw::raw_state;
use super::step::{LEASE, MAX_STEPS, START_MILLIS, Step, TTL};

mod steps;

const MAX_TICKETS: usize = 12;
const RETRIES: usize = 64;

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Steps run.
    pub steps: usize,
    /// Calls that failed with a storage error (and were checked to have happened or not).
    pub failed_calls: usize,
    /// Power cuts survived.
    pub power_cuts: usize,
    /// Closes and reopens.
    pub reopens: usize,
    /// I/O calls made on the disk the run started on, up to its power cut if any.
    pub io: IoCounts,
}

/// A fault armed before the store is first opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    /// No fault.
    Nothing,
    /// Fail a call.
    Fault(Fault),
    /// Cut the power at the `n`th sync, counting from the store's creation.
    PowerCut(u64, Fate),
    /// Fail a call, and let a failed sync forget its writes
    /// ([`SimDisk::failed_sync_forgets_writes`]).
    FaultForgetting(Fault),
}

/// How a run opens its store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunOptions {
    /// [`StoreBuilder::quick_repair`](crate::StoreBuilder::quick_repair). Default: off, as for
    /// a store.
    pub quick_repair: bool,
}

impl RunOptions {
    /// Sets [`RunOptions::quick_repair`].
    pub fn quick_repair(mut self, enabled: bool) -> RunOptions {
        self.quick_repair = enabled;
        self
    }
}

/// Runs `steps` with the store on a fresh [`SimDisk`]. With `faults` off, `Fail` and
/// `PowerCut` steps are skipped and any storage error is a failure.
///
/// # Errors
/// A description of the first disagreement between store and model.
pub fn run(steps: &[Step], faults: bool) -> Result<Report, String> {
    run_armed(steps, faults, Arm::Nothing)
}

/// [`run`] with a fault armed before the store is created.
///
/// # Errors
/// As for [`run`].
pub fn run_armed(steps: &[Step], faults: bool, arm: Arm) -> Result<Report, String> {
    run_with(steps, faults, arm, RunOptions::default())
}

/// [`run_armed`] with the store opened as `options` say.
///
/// # Errors
/// As for [`run`].
pub fn run_with(
    steps: &[Step],
    faults: bool,
    arm: Arm,
    options: RunOptions,
) -> Result<Report, String> {
    let disk = SimDisk::new();
    let armed = !matches!(arm, Arm::Nothing);
    match arm {
        Arm::Nothing => {}
        Arm::Fault(fault) => disk.arm(fault),
        Arm::FaultForgetting(fault) => {
            disk.arm(fault);
            disk.failed_sync_forgets_writes(true);
        }
        Arm::PowerCut(nth, fate) => disk.cut_power_at_sync(nth, fate),
    }
    let mut runner = Runner {
        clock: ManualClock::new(START_MILLIS),
        first_disk: disk.clone(),
        disk,
        store: None,
        model: Model::default(),
        durable: Model::default(),
        tickets: Vec::new(),
        faults: faults || armed,
        honour_steps: faults,
        options,
        report: Report::default(),
    };
    runner.open_store()?;
    for (index, step) in steps.iter().take(MAX_STEPS).enumerate() {
        runner
            .step(step)
            .map_err(|err| format!("step {index} ({step:?}): {err}"))?;
        runner.report.steps += 1;
    }
    // The calls the steps made: `finish` disarms every fault before it makes its own.
    runner.report.io = runner.first_disk.counts();
    runner.finish()?;
    Ok(runner.report)
}

struct Runner {
    clock: ManualClock,
    first_disk: SimDisk,
    disk: SimDisk,
    store: Option<Store>,
    /// What the store holds now.
    model: Model,
    /// What it held after its last commit that changed something (and so was fsynced).
    durable: Model,
    tickets: Vec<Ticket>,
    faults: bool,
    honour_steps: bool,
    options: RunOptions,
    report: Report,
}

impl Runner {
    fn store(&self) -> Result<&Store, String> {
        self.store
            .as_ref()
            .ok_or_else(|| "no store is open".to_string())
    }

    fn store_id(&self) -> Result<u64, String> {
        Ok(self.store()?.engine().store_id())
    }

    fn is_fault(&self, err: &Error) -> bool {
        self.faults && (err.is_storage() || matches!(err, Error::Closed))
    }

    fn open_store(&mut self) -> Result<(), String> {
        let mut last = String::new();
        let mut cut = false;
        for _ in 0..RETRIES {
            let opened = Store::builder()
                .clock(self.clock.clone())
                .lease(LEASE)
                .ttl(TTL)
                .without_sweeper()
                .quick_repair(self.options.quick_repair)
                .open_backend(self.disk.clone());
            match opened {
                Ok(store) => {
                    self.store = Some(store);
                    // The power went while the store was opening: see what came back.
                    return if cut { self.settle(None) } else { Ok(()) };
                }
                Err(_) if self.disk.is_cut() => {
                    self.replace_disk()?;
                    cut = true;
                }
                Err(err) if self.is_fault(&err) => {
                    self.report.failed_calls += 1;
                    last = format!("{err:?}");
                }
                Err(err) => return Err(format!("the store did not open: {err}")),
            }
        }
        Err(format!(
            "the store did not open after repeated attempts: {last}"
        ))
    }

    /// Puts what the power cut left on a fresh disk, as a machine coming back up would find it.
    fn replace_disk(&mut self) -> Result<(), String> {
        let image = self
            .disk
            .power_cut_image()
            .ok_or_else(|| "no power cut to recover from".to_string())?;
        drop(self.store.take());
        self.disk = SimDisk::from_image(image);
        self.report.power_cuts += 1;
        Ok(())
    }

    /// After a power cut: reopen, and find which allowed state the store came back in.
    fn recover(&mut self, interrupted: Option<Model>) -> Result<(), String> {
        self.replace_disk()?;
        self.open_store()?;
        self.settle(interrupted)
    }

    /// Finds which allowed state a store reopened after a power cut holds, and takes it.
    fn settle(&mut self, interrupted: Option<Model>) -> Result<(), String> {
        let actual = raw_state(self.store()?)
            .map_err(|err| format!("reading the store after a power cut: {err}"))?;
        let candidates = [
            interrupted,
            Some(self.model.clone()),
            Some(self.durable.clone()),
        ];
        let Some(found) = candidates
            .into_iter()
            .flatten()
            .find(|model| model.records == actual.0 && model.last_token == actual.1)
        else {
            return Err(format!(
                "after a power cut the store holds {actual:#?}\nbut the last durable state was \
                 {:#?}\nand the state before the cut {:#?}",
                self.durable, self.model
            ));
        };
        self.model = found.clone();
        self.durable = found;
        self.store()?
            .verify()
            .map_err(|err| format!("verify after a power cut: {err}"))?;
        self.compare_all()
    }

    /// Takes the answer of a call that succeeded.
    fn accept(&mut self, next: Model) {
        if next != self.model {
            self.durable = next.clone();
        }
        self.model = next;
    }

    /// A call failed with a storage error: it was not acknowledged, so it may have happened or
    /// not. Reads the keys it touched to find out; anything else is a failure.
    fn failed(&mut self, err: &Error, next: Model, keys: &[Vec<u8>]) -> Result<(), String> {
        if !self.is_fault(err) {
            return Err(format!("unexpected error: {err:?}"));
        }
        self.report.failed_calls += 1;
        if self.disk.is_cut() {
            return self.recover(Some(next));
        }
        for _ in 0..RETRIES {
            match raw_state(self.store()?) {
                Ok(actual) => {
                    let matches =
                        |model: &Model| model.records == actual.0 && model.last_token == actual.1;
                    if matches(&self.model) {
                        return Ok(());
                    }
                    if matches(&next) {
                        // It happened, though possibly not durably: `durable` stays as it was.
                        self.model = next;
                        return Ok(());
                    }
                    return Err(format!(
                        "after a failed call ({err}) the store holds {actual:#?}\nwhich is \
                         neither the state before {:#?}\nnor after {next:#?} (keys {keys:?})",
                        self.model
                    ));
                }
                Err(_) if self.disk.is_cut() => return self.recover(Some(next)),
                Err(read_err) if self.is_fault(&read_err) => self.report.failed_calls += 1,
                Err(read_err) => return Err(format!("unexpected error reading back: {read_err}")),
            }
        }
        Err("the store did not recover from a failed commit".to_string())
    }

    fn ticket(&self, index: u8) -> Option<Ticket> {
        if self.tickets.is_empty() {
            return None;
        }
        self.tickets
            .get(usize::from(index) % self.tickets.len())
            .cloned()
    }

    fn remember(&mut self, ticket: Ticket) {
        if self.tickets.len() >= MAX_TICKETS {
            self.tickets.remove(0);
        }
        self.tickets.push(ticket);
    }

    fn reopen(&mut self) -> Result<(), String> {
        self.report.reopens += 1;
        if let Some(store) = self.store.take() {
            match store.close() {
                Ok(()) => self.durable = self.model.clone(),
                Err(_) if self.disk.is_cut() => return self.recover(None),
                Err(err) if self.is_fault(&err) => self.report.failed_calls += 1,
                Err(err) => return Err(format!("close failed: {err}")),
            }
        }
        self.open_store()?;
        self.compare_all()
    }

    /// The store's live entries against the model's.
    fn compare_all(&mut self) -> Result<(), String> {
        for _ in 0..RETRIES {
            let now = self.clock.now();
            let store = self.store()?;
            match store
                .list(b"", usize::MAX)
                .and_then(|listed| Ok((listed, raw_state(store)?)))
            {
                Ok((listed, raw)) => {
                    let expected = self.model.entries(now);
                    if listed != expected {
                        return Err(format!(
                            "the store lists {listed:#?}\nthe model {expected:#?}"
                        ));
                    }
                    if raw.0 != self.model.records || raw.1 != self.model.last_token {
                        return Err(format!(
                            "the store holds {raw:#?}\nthe model {:#?}",
                            self.model
                        ));
                    }
                    return Ok(());
                }
                Err(_) if self.disk.is_cut() => return self.recover(None),
                Err(err) if self.is_fault(&err) => self.report.failed_calls += 1,
                Err(err) => return Err(format!("list failed: {err}")),
            }
        }
        Err("the store did not recover".to_string())
    }

    /// Ends a run: faults off, the whole state compared, the file verified, then one last
    /// power cut that keeps only what is durable, which must hold everything acknowledged.
    fn finish(&mut self) -> Result<(), String> {
        self.disk.disarm();
        self.compare_all()?;
        let verified = self.store()?.verify();
        if let Err(err) = verified {
            if !self.is_fault(&err) {
                return Err(format!("verify failed: {err}"));
            }
            self.report.failed_calls += 1;
            self.compare_all()?;
        }
        self.disk.cut_power(Fate::DropAll);
        self.recover(None)?;
        if let Some(store) = self.store.take() {
            store
                .close()
                .map_err(|err| format!("the final close failed: {err}"))?;
        }
        Ok(())
    }
}
