//! Streaming CMD's stdout and stderr live to ours while keeping a bounded copy for the stored
//! outcome.
//!
//! Both streams draw on one budget (`--max-output`), first come first served, so the stored
//! outcome never exceeds what the store accepts, whichever stream is the chatty one. The live
//! copy is never cut: the budget bounds only what is remembered.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};

const CHUNK: usize = 64 * 1024;

/// Bytes left to capture, shared by both streams.
#[derive(Debug)]
pub struct Budget(AtomicUsize);

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Arc<Budget> {
        Arc::new(Budget(AtomicUsize::new(bytes)))
    }

    /// Takes up to `wanted` bytes; returns how many were granted.
    fn take(&self, wanted: usize) -> usize {
        let mut granted = 0;
        // The closure always returns Some, so the update cannot fail.
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                granted = left.min(wanted);
                Some(left - granted)
            });
        granted
    }
}

/// What was kept of one stream.
#[derive(Debug, Default)]
pub struct Captured {
    /// The first bytes of the stream, as far as the budget allowed.
    pub bytes: Vec<u8>,
    /// Whether the stream had more than that.
    pub cut: bool,
    /// The first error reading CMD's pipe, if reading stopped early.
    pub read_error: Option<io::Error>,
}

/// Copies `from` to `to` on a thread until end of file, capturing within `budget`.
pub fn tee<R, W>(from: R, to: W, budget: Arc<Budget>) -> io::Result<JoinHandle<Captured>>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    thread::Builder::new()
        .name("dedupe-tee".to_string())
        .spawn(move || copy(from, to, &budget))
}

fn copy(mut from: impl Read, mut to: impl Write, budget: &Budget) -> Captured {
    let mut captured = Captured::default();
    let mut live = true;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let read = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(read) => read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                captured.read_error = Some(err);
                break;
            }
        };
        let chunk = &buf[..read];
        // If our own stdout or stderr is gone (a closed pipe), keep draining CMD's pipe so that
        // CMD is not blocked or killed by our reader going away; the capture goes on.
        if live {
            live = to.write_all(chunk).and_then(|()| to.flush()).is_ok();
        }
        let granted = budget.take(read);
        captured.bytes.extend_from_slice(&chunk[..granted]);
        if granted < read {
            captured.cut = true;
        }
    }
    captured
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_and_never_overdrawn() {
        let budget = Budget::new(10);
        assert_eq!(budget.take(4), 4);
        assert_eq!(budget.take(10), 6);
        assert_eq!(budget.take(1), 0);
    }

    #[test]
    fn output_is_passed_on_whole_and_captured_within_the_budget() {
        let budget = Budget::new(5);
        let mut live = Vec::new();
        let captured = copy(&b"hello, world"[..], &mut live, &budget);
        assert_eq!(live, b"hello, world");
        assert_eq!(captured.bytes, b"hello");
        assert!(captured.cut);

        let budget = Budget::new(100);
        let captured = copy(&b"short"[..], io::sink(), &budget);
        assert_eq!(captured.bytes, b"short");
        assert!(!captured.cut);
    }

    /// A writer whose reader went away.
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_stdout_does_not_stop_the_capture() {
        let captured = copy(&b"still stored"[..], ClosedPipe, &Budget::new(100));
        assert_eq!(captured.bytes, b"still stored");
    }
}
