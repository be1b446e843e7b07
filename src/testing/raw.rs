//! What a store's file holds, read past the public API: every record, expired ones included,
//! and the last fencing token issued. The public API cannot show an expired record that the
//! sweeper has not removed yet, which a clock jumping back makes live again, so the runner
//! compares this against its model.

use std::collections::BTreeMap;

use crate::Store;
use crate::record::RecordState;

use super::model::{Rec, RecCheckpoint, RecState};

/// Every record in the file by caller key, and the last token issued.
pub(super) fn raw_state(store: &Store) -> crate::Result<(BTreeMap<Vec<u8>, Rec>, u64)> {
    let (every, last_token) = store.engine().every_record()?;
    let mut records = BTreeMap::new();
    for (_namespace, key, record) in every {
        let key = key.into_bytes();
        let state = match record.state {
            RecordState::InProgress {
                claimed_at,
                lease_until,
                claim_ttl,
                checkpoint,
            } => RecState::InProgress {
                claimed_at,
                lease_until,
                claim_ttl,
                checkpoint: checkpoint.map(|saved| RecCheckpoint {
                    step: saved.step,
                    state: saved.state.0,
                    recorded_at: saved.recorded_at,
                }),
            },
            RecordState::Completed {
                completed_at,
                response,
            } => RecState::Completed {
                completed_at,
                response: response.0,
            },
            RecordState::Sequence { .. } => continue,
        };
        records.insert(
            key,
            Rec {
                token: record.fencing_token,
                attempt: record.attempt,
                fingerprint: record.fingerprint.map(|fp| fp.0),
                expires_at: record.expires_at,
                state,
            },
        );
    }
    Ok((records, last_token))
}
