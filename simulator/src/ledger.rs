//! What the simulator actually did (one entry per effect, i.e. per stored answer) and every call
//! it received, so tests can assert effects and benchmarks can count retries and duplicates.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

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
}

#[derive(Default)]
pub struct Ledger(Mutex<Inner>);

impl Ledger {
    pub fn call(&self, operation: Operation, key: Option<&str>) {
        self.lock().calls.push((operation, key.map(str::to_owned)));
    }

    pub fn duplicate(&self, operation: Operation, key: &str) {
        self.lock().duplicates.push((operation, key.to_owned()));
    }

    pub fn record(&self, operation: Operation, key: &str, request: Value, answer: &Answer) {
        let at = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
        let mut inner = self.lock();
        let seq = inner.entries.len() as u64 + 1;
        inner.entries.push(Entry {
            seq,
            at,
            service: operation.service(),
            operation,
            idempotency_key: key.to_owned(),
            request,
            status: answer.status.as_u16(),
            response: answer.body.clone(),
        });
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

    pub fn clear(&self) {
        *self.lock() = Inner::default();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: keep serving it.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
