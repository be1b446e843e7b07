//! How `dedupe run` stores a command's outcome in the key's response bytes: an explicit,
//! versioned layout (documented in `dedupe run --help` and the README), so that a later
//! dedupe, or any other program reading the store, can replay or inspect it without guessing.
//!
//! ```text
//! 0..4    magic "DRUN"
//! 4       encoding version (1)
//! 5       flags: bit 0 stdout cut, bit 1 stderr cut, bit 2 killed by a signal
//! 6..10   u32 LE: exit code (0-255), or the signal number when bit 2 is set
//! 10..14  u32 LE: captured stdout length
//! 14..18  u32 LE: captured stderr length
//! 18..    captured stdout, then captured stderr
//! ```

use std::fmt;

/// The first four bytes of every stored run outcome.
pub const MAGIC: [u8; 4] = *b"DRUN";
/// The layout version this build writes and reads.
pub const VERSION: u8 = 1;
/// The bytes before the captured output.
pub const HEADER_LEN: usize = 18;

const STDOUT_CUT: u8 = 1;
const STDERR_CUT: u8 = 1 << 1;
const SIGNALLED: u8 = 1 << 2;
const KNOWN_FLAGS: u8 = STDOUT_CUT | STDERR_CUT | SIGNALLED;

/// How CMD ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It exited with this code.
    Exited(u8),
    /// A signal killed it.
    Signalled(u8),
}

impl Ending {
    /// The status a shell (and dedupe) reports for it: the code, or 128 + the signal.
    pub fn exit_code(self) -> u8 {
        match self {
            Ending::Exited(code) => code,
            Ending::Signalled(signal) => 128u8.saturating_add(signal),
        }
    }

    /// Whether CMD succeeded.
    pub fn success(self) -> bool {
        self == Ending::Exited(0)
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Exited(code) => write!(f, "exit status {code}"),
            Ending::Signalled(signal) => {
                write!(f, "killed by signal {signal} (status {})", self.exit_code())
            }
        }
    }
}

/// What a run stored: how CMD ended and what it printed, as far as it was captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// How CMD ended.
    pub ending: Ending,
    /// The captured stdout.
    pub stdout: Vec<u8>,
    /// The captured stderr.
    pub stderr: Vec<u8>,
    /// Whether stdout was longer than what was captured.
    pub stdout_cut: bool,
    /// Whether stderr was longer than what was captured.
    pub stderr_cut: bool,
}

/// Why stored response bytes are not a run outcome this build can replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotAnOutcome {
    /// No "DRUN" magic: another program (or `dedupe mark`) completed the key.
    Foreign,
    /// A later dedupe wrote it, in a layout version this build does not know.
    UnknownVersion(u8),
    /// The magic is there but the bytes do not add up.
    Malformed(&'static str),
}

impl fmt::Display for NotAnOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotAnOutcome::Foreign => f.write_str("it was not stored by `dedupe run`"),
            NotAnOutcome::UnknownVersion(version) => write!(
                f,
                "it is in outcome layout version {version}; this dedupe reads version {VERSION}"
            ),
            NotAnOutcome::Malformed(why) => write!(f, "its stored outcome is malformed: {why}"),
        }
    }
}

impl RunOutcome {
    /// The response bytes to store.
    pub fn encode(&self) -> Vec<u8> {
        let (flag, code) = match self.ending {
            Ending::Exited(code) => (0, code),
            Ending::Signalled(signal) => (SIGNALLED, signal),
        };
        let mut flags = flag;
        if self.stdout_cut {
            flags |= STDOUT_CUT;
        }
        if self.stderr_cut {
            flags |= STDERR_CUT;
        }
        let mut bytes = Vec::with_capacity(HEADER_LEN + self.stdout.len() + self.stderr.len());
        bytes.extend_from_slice(&MAGIC);
        bytes.push(VERSION);
        bytes.push(flags);
        bytes.extend_from_slice(&u32::from(code).to_le_bytes());
        bytes.extend_from_slice(&length(&self.stdout).to_le_bytes());
        bytes.extend_from_slice(&length(&self.stderr).to_le_bytes());
        bytes.extend_from_slice(&self.stdout);
        bytes.extend_from_slice(&self.stderr);
        bytes
    }

    /// Reads stored response bytes back.
    pub fn decode(bytes: &[u8]) -> Result<RunOutcome, NotAnOutcome> {
        if bytes.get(..4) != Some(&MAGIC[..]) {
            return Err(NotAnOutcome::Foreign);
        }
        let version = *bytes
            .get(4)
            .ok_or(NotAnOutcome::Malformed("no version byte"))?;
        if version != VERSION {
            return Err(NotAnOutcome::UnknownVersion(version));
        }
        let header = bytes
            .get(..HEADER_LEN)
            .ok_or(NotAnOutcome::Malformed("the header is short"))?;
        let flags = header[5];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(NotAnOutcome::Malformed("unknown flag bits"));
        }
        let code = read_u32(header, 6);
        let stdout_len = read_u32(header, 10) as usize;
        let stderr_len = read_u32(header, 14) as usize;
        let body = &bytes[HEADER_LEN..];
        if stdout_len.checked_add(stderr_len) != Some(body.len()) {
            return Err(NotAnOutcome::Malformed(
                "the output lengths do not match its size",
            ));
        }
        let code = u8::try_from(code).map_err(|_| NotAnOutcome::Malformed("status over 255"))?;
        let ending = if flags & SIGNALLED != 0 {
            Ending::Signalled(code)
        } else {
            Ending::Exited(code)
        };
        let (stdout, stderr) = body.split_at(stdout_len);
        Ok(RunOutcome {
            ending,
            stdout: stdout.to_vec(),
            stderr: stderr.to_vec(),
            stdout_cut: flags & STDOUT_CUT != 0,
            stderr_cut: flags & STDERR_CUT != 0,
        })
    }
}

/// The captured streams are bounded by `--max-output`, itself under the store's 256 MiB limit.
fn length(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len()).unwrap_or(u32::MAX)
}

fn read_u32(header: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&header[at..at + 4]);
    u32::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ending: Ending) -> RunOutcome {
        RunOutcome {
            ending,
            stdout: b"report written\n".to_vec(),
            stderr: b"warning: slow\n".to_vec(),
            stdout_cut: true,
            stderr_cut: false,
        }
    }

    #[test]
    fn outcomes_round_trip() -> Result<(), NotAnOutcome> {
        for ending in [Ending::Exited(0), Ending::Exited(255), Ending::Signalled(9)] {
            let outcome = sample(ending);
            assert_eq!(RunOutcome::decode(&outcome.encode())?, outcome);
        }
        Ok(())
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        let bytes = sample(Ending::Signalled(15)).encode();
        assert_eq!(&bytes[..4], b"DRUN");
        assert_eq!(bytes[4], 1);
        assert_eq!(bytes[5], STDOUT_CUT | SIGNALLED);
        assert_eq!(bytes[6..10], 15u32.to_le_bytes());
        assert_eq!(bytes[10..14], 15u32.to_le_bytes());
        assert_eq!(bytes[14..18], 14u32.to_le_bytes());
        assert_eq!(&bytes[18..33], b"report written\n");
        assert_eq!(&bytes[33..], b"warning: slow\n");
        assert_eq!(Ending::Signalled(15).exit_code(), 143);
    }

    #[test]
    fn other_bytes_are_refused_not_misread() {
        assert_eq!(RunOutcome::decode(b""), Err(NotAnOutcome::Foreign));
        assert_eq!(RunOutcome::decode(b"201 OK"), Err(NotAnOutcome::Foreign));
        let mut later = sample(Ending::Exited(0)).encode();
        later[4] = 2;
        assert_eq!(
            RunOutcome::decode(&later),
            Err(NotAnOutcome::UnknownVersion(2))
        );
        let whole = sample(Ending::Exited(0)).encode();
        for cut in 4..whole.len() {
            assert!(RunOutcome::decode(&whole[..cut]).is_err(), "cut at {cut}");
        }
        let mut flagged = whole.clone();
        flagged[5] |= 0x80;
        assert!(RunOutcome::decode(&flagged).is_err());
        let mut status = whole;
        status[7] = 1;
        assert!(RunOutcome::decode(&status).is_err());
    }
}
