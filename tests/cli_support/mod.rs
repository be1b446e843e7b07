//! Helpers for `tests/cli.rs`: a scratch store, `dedupe` processes with a time limit, and
//! their output.

use std::error::Error;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub type TestResult = Result<(), Box<dyn Error>>;

/// No test process may outlive this; a hang is a failure, not a stuck CI job.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A scratch directory with a store file in it.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Result<Scratch, Box<dyn Error>> {
        Ok(Scratch {
            dir: tempfile::tempdir()?,
        })
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("store.redb")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `dedupe --db <store> ARGS`, run in the scratch directory.
    pub fn dedupe(&self, args: &[&str]) -> Command {
        let mut command = bare_dedupe(self.dir.path());
        command.arg("--db").arg(self.db()).args(args);
        command
    }

    /// Runs `dedupe ARGS` to the end.
    pub fn run(&self, args: &[&str]) -> Result<Finished, Box<dyn Error>> {
        finish(self.dedupe(args).spawn()?)
    }

    /// `dedupe get KEY --json`, parsed.
    pub fn get(&self, key: &str) -> Result<Value, Box<dyn Error>> {
        let got = self.run(&["get", key, "--json"])?;
        assert_eq!(got.code, Some(0), "get failed: {}", got.stderr);
        Ok(serde_json::from_str(&got.stdout)?)
    }

    /// How many times a CMD that appends a line to `name` ran.
    pub fn count(&self, name: &str) -> usize {
        fs::read_to_string(self.path(name)).map_or(0, |text| text.lines().count())
    }
}

/// `dedupe` with no store chosen and piped output, in `dir`.
pub fn bare_dedupe(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dedupe"));
    command
        .current_dir(dir)
        .env_remove("DEDUPE_DB")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A finished process: its exit code and output.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// dedupe's own lines on stderr.
    pub fn notes(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|line| line.starts_with("dedupe: "))
            .collect()
    }
}

pub fn finish(child: Child) -> Result<Finished, Box<dyn Error>> {
    let (status, output) = finish_raw(child)?;
    let finished = Finished {
        code: status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    // A panic trace reads "thread 'main' panicked at src/...". A store error may name a panic
    // inside redb that the library caught ("the storage engine panicked while ..."): that is
    // a message, not a trace.
    assert!(
        !finished.stderr.contains("panicked at") && !finished.stderr.contains("RUST_BACKTRACE"),
        "dedupe panicked: {}",
        finished.stderr
    );
    Ok(finished)
}

/// Waits for `child` (killing it after [`PATIENCE`]) and collects its output.
pub fn finish_raw(mut child: Child) -> Result<(ExitStatus, Output), Box<dyn Error>> {
    let readers = [
        child.stdout.take().map(drain),
        child.stderr.take().map(drain),
    ];
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            return Err("a dedupe process hung".into());
        }
        thread::sleep(Duration::from_millis(10));
    };
    let [stdout, stderr] = readers.map(|reader| {
        reader
            .and_then(|reader| reader.join().ok())
            .unwrap_or_default()
    });
    Ok((
        status,
        Output {
            status,
            stdout,
            stderr,
        },
    ))
}

pub fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// Waits until `path` exists.
pub fn wait_for(path: &Path) -> TestResult {
    let deadline = Instant::now() + PATIENCE;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} never appeared", path.display()).into());
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

pub fn one_line(finished: &Finished) {
    assert_eq!(
        finished.stderr.lines().count(),
        1,
        "expected one line on stderr: {:?}",
        finished.stderr
    );
}
