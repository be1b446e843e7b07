//! The readers, `get`, `list`, `stats` and `verify`: a table for people by default, JSON for
//! programs with `--json`. The JSON fields are documented in the README ("The dedupe command")
//! and are kept stable: new fields may appear, existing ones keep their name and meaning.

use std::fmt::Write as _;

use dedupe_store::{Entry, EntryState, FORMAT_VERSION};
use serde_json::{Value, json};

use crate::args::{GetArgs, JsonArgs, ListArgs, StatsArgs};
use crate::console;
use crate::failure::{Failure, STORE_ERROR};
use crate::open::StoreFile;
use crate::outcome::{Ending, RunOutcome};
use crate::run::utc;

/// `dedupe get KEY`.
pub fn get(file: &StoreFile, args: &GetArgs) -> Result<u8, Failure> {
    let doing = format!("cannot read key {}", args.key);
    let entry = file.with(&doing, |store| store.get(args.key.as_bytes()))?;
    if args.json {
        let value = match &entry {
            Some(entry) => entry_json(entry, true),
            None => json!({
                "key": String::from_utf8_lossy(args.key.as_bytes()),
                "key_hex": hex(args.key.as_bytes()),
                "state": "absent",
            }),
        };
        print_json(&value);
        return Ok(0);
    }
    let mut table = Vec::new();
    match &entry {
        None => {
            table.push(("key", key_cell(args.key.as_bytes())));
            table.push((
                "state",
                "absent (never seen, expired or released)".to_string(),
            ));
        }
        Some(entry) => describe(entry, &mut table),
    }
    let width = table.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let mut text = String::new();
    for (name, value) in table {
        let _ = writeln!(text, "{name:width$}  {value}");
    }
    console::out(text.as_bytes());
    Ok(0)
}

/// `dedupe list`.
pub fn list(file: &StoreFile, args: &ListArgs) -> Result<u8, Failure> {
    // One more than asked tells whether the listing was cut.
    let wanted = args.limit.saturating_add(1);
    let mut entries = file.with("cannot list keys", |store| {
        store.list(args.prefix.as_bytes(), wanted)
    })?;
    let truncated = entries.len() > args.limit;
    entries.truncate(args.limit);
    if args.json {
        let entries: Vec<Value> = entries
            .iter()
            .map(|entry| entry_json(entry, false))
            .collect();
        print_json(&json!({ "entries": entries, "truncated": truncated }));
        return Ok(0);
    }
    let rows: Vec<[String; 5]> = entries
        .iter()
        .map(|entry| {
            [
                key_cell(entry.key.as_bytes()),
                state_name(entry).replace('_', " "),
                entry.attempt.to_string(),
                run_status(entry),
                utc(entry.expires_at),
            ]
        })
        .collect();
    let header = ["KEY", "STATE", "ATTEMPT", "STATUS", "EXPIRES"].map(String::from);
    let mut widths = header.clone().map(|title| title.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        let _ = writeln!(text, "{}", cells.join("  ").trim_end());
    }
    console::out(text.as_bytes());
    if truncated {
        console::say(&format!(
            "only the first {} keys are shown; raise --limit or narrow --prefix",
            args.limit
        ));
    }
    Ok(0)
}

/// `dedupe stats`.
pub fn stats(file: &StoreFile, args: &StatsArgs) -> Result<u8, Failure> {
    let stats = file.with("cannot read the store's statistics", |store| store.stats())?;
    // A store on PostgreSQL has no file: its size is 0.
    let file_bytes = file
        .path()
        .and_then(|path| std::fs::metadata(path).ok())
        .map_or(0, |meta| meta.len());
    let db = file.name();
    if args.json {
        print_json(&json!({
            "db": db,
            "file_bytes": file_bytes,
            "live_keys": stats.live_keys,
            "expired_pending": stats.expired_pending,
            "format_version": FORMAT_VERSION,
        }));
        return Ok(0);
    }
    if args.prometheus {
        console::out(prometheus_text(&db, file_bytes, &stats).as_bytes());
        return Ok(0);
    }
    // The file's size and format mean nothing for a store on PostgreSQL: the table leaves
    // them out (the JSON and Prometheus outputs keep their fields, the size as 0).
    let (size, format) = match file.path() {
        Some(_) => (
            format!("file bytes       {file_bytes}\n"),
            format!("format version   {FORMAT_VERSION}\n"),
        ),
        None => (String::new(), String::new()),
    };
    let text = format!(
        "db               {db}\n{size}live keys        {}\n\
         expired pending  {} (each run removes up to 256, `dedupe sweep` all)\n{format}",
        stats.live_keys, stats.expired_pending
    );
    console::out(text.as_bytes());
    Ok(0)
}

/// `dedupe verify`: exits 0 when the file is sound, 1 when it is not.
pub fn verify(file: &StoreFile, args: &JsonArgs) -> Result<u8, Failure> {
    let db = file.name();
    let checked = file.with("cannot verify the store", |store| store.verify());
    let report = match checked {
        Ok(report) => report,
        Err(failure) if args.json => {
            print_json(&json!({
                "db": db,
                "ok": false,
                "records": null,
                "repaired": null,
                "error": failure.message,
            }));
            return Ok(STORE_ERROR);
        }
        Err(failure) => return Err(failure),
    };
    if args.json {
        print_json(&json!({
            "db": db,
            "ok": true,
            "records": report.records,
            "repaired": report.repaired,
            "error": null,
        }));
    } else {
        let repaired = if report.repaired {
            "; the file had not been closed cleanly, and was checked as redb repairs it (in \
             memory: verify never changes the file)"
        } else {
            ""
        };
        console::out(
            format!("ok: {db}: {} records checked{repaired}\n", report.records).as_bytes(),
        );
    }
    Ok(0)
}

fn print_json(value: &Value) {
    let mut text = value.to_string();
    text.push('\n');
    console::out(text.as_bytes());
}

fn state_name(entry: &Entry) -> &'static str {
    match entry.state {
        EntryState::Completed { .. } => "completed",
        _ => "in_progress",
    }
}

fn key_text(entry: &Entry) -> String {
    String::from_utf8_lossy(entry.key.as_bytes()).into_owned()
}

/// A key in a table: its text, or `0x` and its hex when it is not text.
fn key_cell(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => text.to_string(),
        Err(_) => format!("0x{}", hex(key)),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// A completed key's stored run outcome, if a run stored it.
fn stored_run(entry: &Entry) -> Option<RunOutcome> {
    match &entry.state {
        EntryState::Completed { response, .. } => RunOutcome::decode(response).ok(),
        _ => None,
    }
}

fn run_status(entry: &Entry) -> String {
    match (&entry.state, stored_run(entry)) {
        (_, Some(run)) => run.ending.exit_code().to_string(),
        (EntryState::Completed { response, .. }, None) if response.is_empty() => {
            "marked".to_string()
        }
        (EntryState::Completed { .. }, None) => "-".to_string(),
        _ => "running".to_string(),
    }
}

fn describe(entry: &Entry, table: &mut Vec<(&'static str, String)>) {
    table.push(("key", key_cell(entry.key.as_bytes())));
    table.push(("state", state_name(entry).replace('_', " ")));
    table.push(("attempt", entry.attempt.to_string()));
    table.push(("fencing token", entry.fencing_token.to_string()));
    if let Some(fingerprint) = &entry.fingerprint {
        table.push((
            "fingerprint",
            String::from_utf8_lossy(fingerprint).into_owned(),
        ));
    }
    match &entry.state {
        EntryState::InProgress {
            claimed_at,
            lease_until,
            ..
        } => {
            table.push(("claimed at", utc(*claimed_at)));
            table.push(("lease until", utc(*lease_until)));
        }
        EntryState::Completed {
            completed_at,
            response,
            ..
        } => {
            table.push(("completed at", utc(*completed_at)));
            match RunOutcome::decode(response) {
                Ok(run) => {
                    table.push(("status", run.ending.to_string()));
                    table.push(("stdout", stream_size(&run.stdout, run.stdout_cut)));
                    table.push(("stderr", stream_size(&run.stderr, run.stderr_cut)));
                }
                Err(why) if !response.is_empty() => {
                    table.push(("response", format!("{} bytes ({why})", response.len())));
                }
                Err(_) => table.push(("response", "none (marked)".to_string())),
            }
        }
        _ => {}
    }
    table.push(("expires at", utc(entry.expires_at)));
}

fn stream_size(bytes: &[u8], cut: bool) -> String {
    let cut = if cut { ", cut at capture" } else { "" };
    format!("{} bytes stored{cut}", bytes.len())
}

/// One entry as JSON; `with_output` adds a run's stored stdout and stderr.
fn entry_json(entry: &Entry, with_output: bool) -> Value {
    let mut value = json!({
        "key": key_text(entry),
        "key_hex": hex(entry.key.as_bytes()),
        "state": state_name(entry),
        "attempt": entry.attempt,
        "fencing_token": entry.fencing_token,
        "fingerprint": entry.fingerprint.as_ref().map(|fp| String::from_utf8_lossy(fp).into_owned()),
        "expires_at": entry.expires_at,
        "expires_at_utc": utc(entry.expires_at),
    });
    let fields = match &entry.state {
        EntryState::InProgress {
            claimed_at,
            lease_until,
            ..
        } => json!({
            "claimed_at": claimed_at,
            "lease_until": lease_until,
            "lease_until_utc": utc(*lease_until),
        }),
        EntryState::Completed {
            completed_at,
            response,
            ..
        } => json!({
            "completed_at": completed_at,
            "completed_at_utc": utc(*completed_at),
            "response_bytes": response.len(),
            "run": RunOutcome::decode(response).ok().map(|run| run_json(&run, with_output)),
        }),
        _ => json!({}),
    };
    if let (Value::Object(map), Value::Object(extra)) = (&mut value, fields) {
        map.extend(extra);
    }
    value
}

fn run_json(run: &RunOutcome, with_output: bool) -> Value {
    let (exit_code, signal) = match run.ending {
        Ending::Exited(code) => (Some(code), None),
        Ending::Signalled(signal) => (None, Some(signal)),
    };
    let mut value = json!({
        "status": run.ending.exit_code(),
        "exit_code": exit_code,
        "signal": signal,
        "stdout_bytes": run.stdout.len(),
        "stderr_bytes": run.stderr.len(),
        "stdout_cut": run.stdout_cut,
        "stderr_cut": run.stderr_cut,
    });
    if with_output && let Value::Object(map) = &mut value {
        for (name, bytes) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
            let (text, encoding) = match std::str::from_utf8(bytes) {
                Ok(text) => (text.to_string(), "utf-8"),
                Err(_) => (base64(bytes), "base64"),
            };
            map.insert(name.into(), text.into());
            map.insert(format!("{name}_encoding"), encoding.into());
        }
    }
    value
}

/// `bytes` in standard base64 (RFC 4648, with padding), for output that is not UTF-8.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let word = chunk.iter().enumerate().fold(0u32, |word, (at, &byte)| {
            word | u32::from(byte) << (16 - 8 * at)
        });
        for at in 0..4 {
            if at <= chunk.len() {
                let index = (word >> (18 - 6 * at)) & 0x3f;
                text.push(char::from(ALPHABET[index as usize]));
            } else {
                text.push('=');
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_rfc_4648() {
        for (bytes, text) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
            (&[0xff, 0xfe, 0x00], "//4A"),
        ] {
            assert_eq!(base64(bytes), text);
        }
    }
}

/// The store's gauges in the Prometheus text exposition format, labelled by the store file. A
/// dedupe process opens the store for a moment, so counters since open would always read zero:
/// only what the file holds is reported. The names match the library's `metrics` gauges.
fn prometheus_text(db: &str, file_bytes: u64, stats: &dedupe_store::Stats) -> String {
    let db = db
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    let gauges = [
        (
            "dedupe_live_keys",
            "Keys whose records have not expired.",
            stats.live_keys,
        ),
        (
            "dedupe_expired_pending_keys",
            "Expired records the sweeper has not removed yet.",
            stats.expired_pending,
        ),
        (
            "dedupe_keys",
            "Records the store holds, live or awaiting the sweeper.",
            stats.live_keys + stats.expired_pending,
        ),
        (
            "dedupe_file_bytes",
            "Size of the store file in bytes.",
            file_bytes,
        ),
        (
            "dedupe_format_version",
            "The store file's format version.",
            u64::from(FORMAT_VERSION),
        ),
    ];
    let mut text = String::new();
    for (name, help, value) in gauges {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{db=\"{db}\"}} {value}\n"
        ));
    }
    text
}

#[cfg(test)]
mod prometheus_tests {
    use super::*;

    #[test]
    fn the_store_file_label_is_escaped() {
        let stats = dedupe_store::Stats::default();
        let text = prometheus_text("/var/lib/a \"b\"\\c.redb", 42, &stats);
        assert!(
            text.contains("dedupe_file_bytes{db=\"/var/lib/a \\\"b\\\"\\\\c.redb\"} 42\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE dedupe_live_keys gauge\n"));
    }
}
