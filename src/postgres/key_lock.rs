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
