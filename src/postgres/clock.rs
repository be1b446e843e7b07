//! The database's clock, for statements that must agree on one time across every process that
//! shares the database.

/// The server's current time in milliseconds since the Unix epoch, as an SQL expression.
/// `clock_timestamp()` rather than `now()`: `now()` is frozen at the start of the transaction,
/// and a transaction that waited on a lock must not decide with a stale time. `date_part`
/// rather than `extract`, which computes in `numeric`: a `double` holds today's milliseconds
/// exactly and costs every read of a key less.
pub(crate) const NOW_MILLIS: &str = "(date_part('epoch', clock_timestamp()) * 1000)::bigint";
