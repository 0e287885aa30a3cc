//! Event store: an immutable, per-stream, gapless log of event envelopes.
//!
//! The port ([`EventStore`]) speaks in envelopes with JSON payloads; typed domain events are
//! encoded and decoded (with upcasting) by [`crate::aggregate`]. The DynamoDB adapter
//! ([`crate::adapters::dynamodb::DynamoEventStore`]) is the production implementation; [`InMemoryEventStore`] exists for unit
//! tests of pure logic.

mod memory;

use std::fmt;
use std::future::Future;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use memory::InMemoryEventStore;

/// DynamoDB allows 100 actions in one `TransactWriteItems`.
pub const MAX_TRANSACT_ACTIONS: usize = 100;
/// DynamoDB's item size limit (names and values, UTF-8).
pub const MAX_ITEM_BYTES: usize = 400 * 1024;
/// DynamoDB's limit on the summed size of the items in one transaction.
pub const MAX_TRANSACTION_BYTES: usize = 4 * 1024 * 1024;
/// Longest idempotency key accepted; keys are DynamoDB partition keys (2048 bytes at most).
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 512;

/// A stream id `<Category>-<id>`, e.g. `Order-7f3c…`. Validated so that bad input is rejected
/// before it becomes a partition key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stream id {value:?}: {reason}")]
pub struct InvalidStreamId {
    pub value: String,
    pub reason: &'static str,
}

impl StreamId {
    pub fn new(category: &str, id: &str) -> Result<Self, InvalidStreamId> {
        Self::parse(&format!("{category}-{id}"))
    }

    pub fn parse(value: &str) -> Result<Self, InvalidStreamId> {
        let invalid = |reason| InvalidStreamId { value: value.to_owned(), reason };
        let (category, id) = value.split_once('-').ok_or_else(|| invalid("expected <Category>-<id>"))?;
        if category.is_empty() || !category.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return Err(invalid("category must start with a letter"));
        }
        if !category.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(invalid("category must be alphanumeric"));
        }
        if id.is_empty() || id.len() > 256 {
            return Err(invalid("id must be 1 to 256 characters"));
        }
        if !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) {
            return Err(invalid("id may hold only letters, digits and - _ . :"));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn category(&self) -> &str {
        self.0.split_once('-').map_or("", |(c, _)| c)
    }

    pub fn id(&self) -> &str {
        self.0.split_once('-').map_or("", |(_, id)| id)
    }
}

impl TryFrom<String> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<StreamId> for String {
    fn from(value: StreamId) -> Self {
        value.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who caused an event: the correlation id ties every event of one business flow (an order's
/// saga) together; the causation id names the command or event that directly caused it. The
/// trace header is the X-Ray trace the flow began in: DynamoDB Streams carry no trace context,
/// so the event carries it to the stream's consumers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub trace_header: Option<String>,
}

/// An event about to be appended.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_type: String,
    pub schema_version: u32,
    pub payload: Value,
    pub metadata: EventMetadata,
}

impl NewEvent {
    pub fn new(event_type: impl Into<String>, schema_version: u32, payload: Value) -> Self {
        Self { event_type: event_type.into(), schema_version, payload, metadata: EventMetadata::default() }
    }

    pub fn with_metadata(mut self, metadata: EventMetadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// An event as stored: the envelope every consumer (projections, the outbox relay) reads.
/// Attribute names are the DynamoDB item's, so a stream record's `NewImage` deserializes into it;
/// a payload stored as JSON text (`payloadJson`, see [`crate::adapters::dynamodb::PayloadEncoding`]) is parsed on the way.
/// It serializes with `payload` as a JSON value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "StoredEnvelope")]
pub struct RecordedEvent {
    pub stream_id: String,
    pub version: u64,
    pub event_id: String,
    pub event_type: String,
    pub schema_version: u32,
    pub payload: Value,
    pub correlation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The X-Ray trace header (`Root=…;Parent=…;Sampled=…`) of the flow that caused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_header: Option<String>,
    /// RFC 3339, UTC.
    pub recorded_at: String,
}

/// [`RecordedEvent`] as found in an item, a stream record or a message: the payload is either
/// a value (`payload`) or JSON text (`payloadJson`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredEnvelope {
    stream_id: String,
    version: u64,
    event_id: String,
    event_type: String,
    schema_version: u32,
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    payload_json: Option<String>,
    correlation_id: String,
    #[serde(default)]
    causation_id: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    trace_header: Option<String>,
    recorded_at: String,
}

impl TryFrom<StoredEnvelope> for RecordedEvent {
    type Error = String;

    fn try_from(e: StoredEnvelope) -> Result<Self, String> {
        let payload = match (e.payload_json, e.payload) {
            (Some(text), _) => serde_json::from_str(&text).map_err(|err| format!("payloadJson: {err}"))?,
            (None, payload) => payload.unwrap_or(Value::Null),
        };
        Ok(Self {
            stream_id: e.stream_id,
            version: e.version,
            event_id: e.event_id,
            event_type: e.event_type,
            schema_version: e.schema_version,
            payload,
            correlation_id: e.correlation_id,
            causation_id: e.causation_id,
            idempotency_key: e.idempotency_key,
            trace_header: e.trace_header,
            recorded_at: e.recorded_at,
        })
    }
}

/// What an append committed. A retried command with the same idempotency key gets this back
/// unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Committed {
    pub stream_id: String,
    pub first_version: u64,
    pub last_version: u64,
    pub event_ids: Vec<String>,
    pub recorded_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The events were appended by this call.
    Appended(Committed),
    /// The idempotency key was seen before: nothing was appended; this is the original result.
    Duplicate(Committed),
}

impl AppendOutcome {
    pub fn committed(&self) -> &Committed {
        match self {
            Self::Appended(c) | Self::Duplicate(c) => c,
        }
    }
}

/// The latest snapshot of a stream's state, taken at `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub stream_id: String,
    pub version: u64,
    /// The schema of `state`; a snapshot of another schema is ignored and the stream replayed.
    pub schema_version: u32,
    pub state: Value,
    pub taken_at: String,
}

/// Failures of the storage itself.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("DynamoDB {operation} failed: {message}")]
    Request { operation: &'static str, message: String, retryable: bool },
    #[error("a stored item is malformed: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Request { retryable: true, .. })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer appended first (or `expected_version` is not the head): reload, decide
    /// again, retry.
    #[error("version conflict on {stream}: expected version {expected}, stream is at {actual}")]
    Conflict { stream: String, expected: u64, actual: u64 },
    #[error("idempotency key {key:?} was used for stream {original_stream}, not {stream}")]
    IdempotencyKeyReused { key: String, stream: String, original_stream: String },
    #[error("invalid idempotency key: {0}")]
    InvalidIdempotencyKey(&'static str),
    #[error("an append needs at least one event")]
    NoEvents,
    #[error("{count} events in one append; at most {max} fit in one DynamoDB transaction")]
    TooManyEvents { count: usize, max: usize },
    #[error("event {index} is {bytes} bytes as a DynamoDB item; the limit is {max}")]
    EventTooLarge { index: usize, bytes: usize, max: usize },
    #[error("the append is {bytes} bytes; a DynamoDB transaction holds at most {max}")]
    TransactionTooLarge { bytes: usize, max: usize },
    #[error("event {index} cannot be stored: {message}")]
    Encode { index: usize, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AppendError {
    /// Whether the same call may succeed later (a conflict needs a reload first).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Conflict { .. } => true,
            Self::Store(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// The port every aggregate repository, projection rebuild and query uses.
pub trait EventStore: Send + Sync {
    /// Appends `events` after `expected_version` (0 for a new stream), atomically: all or none.
    /// With an idempotency key, a repeat of an append that committed returns
    /// [`AppendOutcome::Duplicate`] with the original result instead of appending again.
    fn append(
        &self,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
        idempotency_key: Option<&str>,
    ) -> impl Future<Output = Result<AppendOutcome, AppendError>> + Send;

    /// As [`Self::append`], for a caller that has seen `expected_version` in this store: a version
    /// it loaded, or the last one an append of its own committed (0 for a new stream). Events are
    /// never deleted, so that version exists and the store need not check it again: on DynamoDB,
    /// one event without an idempotency key is a single conditional `PutItem` (half the write
    /// capacity of a transaction, and no transaction coordinator), more events a transaction
    /// without the version guard. A version from anywhere else goes through `append`, which
    /// checks it: a version that does not exist would leave a gap.
    ///
    /// A version conflict is reported without looking up the stream's head: such a caller catches
    /// up by reading the events after `expected_version` anyway (the aggregate repository), and
    /// that lookup would be a request whose answer is thrown away. `Conflict::actual` is then a
    /// lower bound of the head (the version a concurrent writer was seen to hold). Every other
    /// outcome is `append`'s.
    fn append_after_seen(
        &self,
        stream: &StreamId,
        expected_version: u64,
        events: Vec<NewEvent>,
        idempotency_key: Option<&str>,
    ) -> impl Future<Output = Result<AppendOutcome, AppendError>> + Send {
        self.append(stream, expected_version, events, idempotency_key)
    }

    /// Events with version > `after_version`, in order, strongly consistent, all pages.
    fn load(
        &self,
        stream: &StreamId,
        after_version: u64,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send;

    /// As [`Self::load`], for a fold into state (the aggregate repository): only `version`,
    /// `event_type`, `schema_version`, `payload` and `stream_id` are guaranteed; a store may
    /// leave the other fields empty and read less.
    fn load_for_fold(
        &self,
        stream: &StreamId,
        after_version: u64,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send {
        self.load(stream, after_version)
    }

    /// At most `limit` events with version > `after_version`, in order, strongly consistent: one
    /// page of the stream (a feed that catches up asks again after the last version it got).
    /// Fewer than `limit` events means the stream ends there.
    fn read_page(
        &self,
        stream: &StreamId,
        after_version: u64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send;

    /// The stream's last version, 0 when it has no events.
    fn head_version(&self, stream: &StreamId) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The result recorded under an idempotency key, if any.
    fn find_committed(
        &self,
        idempotency_key: &str,
    ) -> impl Future<Output = Result<Option<Committed>, StoreError>> + Send;

    fn load_snapshot(&self, stream: &StreamId) -> impl Future<Output = Result<Option<Snapshot>, StoreError>> + Send;

    /// Stores a snapshot unless a newer one is already stored.
    fn save_snapshot(&self, snapshot: Snapshot) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The envelopes an append of `events` after `expected_version` records, and its summary: one
/// place for ids, versions and metadata defaults, whatever the adapter.
pub(crate) fn record_events(
    stream: &StreamId,
    expected_version: u64,
    events: Vec<NewEvent>,
    idempotency_key: Option<&str>,
) -> (Vec<RecordedEvent>, Committed) {
    let recorded_at = now_rfc3339();
    let recorded: Vec<RecordedEvent> = events
        .into_iter()
        .zip(expected_version + 1..)
        .map(|(e, version)| {
            let event_id = uuid::Uuid::new_v4().to_string();
            RecordedEvent {
                stream_id: stream.to_string(),
                version,
                // An event without a flow of its own correlates with itself.
                correlation_id: e.metadata.correlation_id.unwrap_or_else(|| event_id.clone()),
                event_id,
                event_type: e.event_type,
                schema_version: e.schema_version,
                payload: e.payload,
                causation_id: e.metadata.causation_id,
                idempotency_key: idempotency_key.map(str::to_owned),
                trace_header: e.metadata.trace_header,
                recorded_at: recorded_at.clone(),
            }
        })
        .collect();
    let committed = Committed {
        stream_id: stream.to_string(),
        first_version: expected_version + 1,
        last_version: expected_version + recorded.len() as u64,
        event_ids: recorded.iter().map(|e| e.event_id.clone()).collect(),
        recorded_at,
    };
    (recorded, committed)
}

pub(crate) fn validate_idempotency_key(key: &str) -> Result<(), AppendError> {
    if key.is_empty() {
        return Err(AppendError::InvalidIdempotencyKey("must not be empty"));
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(AppendError::InvalidIdempotencyKey("longer than 512 bytes"));
    }
    Ok(())
}

/// UTC now as RFC 3339 with a fixed six-digit fraction, so timestamps sort as text (read
/// models use them in sort keys).
pub fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_are_validated() {
        let s = StreamId::new("Order", "3f2a-01").expect("valid");
        assert_eq!(s.as_str(), "Order-3f2a-01");
        assert_eq!(s.category(), "Order");
        assert_eq!(s.id(), "3f2a-01");
        assert!(StreamId::parse("Order").is_err(), "no separator");
        assert!(StreamId::parse("-abc").is_err(), "no category");
        assert!(StreamId::parse("Order-").is_err(), "no id");
        assert!(StreamId::parse("Or der-1").is_err());
        assert!(StreamId::parse("Order-a/b").is_err());
        assert!(StreamId::parse(&format!("Order-{}", "x".repeat(257))).is_err());
    }

    #[test]
    fn timestamps_have_a_fixed_width_so_they_sort_as_text() {
        let a = now_rfc3339();
        assert_eq!(a.len(), "2026-11-22T03:48:26.405636Z".len(), "{a}");
        assert!(time::OffsetDateTime::parse(&a, &time::format_description::well_known::Rfc3339).is_ok());
    }

    #[test]
    fn stream_id_deserialization_validates() {
        let ok: StreamId = serde_json::from_str("\"Sku-ABC-1\"").expect("valid");
        assert_eq!(ok.id(), "ABC-1");
        assert!(serde_json::from_str::<StreamId>("\"nope\"").is_err());
    }
}
