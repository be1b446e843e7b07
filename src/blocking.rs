//! Which threads run the crate's own blocking work inside a tokio runtime.
//!
//! The HTTP layer makes each store call on tokio's blocking pool. Such a thread belongs to a
//! runtime (`Handle::try_current` finds it) but runs no task of it, so it may run a future to
//! its end on a runtime of its own, as a thread outside any runtime may. The layer marks the
//! thread for the length of its call with [`run`]; the PostgreSQL engine asks [`marked`] and
//! then drives its connection on the calling thread rather than handing each round trip to
//! its runtime's threads and back.
//!
//! Only the crate marks a thread: a caller's own `spawn_blocking` closure may itself be inside
//! `Handle::block_on`, where starting another runtime panics, and the engine cannot tell.

use std::cell::Cell;

thread_local! {
    static MARKED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `work` with this thread marked as one that is in no runtime's task.
///
/// Call it only on a thread of tokio's blocking pool (inside `spawn_blocking`), or on one
/// outside every runtime, and never from inside `Handle::block_on`.
#[cfg_attr(not(feature = "http"), allow(dead_code))]
pub(crate) fn run<T>(work: impl FnOnce() -> T) -> T {
    /// Puts the mark back as it was, also when `work` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            MARKED.with(|marked| marked.set(self.0));
        }
    }
    let _restore = Restore(MARKED.with(|marked| marked.replace(true)));
    work()
}

/// Whether the calling thread is inside [`run`].
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn marked() -> bool {
    MARKED.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_marked_only_inside_run() {
        assert!(!marked());
        assert!(run(marked));
        assert!(run(|| run(marked)), "a nested run keeps the mark");
        assert!(!marked());
        let panicked = std::panic::catch_unwind(|| run(|| panic!("the work panics")));
        assert!(panicked.is_err());
        assert!(!marked(), "a panic in the work takes the mark off");
        assert!(
            !std::thread::spawn(|| {
                run(|| ());
                marked()
            })
            .join()
            .expect("the thread"),
        );
    }
}
