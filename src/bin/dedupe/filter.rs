//! `dedupe filter`: the dedupe set as a pipeline stage. Ids come in on stdin, one per line;
//! the ones not seen before (within their TTL) go out on stdout, in the order they came.
//!
//! A thread reads stdin ahead, so that the lines that arrived while a batch was committed form
//! the next batch: a fast producer gets large batches (one commit each, through
//! `mark_seen_many`), a slow one gets each line passed on at once. A batch's new ids are
//! printed only once its commit returned, so an id is never passed on unmarked.

use std::io::{self, BufRead, Write};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::thread;

use dedupe_store::MAX_KEY_LEN;

use crate::args::FilterArgs;
use crate::failure::{Failure, IO_ERROR, MISMATCH};
use crate::open::StoreFile;
use crate::values;

/// One line of stdin, without its line end, and its number (from 1).
struct Line {
    number: u64,
    text: Vec<u8>,
}

/// Marks the ids read from stdin and prints the new ones; returns the exit status.
pub fn filter(file: &StoreFile, args: &FilterArgs, hex: bool) -> Result<u8, Failure> {
    let batch = usize::try_from(args.batch).unwrap_or(usize::MAX);
    let lines = read_ahead(batch);
    let mut stdout = io::stdout().lock();
    loop {
        // Wait for one line, then take whatever else is already waiting.
        let mut taken = match lines.recv() {
            Ok(line) => vec![line?],
            Err(_) => return Ok(0),
        };
        let mut end = false;
        while taken.len() < batch {
            match lines.try_recv() {
                Ok(line) => taken.push(line?),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    end = true;
                    break;
                }
            }
        }
        // The ids up to the first bad line are handled; the bad line stops the filter.
        let mut keys = Vec::with_capacity(taken.len());
        let mut bad = None;
        for line in taken.into_iter().filter(|line| !line.text.is_empty()) {
            match id(&line, hex) {
                Ok(key) => keys.push((key, line.text)),
                Err(why) => {
                    bad = Some(Failure::new(
                        MISMATCH,
                        format!(
                            "line {} is not a valid id: {why}; the lines before it were handled",
                            line.number
                        ),
                    ));
                    break;
                }
            }
        }
        if !keys.is_empty() {
            let firsts = file
                .with("cannot mark the ids read", |store| {
                    store.mark_seen_many_with_ttl(keys.iter().map(|(key, _)| key), args.ttl)
                })
                .map_err(|failure| failure.store_code(IO_ERROR))?;
            let mut out = Vec::new();
            for ((_, text), first) in keys.iter().zip(firsts) {
                if first {
                    out.extend_from_slice(text);
                    out.push(b'\n');
                }
            }
            stdout
                .write_all(&out)
                .and_then(|()| stdout.flush())
                .map_err(|err| {
                    Failure::new(
                        IO_ERROR,
                        format!(
                            "cannot write to stdout ({err}); the new ids of the last batch were \
                         marked but may not all have been passed on"
                        ),
                    )
                })?;
        }
        if let Some(failure) = bad {
            return Err(failure);
        }
        if end {
            return Ok(0);
        }
    }
}

/// The key a line stands for.
fn id(line: &Line, hex: bool) -> Result<Vec<u8>, String> {
    let key = if hex {
        let text = std::str::from_utf8(&line.text).map_err(|_| "it is not hex".to_string())?;
        values::decode_hex(text)?
    } else {
        line.text.clone()
    };
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "it is {} bytes long, over the limit of {MAX_KEY_LEN}",
            key.len()
        ));
    }
    Ok(key)
}

/// Reads stdin on a thread, a line at a time, up to two batches ahead.
fn read_ahead(batch: usize) -> Receiver<Result<Line, Failure>> {
    let (sender, receiver) = mpsc::sync_channel(batch.saturating_mul(2));
    let spawned = thread::Builder::new()
        .name("dedupe-filter-stdin".to_string())
        .spawn({
            let sender = sender.clone();
            move || {
                let mut stdin = io::stdin().lock();
                let mut number = 0;
                loop {
                    let mut text = Vec::new();
                    match stdin.read_until(b'\n', &mut text) {
                        Ok(0) => return,
                        Ok(_) => {
                            number += 1;
                            if text.last() == Some(&b'\n') {
                                text.pop();
                                if text.last() == Some(&b'\r') {
                                    text.pop();
                                }
                            }
                            if sender.send(Ok(Line { number, text })).is_err() {
                                return;
                            }
                        }
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                        Err(err) => {
                            let _ = sender.send(Err(Failure::new(
                                IO_ERROR,
                                format!("cannot read stdin after line {number}: {err}"),
                            )));
                            return;
                        }
                    }
                }
            }
        });
    if let Err(err) = spawned {
        let _ = sender.send(Err(Failure::new(
            IO_ERROR,
            format!("cannot start reading stdin: {err}"),
        )));
    }
    receiver
}
