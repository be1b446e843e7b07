//! What a store's file holds, read past the public API: every record, expired ones included,
//! and the last fencing token issued. The public API cannot show an expired record that the
//! sweeper has not removed yet, which a clock jumping back makes live again, so the runner
//! compares this against its model.

use std::collections::BTreeMap;

use redb::ReadableTable;

use crate::record::RecordState;
use crate::{Error, Key, Store};

use super::model::{Rec, RecCheckpoint, RecState};

/// Every record in the file by caller key, and the last token issued.
pub(super) fn raw_state(store: &Store) -> crate::Result<(BTreeMap<Vec<u8>, Rec>, u64)> {
    let storage = &store.engine().storage;
    let records =
        storage.read_merged(&[], |txn, pending| {
            let table = txn.open_table(crate::redb::schema::RECORDS)?;
            let mut latest = BTreeMap::new();
            for row in table.iter()? {
                let (stored_key, value) = row?;
                let record = crate::redb::codec::decode(stored_key.value(), value.value())
                    .map_err(|err| Error::Corrupt {
                        key: Key::new(stored_key.value().get(1..).unwrap_or_default()),
                        reason: err.0,
                    })?;
                latest.insert(stored_key.value().to_vec(), Some(record));
            }
            // The journal's changes not yet merged into the table take precedence.
            latest.extend(pending.clone());
            let mut records = BTreeMap::new();
            for (stored_key, record) in latest {
                let Some(record) = record else { continue };
                let key = stored_key.get(1..).unwrap_or_default().to_vec();
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
            Ok(records)
        })?;
    Ok((records, storage.last_token()))
}
