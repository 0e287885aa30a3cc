//! An in-memory event store with the same append semantics as DynamoDB's (expected version,
//! idempotency keys), for unit tests of aggregates and sagas. Not for production.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use super::{
    AppendError, AppendOutcome, Committed, EventStore, MAX_TRANSACT_ACTIONS, NewEvent, RecordedEvent, Snapshot,
    StoreError, StreamId, record_events, validate_idempotency_key,
};

#[derive(Default)]
pub struct InMemoryEventStore {
    state: Mutex<State>,
    /// Appends that will fail with a conflict before reaching the log (to exercise retries).
    injected_conflicts: AtomicU32,
}

#[derive(Default)]
struct State {
    streams: HashMap<String, Vec<RecordedEvent>>,
    commands: HashMap<String, Committed>,
    snapshots: HashMap<String, Snapshot>,
}

impl InMemoryEventStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next `n` appends fail with a conflict, as if another writer had won each race.
    pub fn inject_conflicts(&self, n: u32) {
        self.injected_conflicts.store(n, Ordering::SeqCst);
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, StoreError> {
        self.state.lock().map_err(|_| StoreError::Corrupt("in-memory store poisoned".into()))
    }
}

impl EventStore for InMemoryEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
        idempotency_key: Option<&str>,
    ) -> Result<AppendOutcome, AppendError> {
        if events.is_empty() {
            return Err(AppendError::NoEvents);
        }
        if let Some(key) = idempotency_key {
            validate_idempotency_key(key)?;
        }
        let max = MAX_TRANSACT_ACTIONS - usize::from(expected_version > 0) - usize::from(idempotency_key.is_some());
        if events.len() > max {
            return Err(AppendError::TooManyEvents { count: events.len(), max });
        }
        let mut state = self.lock()?;
        if let Some(original) = idempotency_key.and_then(|k| state.commands.get(k)) {
            if original.stream_id != stream.as_str() {
                return Err(AppendError::IdempotencyKeyReused {
                    key: idempotency_key.unwrap_or_default().to_owned(),
                    stream: stream.to_string(),
                    original_stream: original.stream_id.clone(),
                });
            }
            return Ok(AppendOutcome::Duplicate(original.clone()));
        }
        let head = state.streams.get(stream.as_str()).map_or(0, |s| s.len() as u64);
        let injected =
            self.injected_conflicts.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if head != expected_version || injected {
            return Err(AppendError::Conflict { stream: stream.to_string(), expected: expected_version, actual: head });
        }
        let (recorded, committed) = record_events(stream, expected_version, events, idempotency_key);
        state.streams.entry(stream.to_string()).or_default().extend(recorded);
        if let Some(key) = idempotency_key {
            state.commands.insert(key.to_owned(), committed.clone());
        }
        Ok(AppendOutcome::Appended(committed))
    }

    async fn load(&self, stream: &StreamId, after_version: u64) -> Result<Vec<RecordedEvent>, StoreError> {
        let state = self.lock()?;
        Ok(state
            .streams
            .get(stream.as_str())
            .map(|events| events.iter().filter(|e| e.version > after_version).cloned().collect())
            .unwrap_or_default())
    }

    async fn read_page(
        &self,
        stream: &StreamId,
        after_version: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let state = self.lock()?;
        Ok(state
            .streams
            .get(stream.as_str())
            .map(|events| events.iter().filter(|e| e.version > after_version).take(limit as usize).cloned().collect())
            .unwrap_or_default())
    }

    async fn head_version(&self, stream: &StreamId) -> Result<u64, StoreError> {
        Ok(self.lock()?.streams.get(stream.as_str()).map_or(0, |s| s.len() as u64))
    }

    async fn find_committed(&self, idempotency_key: &str) -> Result<Option<Committed>, StoreError> {
        Ok(self.lock()?.commands.get(idempotency_key).cloned())
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.lock()?.snapshots.get(stream.as_str()).cloned())
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        let mut state = self.lock()?;
        let newer_exists = state.snapshots.get(&snapshot.stream_id).is_some_and(|s| s.version >= snapshot.version);
        if !newer_exists {
            state.snapshots.insert(snapshot.stream_id.clone(), snapshot);
        }
        Ok(())
    }
}
