//! A small, generic aggregate API over any [`EventStore`]: typed events (with upcasting of older
//! schema versions), `decide` / `apply`, snapshots, and command execution that retries version
//! conflicts with bounded, jittered backoff and honours idempotency keys.
//!
//! Domain events are enums serialized adjacently tagged:
//! `#[serde(tag = "type", content = "data")]`. The tag is the stored event type (past tense,
//! `InventoryReserved`), the content the payload.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::deadline::Deadline;
use crate::eventstore::{
    AppendError, AppendOutcome, Committed, EventMetadata, EventStore, InvalidStreamId, NewEvent, RecordedEvent,
    Snapshot, StoreError, StreamId,
};
use crate::retry::RetryPolicy;

/// A domain event type. Only schema evolution needs overriding.
pub trait DomainEvent: Serialize + DeserializeOwned + Send + Sync {
    /// The schema version new events of `event_type` are written with.
    fn current_schema_version(event_type: &str) -> u32 {
        let _ = event_type;
        1
    }

    /// Rewrites a payload of `event_type` stored as schema `from_version` into `from_version + 1`.
    /// Applied step by step until the current version, so old events load as the current type.
    fn upcast(event_type: &str, from_version: u32, payload: Value) -> Result<Value, String> {
        let _ = payload;
        Err(format!("no upcaster for {event_type} from schema version {from_version}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("event does not serialize as {{\"type\", \"data\"}}: use #[serde(tag = \"type\", content = \"data\")]")]
    NotAdjacentlyTagged,
    #[error("event cannot be serialized: {0}")]
    Serialize(String),
    #[error("{event_type} v{schema_version} (version {version} of {stream}) does not decode: {message}")]
    Decode { stream: String, version: u64, event_type: String, schema_version: u32, message: String },
    #[error("{event_type} v{schema_version} (version {version} of {stream}) is newer than this code (v{current})")]
    FromTheFuture { stream: String, version: u64, event_type: String, schema_version: u32, current: u32 },
    #[error("upcasting {event_type} from v{from_version} (version {version} of {stream}) failed: {message}")]
    Upcast { stream: String, version: u64, event_type: String, from_version: u32, message: String },
}

/// Encodes a typed event as an envelope at its current schema version.
pub fn encode_event<E: DomainEvent>(event: &E) -> Result<NewEvent, CodecError> {
    let value = serde_json::to_value(event).map_err(|e| CodecError::Serialize(e.to_string()))?;
    let Value::Object(mut fields) = value else { return Err(CodecError::NotAdjacentlyTagged) };
    let Some(Value::String(event_type)) = fields.remove("type") else { return Err(CodecError::NotAdjacentlyTagged) };
    let payload = fields.remove("data").unwrap_or(Value::Null);
    if !fields.is_empty() {
        return Err(CodecError::NotAdjacentlyTagged);
    }
    let schema_version = E::current_schema_version(&event_type);
    Ok(NewEvent::new(event_type, schema_version, payload))
}

/// Decodes a stored envelope into the current event type, upcasting older schema versions.
pub fn decode_event<E: DomainEvent>(recorded: &RecordedEvent) -> Result<E, CodecError> {
    decode_payload(recorded, recorded.payload.clone())
}

/// As [`decode_event`], consuming the envelope: the payload is moved, not copied (what a replay
/// of many events uses).
pub fn decode_event_owned<E: DomainEvent>(mut recorded: RecordedEvent) -> Result<E, CodecError> {
    let payload = std::mem::take(&mut recorded.payload);
    decode_payload(&recorded, payload)
}

fn decode_payload<E: DomainEvent>(recorded: &RecordedEvent, mut payload: Value) -> Result<E, CodecError> {
    let current = E::current_schema_version(&recorded.event_type);
    if recorded.schema_version > current {
        return Err(CodecError::FromTheFuture {
            stream: recorded.stream_id.clone(),
            version: recorded.version,
            event_type: recorded.event_type.clone(),
            schema_version: recorded.schema_version,
            current,
        });
    }
    for from_version in recorded.schema_version..current {
        payload = E::upcast(&recorded.event_type, from_version, payload).map_err(|message| CodecError::Upcast {
            stream: recorded.stream_id.clone(),
            version: recorded.version,
            event_type: recorded.event_type.clone(),
            from_version,
            message,
        })?;
    }
    let mut tagged = serde_json::Map::with_capacity(2);
    tagged.insert("type".to_owned(), Value::String(recorded.event_type.clone()));
    tagged.insert("data".to_owned(), payload);
    serde_json::from_value(Value::Object(tagged)).map_err(|e| CodecError::Decode {
        stream: recorded.stream_id.clone(),
        version: recorded.version,
        event_type: recorded.event_type.clone(),
        schema_version: recorded.schema_version,
        message: e.to_string(),
    })
}

/// An event-sourced aggregate: state is the fold of its events; commands are decided against it.
pub trait Aggregate: Default + Clone + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stream category: streams are `<CATEGORY>-<id>`.
    const CATEGORY: &'static str;
    /// The schema of the serialized state; bump it when the state's shape changes so that old
    /// snapshots are ignored rather than misread.
    const SNAPSHOT_SCHEMA_VERSION: u32 = 1;
    /// Whether this aggregate's streams are snapshotted. A stream that always stays short (one
    /// order's payment, say) replays in the same one Query that would follow a snapshot, so
    /// looking a snapshot up first is a wasted round trip: `false` skips it, and takes none.
    const SNAPSHOTS: bool = true;
    type Event: DomainEvent;
    type Command: Send + Sync;
    type Error: std::error::Error + Send + Sync + 'static;

    /// Folds one event into the state. Events are facts: this cannot fail.
    fn apply(&mut self, event: &Self::Event);

    /// Decides which events a command produces, or rejects it. No events means no change.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
}

/// The state of one aggregate instance and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<A> {
    pub state: A,
    pub version: u64,
    /// The snapshot the load started from, if one was usable.
    pub snapshot_version: Option<u64>,
    pub events_replayed: usize,
}

/// Tracing and idempotency for one command.
#[derive(Debug, Clone, Default)]
pub struct CommandContext {
    /// A repeat with the same key returns the first result instead of deciding again.
    pub idempotency_key: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    /// The X-Ray trace header the command runs in, kept on the events it appends.
    pub trace_header: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Executed {
    Appended {
        committed: Committed,
        attempts: u32,
    },
    /// The command was executed before under the same idempotency key: its original result.
    Duplicate {
        committed: Committed,
    },
    /// The command produced no events.
    Unchanged {
        version: u64,
    },
}

impl Executed {
    /// The version the state returned with this outcome stands at, when that is known without a
    /// load: for [`Repository::execute_from`]. Not for a duplicate, whose events may be behind
    /// the head.
    pub fn state_version(&self) -> Option<u64> {
        match self {
            Self::Appended { committed, .. } => Some(committed.last_version),
            Self::Unchanged { version } => Some(*version),
            Self::Duplicate { .. } => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    InvalidId(#[from] InvalidStreamId),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E: std::error::Error + 'static> {
    /// The domain rejected the command; retrying will not help.
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    #[error("gave up after {attempts} attempts, each lost to a concurrent writer")]
    ConflictRetriesExhausted { attempts: u32 },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Append(AppendError),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl<E: std::error::Error + 'static> ExecuteError<E> {
    /// Whether redelivering the command later may succeed (a queue should retry it).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::ConflictRetriesExhausted { .. } => true,
            Self::Load(LoadError::Store(e)) => e.is_retryable(),
            Self::Append(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Loads and executes commands on aggregates of any type over one store.
pub struct Repository<S> {
    store: S,
    snapshot_every: Option<u64>,
    retry: RetryPolicy,
    cache: Option<cache::StateCache>,
}

impl<S> fmt::Debug for Repository<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("snapshot_every", &self.snapshot_every)
            .field("retry", &self.retry)
            .field("cached_streams", &self.cache.as_ref().map(|_| "on"))
            .finish()
    }
}

impl<S: EventStore> Repository<S> {
    pub fn new(store: S) -> Self {
        Self { store, snapshot_every: None, retry: RetryPolicy::default(), cache: None }
    }

    /// Keeps the state of up to `streams` snapshotted streams (see [`Aggregate::SNAPSHOTS`])
    /// between commands: a later load of one reads only the events after its cached version,
    /// without the snapshot lookup. For a long-lived repository (a Lambda's, kept between
    /// invocations) working on hot streams.
    pub fn with_state_cache(mut self, streams: usize) -> Self {
        self.cache = (streams > 0).then(|| cache::StateCache::new(streams));
        self
    }

    /// The cache, for an aggregate it applies to: long streams, the ones that are snapshotted.
    fn cache_for<A: Aggregate>(&self) -> Option<&cache::StateCache> {
        self.cache.as_ref().filter(|_| A::SNAPSHOTS)
    }

    /// Takes a snapshot whenever an append crosses a multiple of `every` events.
    pub fn with_snapshots_every(mut self, every: u64) -> Self {
        self.snapshot_every = (every > 0).then_some(every);
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Loads from the cached state or the latest usable snapshot, then the events after it.
    pub async fn load<A: Aggregate>(&self, id: &str) -> Result<Loaded<A>, LoadError> {
        let stream = StreamId::new(A::CATEGORY, id)?;
        if let Some((state, version)) = self.cache_for::<A>().and_then(|c| c.get::<A>(stream.as_str())) {
            return self.fold(&stream, state, version, None).await;
        }
        let start = match A::SNAPSHOTS.then(|| self.store.load_snapshot(&stream)) {
            Some(lookup) => lookup.await?.and_then(restore::<A>),
            None => None,
        };
        let (state, version, snapshot_version) = match start {
            Some((state, version)) => (state, version, Some(version)),
            None => (A::default(), 0, None),
        };
        self.fold(&stream, state, version, snapshot_version).await
    }

    /// Loads by replaying every event, ignoring snapshots.
    pub async fn replay<A: Aggregate>(&self, id: &str) -> Result<Loaded<A>, LoadError> {
        let stream = StreamId::new(A::CATEGORY, id)?;
        self.fold(&stream, A::default(), 0, None).await
    }

    async fn fold<A: Aggregate>(
        &self,
        stream: &StreamId,
        mut state: A,
        from_version: u64,
        snapshot_version: Option<u64>,
    ) -> Result<Loaded<A>, LoadError> {
        let events = self.store.load_for_fold(stream, from_version).await?;
        let events_replayed = events.len();
        let version = apply_all(&mut state, from_version, events)?;
        if let Some(cache) = self.cache_for::<A>() {
            cache.put(stream.as_str(), &state, version);
        }
        Ok(Loaded { state, version, snapshot_version, events_replayed })
    }

    /// Executes a command: load, decide, append at the loaded version; on a conflict, back off
    /// (full jitter) and start again, up to the retry policy's attempts.
    pub async fn execute<A: Aggregate>(
        &self,
        id: &str,
        command: &A::Command,
        ctx: &CommandContext,
    ) -> Result<Executed, ExecuteError<A::Error>> {
        self.execute_with_state::<A>(id, command, ctx).await.map(|(executed, _)| executed)
    }

    /// As [`Self::execute`], also returning the state after the command (or as it stands, for a
    /// duplicate or a command that changed nothing): what callers derive outcomes from.
    pub async fn execute_with_state<A: Aggregate>(
        &self,
        id: &str,
        command: &A::Command,
        ctx: &CommandContext,
    ) -> Result<(Executed, A), ExecuteError<A::Error>> {
        let stream = StreamId::new(A::CATEGORY, id).map_err(LoadError::from)?;
        let key = ctx.idempotency_key.as_deref();
        // The key is checked before deciding: after the first execution the state has moved on,
        // and deciding again could reject a command that in fact succeeded. Both reads are
        // independent, so they go out together: one round trip, not two.
        let committed = async {
            match key {
                Some(key) => self.store.find_committed(key).await.map_err(LoadError::from),
                None => Ok(None),
            }
        };
        let (committed, loaded) = futures::future::join(committed, self.load::<A>(id)).await;
        if let (Some(key), Some(committed)) = (key, committed?) {
            if committed.stream_id != stream.as_str() {
                return Err(ExecuteError::Append(AppendError::IdempotencyKeyReused {
                    key: key.to_owned(),
                    stream: stream.to_string(),
                    original_stream: committed.stream_id,
                }));
            }
            return Ok((Executed::Duplicate { committed }, loaded?.state));
        }
        let Loaded { state, version, .. } = loaded?;
        // Boxed: callers' futures nest this one deep enough to reach the compiler's type-layout
        // depth limit (place-order's handler did); one allocation per command.
        Box::pin(self.decide_and_append(&stream, state, version, command, ctx)).await
    }

    /// As [`Self::execute_with_state`] without a load: from `state` at `version`, which the
    /// caller holds (what an earlier command on the same stream returned). Should newer events
    /// exist, the append conflicts and the state catches up on them, as after any conflict. For a
    /// command that follows another on the same stream (record a request, then its answer).
    pub async fn execute_from<A: Aggregate>(
        &self,
        id: &str,
        state: A,
        version: u64,
        command: &A::Command,
        ctx: &CommandContext,
    ) -> Result<(Executed, A), ExecuteError<A::Error>> {
        if ctx.idempotency_key.is_some() {
            // The key must be checked before deciding: the full path does that.
            return self.execute_with_state::<A>(id, command, ctx).await;
        }
        let stream = StreamId::new(A::CATEGORY, id).map_err(LoadError::from)?;
        self.decide_and_append(&stream, state, version, command, ctx).await
    }

    /// Decides on `state` at `version` and appends; on a conflict, backs off, catches up on the
    /// events after `version` (one Query) and decides again.
    async fn decide_and_append<A: Aggregate>(
        &self,
        stream: &StreamId,
        mut state: A,
        mut version: u64,
        command: &A::Command,
        ctx: &CommandContext,
    ) -> Result<(Executed, A), ExecuteError<A::Error>> {
        let key = ctx.idempotency_key.as_deref();
        let id = stream.id();
        let metadata = EventMetadata {
            correlation_id: ctx.correlation_id.clone(),
            causation_id: ctx.causation_id.clone(),
            trace_header: ctx.trace_header.clone(),
        };
        let mut attempts = self.retry.attempts(Deadline::current());
        loop {
            let events = state.decide(command).map_err(ExecuteError::Rejected)?;
            if events.is_empty() {
                return Ok((Executed::Unchanged { version }, state));
            }
            let new_events = events
                .iter()
                .map(|e| encode_event(e).map(|n| n.with_metadata(metadata.clone())))
                .collect::<Result<Vec<_>, _>>()?;
            match self.store.append_after_seen(stream, version, new_events, key).await {
                Ok(AppendOutcome::Appended(committed)) => {
                    let from_version = version;
                    for event in &events {
                        state.apply(event);
                    }
                    if let Some(cache) = self.cache_for::<A>() {
                        cache.put(stream.as_str(), &state, committed.last_version);
                    }
                    self.snapshot_if_due(stream, from_version, &state, committed.last_version).await;
                    return Ok((Executed::Appended { committed, attempts: attempts.made() + 1 }, state));
                }
                Ok(AppendOutcome::Duplicate(committed)) => {
                    let state = self.load::<A>(id).await?.state;
                    return Ok((Executed::Duplicate { committed }, state));
                }
                Err(AppendError::Conflict { expected, actual, .. }) => {
                    tracing::debug!(stream = %stream, expected, at_least = actual, "version conflict");
                    if !attempts.again().await {
                        return Err(ExecuteError::ConflictRetriesExhausted { attempts: attempts.made() });
                    }
                    // Catch up on what the winners appended, then decide again.
                    let newer = self.store.load_for_fold(stream, version).await.map_err(LoadError::from)?;
                    version = apply_all(&mut state, version, newer)?;
                }
                Err(e) => return Err(ExecuteError::Append(e)),
            }
        }
    }

    async fn snapshot_if_due<A: Aggregate>(&self, stream: &StreamId, from_version: u64, state: &A, version: u64) {
        let Some(every) = self.snapshot_every.filter(|_| A::SNAPSHOTS) else { return };
        if from_version / every == version / every {
            return;
        }
        let state = match serde_json::to_value(state) {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(stream = %stream, error = %e, "state does not serialize; no snapshot");
                return;
            }
        };
        let snapshot = Snapshot {
            stream_id: stream.to_string(),
            version,
            schema_version: A::SNAPSHOT_SCHEMA_VERSION,
            state,
            taken_at: crate::eventstore::now_rfc3339(),
        };
        // The events are committed; a failed snapshot only makes later loads slower.
        if let Err(e) = self.store.save_snapshot(snapshot).await {
            tracing::warn!(stream = %stream, error = %e, "snapshot not saved");
        }
    }
}

/// Folds `events` (the ones after `version`, in order) into `state`; returns the new version.
fn apply_all<A: Aggregate>(state: &mut A, mut version: u64, events: Vec<RecordedEvent>) -> Result<u64, CodecError> {
    for recorded in events {
        version = recorded.version;
        state.apply(&decode_event_owned::<A::Event>(recorded)?);
    }
    Ok(version)
}

/// A snapshot's state, or `None` (replay from the start) when it is of another schema or no
/// longer deserializes.
fn restore<A: Aggregate>(snapshot: Snapshot) -> Option<(A, u64)> {
    if snapshot.schema_version != A::SNAPSHOT_SCHEMA_VERSION {
        tracing::info!(
            stream = %snapshot.stream_id,
            stored = snapshot.schema_version,
            current = A::SNAPSHOT_SCHEMA_VERSION,
            "snapshot of another schema; replaying"
        );
        return None;
    }
    match serde_json::from_value(snapshot.state) {
        Ok(state) => Some((state, snapshot.version)),
        Err(e) => {
            tracing::warn!(stream = %snapshot.stream_id, error = %e, "snapshot does not deserialize; replaying");
            None
        }
    }
}

mod cache;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;
