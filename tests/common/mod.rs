//! Shared fixtures: every scenario runs on a real file and in memory, with a manual clock.
#![allow(dead_code)] // each test file uses a different part of this module

use std::path::PathBuf;
use std::time::Duration;

use dedupe_store::{Claim, ManualClock, Store, StoreBuilder, Ticket};

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// The start of every manual clock: 2026-11-22T00:00:00Z.
pub const T0: u64 = 1_795_305_600_000;

pub const LEASE: Duration = Duration::from_secs(30);
pub const TTL: Duration = Duration::from_secs(3600);

/// A store under test and the clock it reads.
pub struct Fixture {
    pub clock: ManualClock,
    pub store: Store,
    pub path: Option<PathBuf>,
    pub kind: &'static str,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    /// The builder every fixture starts from: manual clock, 30 s lease, 1 h TTL, no background
    /// sweeper (tests that want it turn it on).
    pub fn builder(clock: &ManualClock) -> StoreBuilder {
        Store::builder()
            .clock(clock.clone())
            .lease(LEASE)
            .ttl(TTL)
            .without_sweeper()
    }

    pub fn on_file(configure: impl Fn(StoreBuilder) -> StoreBuilder) -> TestResult<Fixture> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.redb");
        let clock = ManualClock::new(T0);
        let store = configure(Self::builder(&clock)).open(&path)?;
        Ok(Fixture {
            clock,
            store,
            path: Some(path),
            kind: "file",
            _dir: Some(dir),
        })
    }

    pub fn in_memory(configure: impl Fn(StoreBuilder) -> StoreBuilder) -> TestResult<Fixture> {
        let clock = ManualClock::new(T0);
        let store = configure(Self::builder(&clock)).in_memory()?;
        Ok(Fixture {
            clock,
            store,
            path: None,
            kind: "memory",
            _dir: None,
        })
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Claims `key` and expects to acquire it.
    pub fn acquire(&self, key: &str) -> TestResult<Ticket> {
        match self.store.claim(key)? {
            Claim::Acquired(ticket) => Ok(ticket),
            other => Err(format!("{}: expected to acquire {key}, got {other:?}", self.kind).into()),
        }
    }
}

/// Runs `scenario` on a file-backed store and on an in-memory one, both with default settings
/// of [`Fixture::builder`].
pub fn on_both(scenario: impl Fn(&Fixture) -> TestResult) -> TestResult {
    on_both_with(|b| b, scenario)
}

/// Like [`on_both`], with extra builder settings.
pub fn on_both_with(
    configure: impl Fn(StoreBuilder) -> StoreBuilder,
    scenario: impl Fn(&Fixture) -> TestResult,
) -> TestResult {
    for fixture in [
        Fixture::on_file(&configure)?,
        Fixture::in_memory(&configure)?,
    ] {
        scenario(&fixture).map_err(|err| format!("[{}] {err}", fixture.kind))?;
    }
    Ok(())
}

/// Asserts, with a useful message, inside a test returning `TestResult`.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+).into());
        }
    };
}
