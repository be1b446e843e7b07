//! tokio-postgres errors as the crate's [`Error::Database`], classified by SQLSTATE so that a
//! caller can tell a lost connection from a refused login or a missing privilege.

use std::error::Error as _;
use std::io;
use std::sync::Arc;

use tokio_postgres::error::SqlState;

use crate::error::{DatabaseErrorKind, Error};

/// An error met while establishing a connection: an I/O failure there means the server could
/// not be reached.
pub(crate) fn connect_error(err: tokio_postgres::Error) -> Error {
    let kind = match classify(&err) {
        Some(kind) => kind,
        None if refused_by_the_client(&err) => DatabaseErrorKind::Authentication,
        None if io_cause(&err).is_some() || err.as_db_error().is_none() => {
            DatabaseErrorKind::Connect
        }
        None => DatabaseErrorKind::Other,
    };
    database_error("connect to the database", kind, err)
}

/// An error met while `action` ran on an established connection: an I/O failure there means
/// the connection was lost.
pub(crate) fn query_error(action: &'static str, err: tokio_postgres::Error) -> Error {
    let kind = match classify(&err) {
        Some(kind) => kind,
        None if err.is_closed() || io_cause(&err).is_some() => DatabaseErrorKind::ConnectionLost,
        None => DatabaseErrorKind::Other,
    };
    database_error(action, kind, err)
}

/// The kind an SQLSTATE says, when it says one.
fn classify(err: &tokio_postgres::Error) -> Option<DatabaseErrorKind> {
    let code = err.code()?;
    let kind = if *code == SqlState::INVALID_PASSWORD
        || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    {
        DatabaseErrorKind::Authentication
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        DatabaseErrorKind::Permission
    } else if *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || code.code().starts_with("08")
    {
        DatabaseErrorKind::ConnectionLost
    } else if *code == SqlState::CANNOT_CONNECT_NOW
        || *code == SqlState::TOO_MANY_CONNECTIONS
        || *code == SqlState::INVALID_CATALOG_NAME
    {
        DatabaseErrorKind::Connect
    } else {
        return None;
    };
    Some(kind)
}

/// Whether the client itself gave up on authenticating: the server asked for a password the
/// URL does not have, or for a method the client will not use. tokio-postgres does not expose
/// its error kinds, only their text; `tests/postgres_connect.rs` checks that the text still
/// reads so.
fn refused_by_the_client(err: &tokio_postgres::Error) -> bool {
    err.to_string() == "authentication error"
        || err
            .source()
            .is_some_and(|cause| cause.to_string() == "password missing")
}

/// The I/O error under `err`, if any.
fn io_cause(err: &tokio_postgres::Error) -> Option<&io::Error> {
    let mut cause = err.source();
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cause = current.source();
    }
    None
}

fn database_error(
    action: &'static str,
    kind: DatabaseErrorKind,
    err: tokio_postgres::Error,
) -> Error {
    // The server's own message when it sent one; otherwise the client's, with its cause
    // ("error connecting to server: Connection refused").
    let message = match err.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match err.source() {
            Some(cause) => format!("{err}: {cause}"),
            None => err.to_string(),
        },
    };
    Error::Database {
        action,
        kind,
        message,
        source: Some(Arc::new(err)),
    }
}
