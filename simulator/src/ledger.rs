//! What the simulator actually did (one entry per effect, i.e. per stored answer) and every call
//! it received, so tests can assert effects and benchmarks can count retries and duplicates.
//! With a [`Journal`], the entries are written through to it, and read back from it at start.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use axum::http::StatusCode;

use crate::journal::{Journal, Record};
use crate::model::{Answer, Operation, Service};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub seq: u64,
    /// RFC 3339, UTC.
    pub at: String,
    pub service: Service,
    pub operation: Operation,
    pub idempotency_key: String,
    pub request: Value,
    pub status: u16,
    pub response: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct LedgerView {
    pub entries: Vec<Entry>,
    pub calls: BTreeMap<Operation, u64>,
    pub duplicates: BTreeMap<Operation, u64>,
}

#[derive(Default)]
struct Inner {
    entries: Vec<Entry>,
    /// Every call as received, keyed so that `contains` filters the counts too (tests sharing
    /// one simulator count their own calls). `None`: the call had no idempotency key.
    calls: Vec<(Operation, Option<String>)>,
    duplicates: Vec<(Operation, String)>,
    journal: Option<Journal>,
}

#[derive(Default)]
pub struct Ledger(Mutex<Inner>);

/// A stored answer read back from the journal: its operation, its idempotency key, the answer.
pub type Replayed = (Operation, String, Answer);

impl Ledger {
    /// A ledger kept in the journal at `path`: its entries so far, and the stored answers.
    pub fn journaled(path: &Path) -> anyhow::Result<(Self, Vec<Replayed>)> {
        let (journal, records) = Journal::open(path)?;
        let mut inner = Inner::default();
        let mut answers = Vec::with_capacity(records.len());
        for record in records {
            let status = StatusCode::from_u16(record.status)
                .map_err(|e| anyhow::anyhow!("{}: status {}: {e}", journal.path().display(), record.status))?;
            answers.push((
                record.operation,
                record.idempotency_key.clone(),
                Answer { status, body: record.response.clone() },
            ));
            inner.push(record);
        }
        tracing::info!(journal = %journal.path().display(), answers = answers.len(), "journal replayed");
        inner.journal = Some(journal);
        Ok((Self(Mutex::new(inner)), answers))
    }

    pub fn call(&self, operation: Operation, key: Option<&str>) {
        self.lock().calls.push((operation, key.map(str::to_owned)));
    }

    pub fn duplicate(&self, operation: Operation, key: &str) {
        self.lock().duplicates.push((operation, key.to_owned()));
    }

    /// Records an effect: written to the journal first, if there is one (an error there records
    /// nothing, and the answer must not be given).
    pub fn record(&self, operation: Operation, key: &str, request: Value, answer: &Answer) -> io::Result<()> {
        let record = Record {
            at: OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default(),
            operation,
            idempotency_key: key.to_owned(),
            request,
            status: answer.status.as_u16(),
            response: answer.body.clone(),
        };
        let mut inner = self.lock();
        if let Some(journal) = inner.journal.as_mut() {
            journal.append(&record)?;
        }
        inner.push(record);
        Ok(())
    }

    pub fn view(&self, contains: Option<&str>) -> LedgerView {
        let matches = |key: &str| contains.is_none_or(|part| key.contains(part));
        let zeros = || Operation::ALL.into_iter().map(|op| (op, 0)).collect::<BTreeMap<_, _>>();
        let inner = self.lock();
        let mut calls = zeros();
        for (op, key) in &inner.calls {
            if key.as_deref().map_or(contains.is_none(), matches) {
                *calls.entry(*op).or_default() += 1;
            }
        }
        let mut duplicates = zeros();
        for (op, _) in inner.duplicates.iter().filter(|(_, key)| matches(key)) {
            *duplicates.entry(*op).or_default() += 1;
        }
        let entries = inner.entries.iter().filter(|e| matches(&e.idempotency_key)).cloned().collect();
        LedgerView { entries, calls, duplicates }
    }

    /// Forgets everything, the journal too.
    pub fn clear(&self) -> io::Result<()> {
        let mut inner = self.lock();
        let mut journal = inner.journal.take();
        *inner = Inner::default();
        let cleared = journal.as_mut().map_or(Ok(()), Journal::clear);
        inner.journal = journal;
        cleared
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: keep serving it.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn push(&mut self, record: Record) {
        let seq = self.entries.len() as u64 + 1;
        self.entries.push(Entry {
            seq,
            at: record.at,
            service: record.operation.service(),
            operation: record.operation,
            idempotency_key: record.idempotency_key,
            request: record.request,
            status: record.status,
            response: record.response,
        });
    }
}
