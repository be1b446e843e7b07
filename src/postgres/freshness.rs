//! Which of its two ways a claim or mark of a key tries first over PostgreSQL (`peek.rs`): the
//! `INSERT` of a new key, or the read.

use std::sync::atomic::{AtomicU32, Ordering};

/// A running guess of whether the next claim or mark finds its key absent, from the last few
/// dozen: a score from 0 (every key had a row) to [`Freshness::MAX`] (none had). Updates race
/// harmlessly: a lost one only moves the guess a little less.
pub(crate) struct Freshness(AtomicU32);

impl Freshness {
    const MAX: u32 = 1 << 10;
    /// Each answer moves the score this fraction (1/16) of the way to its end.
    const SHIFT: u32 = 4;

    /// A new store expects fresh keys: most claims of an idempotency key are its first.
    pub(super) fn new() -> Freshness {
        Freshness(AtomicU32::new(Self::MAX))
    }

    /// Whether an absent key is the better bet.
    pub(super) fn likely(&self) -> bool {
        self.0.load(Ordering::Relaxed) > Self::MAX / 2
    }

    /// Counts one more key found absent (`true`) or with a row.
    pub(super) fn saw(&self, absent: bool) {
        let score = self.0.load(Ordering::Relaxed);
        self.0.store(Self::next(score, absent), Ordering::Relaxed);
    }

    /// [`saw`](Self::saw) for each of `absent` keys found absent, then `present` found with a
    /// row (a batch's), with one store.
    pub(super) fn saw_many(&self, absent: usize, present: usize) {
        if absent == 0 && present == 0 {
            return;
        }
        let mut score = self.0.load(Ordering::Relaxed);
        for found in std::iter::repeat_n(true, absent).chain(std::iter::repeat_n(false, present)) {
            score = Self::next(score, found);
        }
        self.0.store(score, Ordering::Relaxed);
    }

    /// The score after one more key found absent (`true`) or with a row.
    fn next(score: u32, absent: bool) -> u32 {
        let next = if absent {
            score + ((Self::MAX - score) >> Self::SHIFT).max(1)
        } else {
            score.saturating_sub((score >> Self::SHIFT).max(1))
        };
        next.min(Self::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::Freshness;

    #[test]
    fn freshness_follows_the_recent_answers() {
        let freshness = Freshness::new();
        assert!(freshness.likely(), "a new store expects fresh keys");
        let mut repeats = 0;
        while freshness.likely() {
            freshness.saw(false);
            repeats += 1;
        }
        assert!(
            (5..=20).contains(&repeats),
            "a short run of repeated keys turns the guess: {repeats}"
        );
        for _ in 0..1000 {
            freshness.saw(false);
        }
        assert_eq!(freshness.0.load(std::sync::atomic::Ordering::Relaxed), 0);
        let mut fresh = 0;
        while !freshness.likely() {
            freshness.saw(true);
            fresh += 1;
        }
        assert!((5..=20).contains(&fresh), "and back: {fresh}");
        for _ in 0..1000 {
            freshness.saw(true);
        }
        assert_eq!(
            freshness.0.load(std::sync::atomic::Ordering::Relaxed),
            Freshness::MAX
        );
        // A batch's counts move the score as many single answers do.
        let (one_by_one, batch) = (Freshness::new(), Freshness::new());
        for absent in [false; 7].into_iter().chain([true; 3]) {
            one_by_one.saw(absent);
        }
        batch.saw_many(0, 7);
        batch.saw_many(3, 0);
        let score = |freshness: &Freshness| freshness.0.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(score(&batch), score(&one_by_one));
    }
}
