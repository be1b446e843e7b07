//! An operation on its way through an engine: the engine batches operations of every kind
//! together as [`Queued`] ones, and each leaves its typed answer in its own slot, which its
//! caller takes once the commit that holds it has returned.

use parking_lot::Mutex;

use std::sync::Arc;

use super::{Change, Context, Decision, Namespace, Rule, apply, tally};
use crate::error::{Error, Result};
use crate::key::Key;
use crate::record::Record;
use crate::stats::Tally;

/// A group of operations, each with its answer slot, and the same as a batch holds them.
pub(crate) type Group<R> = (Vec<Arc<Pending<R>>>, Vec<Arc<dyn Queued>>);

/// One operation of kind `R` on one key, and the slot for its answer.
pub(crate) struct Pending<R: Rule> {
    key: Key,
    rule: R,
    answer: Mutex<Option<Result<R::Answer>>>,
}

impl<R: Rule> Pending<R> {
    pub(crate) fn new(key: Key, rule: R) -> Pending<R> {
        Pending {
            key,
            rule,
            answer: Mutex::new(None),
        }
    }

    /// The answer, once the engine's commit returned successfully. A batch whose leader
    /// panicked is answered [`Error::CommitPanicked`] by the batcher before any caller gets
    /// here, so an empty slot is only ever that case.
    pub(crate) fn take(&self) -> Result<R::Answer> {
        self.answer
            .lock()
            .take()
            .unwrap_or(Err(Error::CommitPanicked))
    }

    /// Keeps the decision's answer in the slot; what the engine is to do with the rest.
    fn keep(&self, decision: Decision<R::Answer>) -> Effect {
        let tally = tally::<R>(&decision.answer);
        let refused = decision.answer.as_ref().err().cloned();
        *self.answer.lock() = Some(decision.answer);
        Effect {
            change: decision.change,
            issued_token: decision.issued_token,
            tally,
            refused,
        }
    }

    /// Operations for one group commit, and the same as the batch holds them.
    pub(crate) fn group(ops: Vec<(Key, R)>) -> Group<R> {
        let pending: Vec<Arc<Pending<R>>> = ops
            .into_iter()
            .map(|(key, rule)| Arc::new(Pending::new(key, rule)))
            .collect();
        let queued = pending
            .iter()
            .map(|pending| pending.clone() as Arc<dyn Queued>)
            .collect();
        (pending, queued)
    }
}

/// What deciding a queued operation asks of its engine.
pub(crate) struct Effect {
    pub change: Change,
    /// Whether the operation used `Context::next_token`.
    pub issued_token: bool,
    /// What the counters count, once the commit holds.
    pub tally: Tally,
    /// The refusal, if the rules refused: a group of operations is then refused as a whole.
    pub refused: Option<Error>,
}

/// A [`Pending`] operation of any kind, as an engine's batch holds it.
pub(crate) trait Queued: Send + Sync {
    fn key(&self) -> &Key;
    fn namespace(&self) -> Namespace;
    fn payload_len(&self) -> usize;
    /// [`Rule::CREATES`] of the operation.
    fn creates(&self) -> bool;
    /// Decides the operation against the key's stored record, keeping the answer.
    fn apply(&self, current: Option<&Record>, ctx: &Context<'_>) -> Effect;
    /// Decides the operation on a key whose stored record cannot be read.
    fn damaged(&self, reason: &str) -> Effect;
}

impl<R: Rule> Queued for Pending<R> {
    fn key(&self) -> &Key {
        &self.key
    }

    fn namespace(&self) -> Namespace {
        self.rule.namespace()
    }

    fn payload_len(&self) -> usize {
        self.rule.payload_len()
    }

    fn creates(&self) -> bool {
        R::CREATES
    }

    fn apply(&self, current: Option<&Record>, ctx: &Context<'_>) -> Effect {
        self.keep(apply(&self.rule, current, ctx))
    }

    fn damaged(&self, reason: &str) -> Effect {
        self.keep(self.rule.damaged(&self.key, reason))
    }
}
