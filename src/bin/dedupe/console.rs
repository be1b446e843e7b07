//! Writing to our stdout and stderr without panicking: `println!` panics when stdout is a
//! closed pipe (`dedupe list | head -1`), and dedupe must never die halfway through a run for
//! that reason.

use std::io::{self, Write};

/// Writes bytes to stdout. A closed or failing stdout is ignored: the reader went away, and
/// nothing dedupe does afterwards should depend on it.
pub fn out(bytes: &[u8]) {
    let mut stdout = io::stdout().lock();
    let _ = stdout.write_all(bytes).and_then(|()| stdout.flush());
}

/// Writes bytes to stderr, ignoring failures as [`out`] does.
pub fn err_bytes(bytes: &[u8]) {
    let mut stderr = io::stderr().lock();
    let _ = stderr.write_all(bytes).and_then(|()| stderr.flush());
}

/// One line from dedupe itself on stderr, prefixed with `dedupe: `.
pub fn say(line: &str) {
    err_bytes(format!("dedupe: {line}\n").as_bytes());
}
