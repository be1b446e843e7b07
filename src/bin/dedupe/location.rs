//! Where the store lives: a file (the default), or, in a dedupe built with feature `postgres`,
//! a PostgreSQL database that `--db postgres://...` names, shared by every process and host
//! that uses it (docs/POSTGRES.md).

use std::path::{Path, PathBuf};

use clap::Args;

use crate::failure::Failure;

/// The PostgreSQL options (they apply only when `--db` is a `postgres://` URL).
#[derive(Debug, Args)]
pub struct PgArgs {
    /// With a postgres:// --db: the PostgreSQL schema the store's tables live in (created on
    /// first use). Stores in different schemas share nothing. Ignored for a store file.
    #[arg(
        long,
        global = true,
        env = "DEDUPE_PG_SCHEMA",
        default_value = "dedupe",
        value_name = "NAME"
    )]
    pub pg_schema: String,
}

/// The store `--db` names.
#[derive(Debug, Clone)]
pub enum Location {
    /// A store file.
    File(PathBuf),
    /// A PostgreSQL database: its URL and the schema of the store's tables.
    #[cfg(feature = "postgres")]
    Postgres {
        /// The connection URL, as given (it may hold a password: never print it as is).
        url: String,
        /// The schema (`--pg-schema`).
        schema: String,
    },
}

impl Location {
    /// The store `db` names: a PostgreSQL database for a `postgres://` or `postgresql://`
    /// URL, else a file.
    ///
    /// # Errors
    /// A usage error for a URL when dedupe was built without PostgreSQL support.
    pub fn new(db: PathBuf, pg: PgArgs) -> Result<Location, Failure> {
        let Some(url) = db.to_str().filter(|db| is_postgres_url(db)) else {
            return Ok(Location::File(db));
        };
        #[cfg(feature = "postgres")]
        {
            Ok(Location::Postgres {
                url: url.to_string(),
                schema: pg.pg_schema,
            })
        }
        #[cfg(not(feature = "postgres"))]
        {
            let _ = pg;
            Err(Failure::new(
                crate::failure::USAGE,
                format!(
                    "--db {} is a PostgreSQL URL, but this dedupe was built without PostgreSQL \
                     support; build it with `--features cli,postgres`, or give a store file",
                    redacted(url)
                ),
            ))
        }
    }

    /// The store file, if the store is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Location::File(path) => Some(path),
            #[cfg(feature = "postgres")]
            Location::Postgres { .. } => None,
        }
    }

    /// The store as messages name it: the file's path, or the URL with any password hidden.
    pub fn name(&self) -> String {
        match self {
            Location::File(path) => path.display().to_string(),
            #[cfg(feature = "postgres")]
            Location::Postgres { url, .. } => redacted(url),
        }
    }
}

/// Whether `db` is a PostgreSQL URL rather than a file name.
fn is_postgres_url(db: &str) -> bool {
    let lower = db.to_ascii_lowercase();
    lower.starts_with("postgres://") || lower.starts_with("postgresql://")
}

/// `url` with the password, in the user part or as a `password=` parameter, replaced by `***`,
/// so that a message or a metrics label never shows it.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<&str> = query
                .split('&')
                .map(|pair| {
                    if pair.to_ascii_lowercase().starts_with("password=") {
                        "password=***"
                    } else {
                        pair
                    }
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_files() {
        for url in [
            "postgres://h/db",
            "postgresql://u@h/db",
            "POSTGRES://h",
            "postgres://",
        ] {
            assert!(is_postgres_url(url), "{url}");
        }
        for file in [
            "dedupe.redb",
            "./postgres://x",
            "/tmp/postgres",
            "postgres:/h",
        ] {
            assert!(!is_postgres_url(file), "{file}");
        }
    }

    #[test]
    fn a_url_is_a_database_only_with_the_feature() {
        let pg = || PgArgs {
            pg_schema: "dedupe".to_string(),
        };
        let file = Location::new("postgres.redb".into(), pg());
        assert!(matches!(file, Ok(Location::File(_))));
        let url = Location::new("postgres://app:s3cret@db/jobs".into(), pg());
        #[cfg(feature = "postgres")]
        assert!(matches!(url, Ok(Location::Postgres { .. })));
        #[cfg(not(feature = "postgres"))]
        match url {
            Err(failure) => {
                assert_eq!(failure.code, crate::failure::USAGE);
                assert!(failure.message.contains("--features cli,postgres"));
                assert!(!failure.message.contains("s3cret"));
            }
            Ok(location) => panic!("a URL without the feature gave {location:?}"),
        }
    }

    #[test]
    fn passwords_never_reach_a_message() {
        let cases = [
            (
                "postgres://app:s3cret@db:5432/jobs",
                "postgres://app:***@db:5432/jobs",
            ),
            ("postgres://app@db/jobs", "postgres://app@db/jobs"),
            (
                "postgresql://db/jobs?user=app&password=s3cret&sslmode=disable",
                "postgresql://db/jobs?user=app&password=***&sslmode=disable",
            ),
            (
                "postgres://a:b@h?password=c",
                "postgres://a:***@h?password=***",
            ),
            ("postgres://h", "postgres://h"),
        ];
        for (url, shown) in cases {
            assert_eq!(redacted(url), shown);
        }
    }
}
