//! What the store tells the tools people already run: a `tracing` span per public operation
//! (feature `tracing`) and `metrics` counters, histograms and gauges (feature `metrics`).
//!
//! Without either feature every function here is an empty inline one, so the store pays
//! nothing. Keys never appear raw: spans carry a short hash of the key, keyed by the store's
//! random id (see [`key_hash`]), and metric labels carry no key at all.

// Without `tracing` nothing reads the tickets or the key hash, and without either feature
// nothing reads the outcome words; the call sites compile the same either way, so they stay.
#![cfg_attr(not(feature = "tracing"), allow(dead_code))]

#[cfg(any(feature = "tracing", feature = "metrics"))]
use std::time::Instant;

use crate::claim::Claim;
use crate::error::Error;
use crate::sequence::SeqCheck;

/// The name of the engine in spans and labels.
pub(crate) const ENGINE: &str = "redb";

/// What a public operation answered, for spans and metric labels.
pub(crate) trait Outcome {
    /// A short lowercase word for the answer of operation `op`: `acquired`, `replayed`,
    /// `in_progress`...
    fn outcome(&self, op: &'static str) -> &'static str;
    /// The attempt and fencing token of a claim's ticket, if the answer has one.
    fn ticket(&self) -> Option<(u32, u64)> {
        None
    }
}

impl Outcome for Claim {
    fn outcome(&self, _op: &'static str) -> &'static str {
        match self {
            Claim::Acquired(ticket) if ticket.is_takeover() => "takeover",
            Claim::Acquired(_) => "acquired",
            Claim::Completed(_) => "replayed",
            Claim::InProgress { .. } => "in_progress",
            Claim::Mismatch { .. } => "mismatch",
        }
    }

    fn ticket(&self) -> Option<(u32, u64)> {
        match self {
            Claim::Acquired(ticket) => Some((ticket.attempt(), ticket.fencing_token())),
            _ => None,
        }
    }
}

impl Outcome for () {
    fn outcome(&self, _op: &'static str) -> &'static str {
        "ok"
    }
}

impl Outcome for bool {
    fn outcome(&self, op: &'static str) -> &'static str {
        match (op, *self) {
            ("expire", true) => "expired",
            ("expire", false) => "absent",
            (_, true) => "first",
            (_, false) => "duplicate",
        }
    }
}

/// A lease deadline (`extend`, `checkpoint`).
impl Outcome for u64 {
    fn outcome(&self, _op: &'static str) -> &'static str {
        "ok"
    }
}

impl Outcome for SeqCheck {
    fn outcome(&self, _op: &'static str) -> &'static str {
        match self {
            SeqCheck::Accepted => "accepted",
            SeqCheck::Duplicate => "duplicate",
            SeqCheck::Stale { .. } => "stale",
            SeqCheck::Gap { .. } => "gap",
        }
    }
}

impl<T> Outcome for Option<T> {
    fn outcome(&self, _op: &'static str) -> &'static str {
        if self.is_some() { "found" } else { "absent" }
    }
}

impl<T> Outcome for Vec<T> {
    fn outcome(&self, _op: &'static str) -> &'static str {
        "ok"
    }
}

impl Outcome for crate::stats::Stats {
    fn outcome(&self, _op: &'static str) -> &'static str {
        "ok"
    }
}

impl Outcome for usize {
    fn outcome(&self, _op: &'static str) -> &'static str {
        "ok"
    }
}

/// The outcome label of an error: what kind of refusal or failure it was.
pub(crate) fn error_outcome(err: &Error) -> &'static str {
    match err {
        Error::LeaseLost { .. } => "lease_lost",
        Error::KeyBudgetExhausted { .. } => "key_budget_exhausted",
        Error::ForeignTicket { .. } => "foreign_ticket",
        Error::Corrupt { .. } => "corrupt_record",
        Error::Closed => "closed",
        err if err.is_storage() => "storage_error",
        _ => "invalid_input",
    }
}

/// A stable short hash of a key for spans: eight hex digits of a CRC32 of the store's random
/// id followed by the key. The same key gets the same hash in every span of one store file
/// (across restarts), so a retry storm can be followed; without the store's id, which stays in
/// the file, the hash does not tell which of a few guessable keys it is.
pub(crate) fn key_hash(store_id: u64, key: &[u8]) -> String {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&store_id.to_le_bytes());
    hasher.update(key);
    format!("{:08x}", hasher.finalize())
}

/// Runs one public operation `op` inside its span, then records its outcome and latency.
/// `key` is the key's hash input: the store's id and the raw key.
#[cfg(any(feature = "tracing", feature = "metrics"))]
pub(crate) fn operation<T: Outcome>(
    op: &'static str,
    key: Option<(u64, &[u8])>,
    run: impl FnOnce() -> crate::Result<T>,
) -> crate::Result<T> {
    let started = Instant::now();
    #[cfg(feature = "tracing")]
    let span = {
        let key_hash = key.map(|(store_id, key)| key_hash(store_id, key));
        tracing::info_span!(
            "dedupe",
            op,
            engine = ENGINE,
            key_hash = key_hash.as_deref(),
            outcome = tracing::field::Empty,
            attempt = tracing::field::Empty,
            fencing_token = tracing::field::Empty,
        )
    };
    #[cfg(not(feature = "tracing"))]
    let _ = key;
    #[cfg(feature = "tracing")]
    let result = span.in_scope(run);
    #[cfg(not(feature = "tracing"))]
    let result = run();
    let outcome = match &result {
        Ok(value) => value.outcome(op),
        Err(err) => error_outcome(err),
    };
    #[cfg(feature = "tracing")]
    {
        span.record("outcome", outcome);
        if let Ok(value) = &result
            && let Some((attempt, token)) = value.ticket()
        {
            span.record("attempt", attempt);
            span.record("fencing_token", token);
            if outcome == "takeover" {
                let _entered = span.enter();
                tracing::info!(
                    attempt,
                    fencing_token = token,
                    "took over a claim whose lease ran out"
                );
            }
        }
    }
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("dedupe_operations_total", "operation" => op, "outcome" => outcome)
            .increment(1);
        if op.starts_with("claim") {
            metrics::counter!("dedupe_claims_total", "outcome" => outcome).increment(1);
        }
        metrics::histogram!("dedupe_operation_duration_seconds", "operation" => op)
            .record(started.elapsed().as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = started;
    result
}

/// Without `tracing` or `metrics`: runs the operation, nothing else.
#[cfg(not(any(feature = "tracing", feature = "metrics")))]
#[inline(always)]
pub(crate) fn operation<T: Outcome>(
    _op: &'static str,
    _key: Option<(u64, &[u8])>,
    run: impl FnOnce() -> crate::Result<T>,
) -> crate::Result<T> {
    run()
}

/// One group commit: how many callers' operations it carried, whether it was durable, whether
/// it succeeded, how many records the store holds after it, how many keys wait in the journal,
/// and, once they have been counted, how many claims are in progress.
#[inline]
pub(crate) fn commit(
    operations: usize,
    durable: bool,
    ok: bool,
    keys_held: u64,
    backlog: usize,
    in_progress: Option<u64>,
) {
    // Each feature reads some of these; none reads all.
    let _ = (operations, durable, ok, keys_held, backlog, in_progress);
    #[cfg(feature = "tracing")]
    tracing::debug!(
        target: "dedupe_store::commit",
        operations,
        durable,
        ok,
        "commit"
    );
    #[cfg(feature = "metrics")]
    {
        let result = if ok { "ok" } else { "failed" };
        metrics::counter!("dedupe_commits_total", "result" => result).increment(1);
        if ok {
            metrics::histogram!("dedupe_commit_batch_size").record(operations as f64);
            metrics::gauge!("dedupe_keys").set(keys_held as f64);
            metrics::gauge!("dedupe_journal_backlog_keys").set(backlog as f64);
            if let Some(in_progress) = in_progress {
                metrics::gauge!("dedupe_in_progress_keys").set(in_progress as f64);
            }
        }
    }
}

/// One fsync of the store file, and how long it took.
#[inline]
pub(crate) fn fsync(took: std::time::Duration) {
    #[cfg(feature = "tracing")]
    tracing::trace!(
        target: "dedupe_store::commit",
        micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        "fsync"
    );
    #[cfg(feature = "metrics")]
    metrics::histogram!("dedupe_fsync_duration_seconds").record(took.as_secs_f64());
    #[cfg(not(any(feature = "tracing", feature = "metrics")))]
    let _ = took;
}

/// The store reopened its file after a failed commit.
#[inline]
pub(crate) fn reopened() {
    #[cfg(feature = "tracing")]
    tracing::warn!(
        target: "dedupe_store::commit",
        "reopened the store file after a failed commit"
    );
    #[cfg(feature = "metrics")]
    metrics::counter!("dedupe_reopens_total").increment(1);
}

/// A sweep batch removed `removed` expired records; `more` says whether more are due.
#[inline]
pub(crate) fn swept(removed: usize, more: bool) {
    let _ = (removed, more);
    #[cfg(feature = "tracing")]
    if removed > 0 {
        tracing::debug!(target: "dedupe_store::sweep", removed, more, "swept expired records");
    }
    #[cfg(feature = "metrics")]
    metrics::counter!("dedupe_swept_total").increment(removed as u64);
}

/// The gauges read by [`Store::stats`](crate::Store::stats): live keys, expired ones awaiting
/// the sweeper, and claims in progress.
#[cfg(feature = "metrics")]
pub(crate) fn key_gauges(live: u64, expired_pending: u64, in_progress: u64) {
    metrics::gauge!("dedupe_live_keys").set(live as f64);
    metrics::gauge!("dedupe_expired_pending_keys").set(expired_pending as f64);
    metrics::gauge!("dedupe_in_progress_keys").set(in_progress as f64);
}

/// One request through the HTTP layer: its span and, when it is answered, its outcome,
/// status and latency, labelled by route template.
#[cfg(all(feature = "http", any(feature = "tracing", feature = "metrics")))]
pub(crate) struct HttpRequest {
    route: String,
    started: Instant,
    #[cfg(feature = "tracing")]
    span: tracing::Span,
}

#[cfg(all(feature = "http", any(feature = "tracing", feature = "metrics")))]
impl HttpRequest {
    pub(crate) fn start(route: String) -> HttpRequest {
        HttpRequest {
            #[cfg(feature = "tracing")]
            span: tracing::info_span!(
                "dedupe_http",
                route = route.as_str(),
                outcome = tracing::field::Empty,
                status = tracing::field::Empty,
            ),
            route,
            started: Instant::now(),
        }
    }

    #[cfg(feature = "tracing")]
    pub(crate) fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    pub(crate) fn finish(self, outcome: &'static str, status: u16) {
        // Only the span shows the status.
        let _ = status;
        #[cfg(feature = "tracing")]
        {
            self.span.record("outcome", outcome);
            self.span.record("status", status);
        }
        #[cfg(feature = "metrics")]
        {
            metrics::counter!(
                "dedupe_http_requests_total",
                "route" => self.route.clone(),
                "outcome" => outcome,
            )
            .increment(1);
            metrics::histogram!("dedupe_http_request_duration_seconds", "route" => self.route)
                .record(self.started.elapsed().as_secs_f64());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (self.route, self.started);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hashes_are_stable_short_and_keyed_by_the_store() {
        assert_eq!(key_hash(7, b"order-1001"), key_hash(7, b"order-1001"));
        assert_eq!(key_hash(7, b"order-1001").len(), 8);
        assert_ne!(key_hash(7, b"order-1001"), key_hash(7, b"order-1002"));
        assert_ne!(key_hash(7, b"order-1001"), key_hash(8, b"order-1001"));
    }
}
