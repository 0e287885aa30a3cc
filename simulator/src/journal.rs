//! The simulator's durable memory: every stored answer as one JSON line, appended and flushed
//! before the answer is sent, and replayed at start. A killed simulator, restarted on its
//! journal, answers a repeated idempotency key as it did before and still shows what it did, as
//! a real provider does (without it, a crash between charging and answering would let the retry
//! charge a second time). Flushed to the operating system, not synced to disk: it survives the
//! process, not the machine.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::Operation;

/// One stored answer, as a journal line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// RFC 3339, UTC: when the answer was stored.
    pub at: String,
    pub operation: Operation,
    pub idempotency_key: String,
    /// The request body, as the ledger records it.
    pub request: Value,
    pub status: u16,
    pub response: Value,
}

pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Opens (or creates) the journal at `path` and reads back what it holds, oldest first. A
    /// torn last line (the process was killed while writing it) is skipped with a warning and cut
    /// off, so the next record starts on a line of its own; any other unreadable line is an error.
    pub fn open(path: &Path) -> anyhow::Result<(Self, Vec<Record>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening the journal {}", path.display()))?;
        let mut text = Vec::new();
        io::Read::read_to_end(&mut file, &mut text).with_context(|| format!("reading {}", path.display()))?;
        // Everything up to the last newline was written whole; after it, a torn line, if any.
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |end| end + 1);
        let mut records = Vec::new();
        for (index, line) in text[..whole].split(|b| *b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let record = serde_json::from_slice::<Record>(line)
                .with_context(|| format!("{} line {} is not a journal record", path.display(), index + 1))?;
            records.push(record);
        }
        if whole < text.len() {
            // The write it belongs to never completed, so its answer was never sent.
            tracing::warn!(journal = %path.display(), bytes = text.len() - whole, "skipping a torn last line");
            file.set_len(whole as u64).with_context(|| format!("cutting the torn line off {}", path.display()))?;
        }
        Ok((Self { path: path.to_owned(), file }, records))
    }

    /// Appends `record` as one line, in one write, and flushes it.
    pub fn append(&mut self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.flush()
    }

    /// Forgets everything (a cleared ledger stays cleared across a restart).
    pub fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
