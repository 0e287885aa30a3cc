//! `Tally`: a deliberately small aggregate that records entries, used to exercise the event
//! store (concurrency, snapshots, upcasting) without depending on the order domain.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::aggregate::{Aggregate, DomainEvent};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub entries: Vec<(String, u32)>,
    pub notes_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum TallyEvent {
    /// Schema v2. v1 was `{"who": .., "n": ..}` with no note.
    EntryRecorded { writer: String, seq: u32, note: String },
}

impl DomainEvent for TallyEvent {
    fn current_schema_version(_event_type: &str) -> u32 {
        2
    }

    fn upcast(event_type: &str, from_version: u32, payload: Value) -> Result<Value, String> {
        match (event_type, from_version) {
            ("EntryRecorded", 1) => Ok(json!({
                "writer": payload.get("who").and_then(Value::as_str).ok_or("v1 entry without who")?,
                "seq": payload.get("n").and_then(Value::as_u64).ok_or("v1 entry without n")?,
                "note": "",
            })),
            _ => Err(format!("no upcaster for {event_type} v{from_version}")),
        }
    }
}

/// Record one entry per (writer, seq), each with a note of `note_bytes` bytes.
pub struct Record {
    pub writer: String,
    pub seqs: std::ops::Range<u32>,
    pub note_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("nothing to record")]
pub struct Empty;

impl Aggregate for Tally {
    const CATEGORY: &'static str = "Tally";
    type Event = TallyEvent;
    type Command = Record;
    type Error = Empty;

    fn apply(&mut self, event: &TallyEvent) {
        let TallyEvent::EntryRecorded { writer, seq, note } = event;
        self.entries.push((writer.clone(), *seq));
        self.notes_bytes += note.len();
    }

    fn decide(&self, command: &Record) -> Result<Vec<TallyEvent>, Empty> {
        if command.seqs.is_empty() {
            return Err(Empty);
        }
        Ok(command
            .seqs
            .clone()
            .map(|seq| TallyEvent::EntryRecorded {
                writer: command.writer.clone(),
                seq,
                note: "n".repeat(command.note_bytes),
            })
            .collect())
    }
}
