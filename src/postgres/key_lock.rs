//! The lock every fencing token of a key is drawn under, in every process.
//!
//! A token drawn for a key with no row must end up above the token of every earlier owner of
//! that key (`docs/SEMANTICS.md` §5). Drawing it in the very statement that inserts the row is
//! not enough: the draw comes before the insert's check for the key, and in between another
//! process may claim the key with a later, larger token and give it up again (a release, an
//! expire: the row is removed), after which the insert finds the key free and stores the
//! smaller token. A backend descheduled between the two, or waiting on a row another
//! transaction is inserting, leaves that window open for as long as it likes.
//!
//! So every statement that draws a token for a key first takes a transaction-level advisory
//! lock on the key (`pg_advisory_xact_lock`), held until its transaction ends: draws for one
//! key are then one after another, each with the row of the one before committed, and a token
//! drawn later is larger. Reads, completes and removals take no such lock.
//!
//! The lock's id is FNV-1a (64 bits) of the schema's name, then the namespace tag as two
//! bytes, big-endian, then the key's bytes, as a signed `bigint`; several keys are locked in
//! ascending id, so that two transactions never wait for each other in a cycle. Two keys
//! with one id only wait for each other. `docs/POSTGRES.md` gives the rule to other programs
//! that write the table.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The start of every key's lock id in the schema named `schema` (unquoted).
pub(crate) fn seed(schema: &str) -> u64 {
    fnv(FNV_OFFSET, schema.as_bytes())
}

/// The advisory lock id of the key `key` in namespace `ns`, given its schema's [`seed`].
pub(crate) fn id(seed: u64, ns: i16, key: &[u8]) -> i64 {
    let hash = fnv(fnv(seed, &ns.to_be_bytes()), key);
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// The lock ids of `keys`, ascending and each once: the order a statement takes them in.
pub(crate) fn ids<'a>(seed: u64, keys: impl IntoIterator<Item = (i16, &'a [u8])>) -> Vec<i64> {
    let mut ids: Vec<i64> = keys
        .into_iter()
        .map(|(ns, key)| id(seed, ns, key))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Other processes, of this build or a later one, must find the same lock for a key: the
    /// id is a fixed function of the schema, namespace and key, not of the process.
    #[test]
    fn a_keys_lock_id_is_fixed_by_its_schema_namespace_and_key() {
        let dedupe = seed("dedupe");
        // FNV-1a 64 of "dedupe", 0x00 0x01, "order-1", as a signed 64-bit integer.
        assert_eq!(id(dedupe, 1, b"order-1"), -2_749_561_712_760_262_287);
        assert_ne!(id(dedupe, 1, b"order-1"), id(dedupe, 2, b"order-1"));
        assert_ne!(id(dedupe, 1, b"order-1"), id(seed("other"), 1, b"order-1"));
        assert_eq!(
            ids(dedupe, [(1, &b"b"[..]), (1, &b"a"[..]), (1, &b"b"[..])]),
            {
                let mut two = vec![id(dedupe, 1, b"a"), id(dedupe, 1, b"b")];
                two.sort_unstable();
                two
            },
            "ascending, each once"
        );
    }
}

#[cfg(all(test, feature = "testing"))]
mod races {
    use super::{id, seed};
    use crate::testing::postgres::{Probe, TestCluster};
    use crate::{Claim, Store};
    use std::time::Instant;

    /// Another process's whole ownership of a key (a claim, a takeover with a larger token, a
    /// release that removes the row), made while this store's claim of the key is under way,
    /// must not leave the claim with a smaller token than that owner's: in each of the three
    /// ways a claim of a free key is stored (alone, by a batch's first `INSERT`, by a batch's
    /// transaction). The claim is held up by the other process's lock of the key (or, were the
    /// lock missing, by its uncommitted row) while that process draws its larger token.
    #[test]
    fn a_claim_racing_a_whole_ownership_elsewhere_gets_a_larger_token() -> crate::Result<()> {
        let Some(cluster) = TestCluster::start() else {
            return Ok(());
        };
        let ns = crate::postgres::row::ns(crate::rules::Namespace::Idempotency);
        let lock = id(seed("dedupe"), ns, b"raced");
        for (way, budget, queued) in [
            ("raced_alone", None, false),
            ("raced_fresh", None, true),
            ("raced_commit", Some(1_000), true),
        ] {
            let url = cluster.create_database(way);
            let mut builder = Store::builder().without_sweeper().postgres_connections(2);
            if let Some(budget) = budget {
                builder = builder.max_keys(budget);
            }
            let store = builder.open_postgres(&url)?;
            let crate::engine::Engine::Postgres(engine) = store.engine() else {
                panic!("a store opened on PostgreSQL has the PostgreSQL engine");
            };
            // The other process: one connection, which keeps its transaction between calls.
            let other = Probe::new(&url, 1)?;
            // A connection outside it: a transaction sees `pg_stat_activity` as it first read it.
            let watcher = Probe::new(&url, 1)?;
            other.execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({lock}); \
                 INSERT INTO dedupe.records (ns, key, state, fencing_token, attempt, expires_at) \
                 VALUES ({ns}, 'raced', 1, nextval('dedupe.tokens'), 1, 9000000000000000)"
            ))?;
            // Past the limit, the claim joins the group commit.
            let in_flight: Vec<_> = (0..if queued { 3 } else { 0 })
                .map(|_| engine.enter())
                .collect();
            let (claimed, theirs) = std::thread::scope(|scope| -> crate::Result<_> {
                let claiming = scope.spawn(|| store.claim("raced"));
                let deadline = Instant::now() + std::time::Duration::from_secs(20);
                while watcher.query_text(
                    "SELECT count(*) > 0 FROM pg_stat_activity \
                     WHERE wait_event_type = 'Lock' AND datname = current_database()",
                )? != "true"
                {
                    assert!(Instant::now() < deadline, "{way}: the claim never waited");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other.execute(
                    "UPDATE dedupe.records SET fencing_token = nextval('dedupe.tokens') \
                     WHERE key = 'raced'",
                )?;
                let theirs = other
                    .query_text("SELECT fencing_token FROM dedupe.records WHERE key = 'raced'")?;
                other.execute("DELETE FROM dedupe.records WHERE key = 'raced'; COMMIT")?;
                let claimed = claiming.join().expect("the claim panicked")?;
                Ok((claimed, theirs))
            })?;
            drop(in_flight);
            let theirs: u64 = theirs.parse().expect("a token is a number");
            let Claim::Acquired(ticket) = claimed else {
                panic!("{way}: the key was free again, so the claim acquires it: {claimed:?}");
            };
            assert!(
                ticket.fencing_token() > theirs,
                "{way}: the claim got token {}, below the earlier owner's {theirs}",
                ticket.fencing_token()
            );
        }
        Ok(())
    }
}
