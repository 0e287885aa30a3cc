//! Read models on DynamoDB: one table (`READ_MODEL_TABLE`), items written with optimistic
//! concurrency (a `revision` condition), so concurrent projections never lose an update.
//!
//! A projection is idempotent and ordered per stream: an event at or below the version the item
//! recorded changes nothing; an event beyond the next one means events were missed (delivery is
//! unordered), and they are read from the event store and applied first: the older event is
//! never lost, and it changes nothing when it arrives later.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};
use serde_dynamo::aws_sdk_dynamodb_1::{from_item, to_item};

use crate::config::{ConfigError, Vars, required};
use crate::deadline::Deadline;
use crate::eventstore::{EventStore, RecordedEvent, StoreError, StreamId};
use crate::readmodel::{Applied, DailySales, ReadModel, SalesDelta, placed_total, sales_key};

type Item = HashMap<String, AttributeValue>;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("read model item is malformed: {0}")]
    Corrupt(String),
    #[error("gave up after {0} attempts lost to concurrent writers")]
    Contended(u32),
    #[error("event store is missing events {from}..={to} of {stream}")]
    Missing { stream: String, from: u64, to: u64 },
}

impl ProjectionError {
    /// Whether redelivering the event may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retryable(),
            Self::Contended(_) | Self::Missing { .. } => true,
            Self::Corrupt(_) => false,
        }
    }
}

/// What projecting one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projected {
    Applied,
    /// Missing events were read from the store and applied first.
    CaughtUp {
        events: usize,
    },
    AlreadyApplied,
    /// The read model does not use this stream.
    Ignored,
}

/// What projecting one event wrote, for a projection that does more than keep its item.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection<T> {
    pub projected: Projected,
    /// The events this write applied (the event, after the missing ones it caught up with):
    /// empty when nothing changed (a duplicate, an ignored stream). Each is applied by exactly
    /// one successful write, whatever the redeliveries.
    pub applied: Vec<RecordedEvent>,
    /// What the projection's `also` returned for the write that went through, if anything.
    pub also: Option<T>,
}

/// A write that goes in the same transaction as a read model item's, and what it means to the
/// projection (a counter's change, say).
pub struct AlsoWrite<T> {
    pub update: Update,
    pub then: T,
}

pub(crate) fn request_error<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    operation: &'static str,
    e: aws_sdk_dynamodb::error::SdkError<E, R>,
) -> StoreError {
    let retryable = !matches!(e, aws_sdk_dynamodb::error::SdkError::ServiceError(_))
        || matches!(
            e.code(),
            Some("ProvisionedThroughputExceededException" | "ThrottlingException" | "InternalServerError")
        );
    StoreError::Request { operation, message: DisplayErrorContext(&e).to_string(), retryable }
}

/// Lost conditional writes are retried after a fully jittered pause: projections of one item
/// run concurrently (several pollers, redeliveries), and a tight loop would keep colliding.
const RETRY: crate::retry::RetryPolicy = crate::retry::RetryPolicy {
    max_attempts: 30,
    base_delay: std::time::Duration::from_millis(5),
    max_delay: std::time::Duration::from_millis(500),
};

#[derive(Clone)]
pub struct ReadModelStore {
    pub(crate) client: Client,
    pub(crate) table: String,
}

impl ReadModelStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }

    /// `READ_MODEL_TABLE`.
    pub fn from_vars(client: Client, vars: Vars<'_>) -> Result<Self, ConfigError> {
        Ok(Self::new(client, required(vars, "READ_MODEL_TABLE")?))
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The item at `key`, read consistently (projections read, then write conditionally) or not
    /// (queries: half the read capacity).
    async fn read_item(
        &self,
        key: &(String, String),
        consistent: bool,
    ) -> Result<Option<HashMap<String, AttributeValue>>, ProjectionError> {
        let found = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.0.clone()))
            .key("sk", AttributeValue::S(key.1.clone()))
            .consistent_read(consistent)
            .send()
            .await
            .map_err(|e| request_error("GetItem", e))?;
        Ok(found.item)
    }

    /// A model and its revision.
    pub async fn get<M: serde::de::DeserializeOwned>(
        &self,
        key: &(String, String),
    ) -> Result<Option<(M, u64)>, ProjectionError> {
        let Some(item) = self.read_item(key, true).await? else { return Ok(None) };
        let revision = item.get("revision").and_then(|r| r.as_n().ok()).and_then(|n| n.parse().ok()).unwrap_or(0);
        let model = from_item(item).map_err(|e| ProjectionError::Corrupt(format!("{key:?}: {e}")))?;
        Ok(Some((model, revision)))
    }

    /// A model as a query serves it: an eventually consistent read (what the projections wrote
    /// a moment ago may not show yet, as with any read model).
    pub async fn find<M: serde::de::DeserializeOwned>(
        &self,
        key: &(String, String),
    ) -> Result<Option<M>, ProjectionError> {
        let Some(item) = self.read_item(key, false).await? else { return Ok(None) };
        from_item(item).map(Some).map_err(|e| ProjectionError::Corrupt(format!("{key:?}: {e}")))
    }

    /// Dead letters, newest first within each status; only those in `status` if given. Reads the
    /// listing index (eventually consistent: a change shows a moment after the view has it).
    pub async fn dead_letters(
        &self,
        status: Option<crate::domain::dead_letter::Status>,
        limit: usize,
    ) -> Result<Vec<crate::readmodel::dead_letters::DeadLetterView>, ProjectionError> {
        let mut query = self
            .client
            .query()
            .table_name(&self.table)
            .index_name("byCustomer")
            .scan_index_forward(false)
            .expression_attribute_values(":pk", AttributeValue::S(crate::readmodel::dead_letters::LISTING.into()));
        query = match status {
            Some(status) => query
                .key_condition_expression("gsi1pk = :pk AND begins_with(gsi1sk, :status)")
                .expression_attribute_values(
                    ":status",
                    AttributeValue::S(crate::readmodel::dead_letters::listing_prefix(status)),
                ),
            None => query.key_condition_expression("gsi1pk = :pk"),
        };
        let mut found = Vec::new();
        let mut start = None;
        loop {
            let page =
                query.clone().set_exclusive_start_key(start).send().await.map_err(|e| request_error("Query", e))?;
            for item in page.items.unwrap_or_default() {
                found.push(from_item(item).map_err(|e| ProjectionError::Corrupt(format!("a dead letter view: {e}")))?);
                if found.len() >= limit {
                    return Ok(found);
                }
            }
            start = page.last_evaluated_key;
            if start.is_none() {
                return Ok(found);
            }
        }
    }

    pub(crate) fn item<M: serde::Serialize>(
        key: &(String, String),
        model: &M,
        revision: u64,
    ) -> Result<Item, ProjectionError> {
        let mut item: Item = to_item(model).map_err(|e| ProjectionError::Corrupt(e.to_string()))?;
        item.insert("pk".into(), AttributeValue::S(key.0.clone()));
        item.insert("sk".into(), AttributeValue::S(key.1.clone()));
        item.insert("revision".into(), AttributeValue::N(revision.to_string()));
        Ok(item)
    }

    fn conditional_put(&self, item: Item, expected: Option<u64>) -> Result<Put, ProjectionError> {
        let put = Put::builder().table_name(&self.table).set_item(Some(item));
        let put = match expected {
            None => put.condition_expression("attribute_not_exists(pk)"),
            Some(revision) => put
                .condition_expression("revision = :revision")
                .expression_attribute_values(":revision", AttributeValue::N(revision.to_string())),
        };
        put.build().map_err(|e| ProjectionError::Corrupt(e.to_string()))
    }

    /// Writes the model unless someone else wrote the item since `expected` (false then).
    async fn put<M: ReadModel>(
        &self,
        key: &(String, String),
        model: &M,
        expected: Option<u64>,
    ) -> Result<bool, ProjectionError> {
        let item = Self::item(key, model, expected.map_or(1, |r| r + 1))?;
        let request = self.client.put_item().table_name(&self.table).set_item(Some(item));
        let request = match expected {
            None => request.condition_expression("attribute_not_exists(pk)"),
            Some(revision) => request
                .condition_expression("revision = :revision")
                .expression_attribute_values(":revision", AttributeValue::N(revision.to_string())),
        };
        match request.send().await {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => Ok(false),
            Err(e) => Err(request_error("PutItem", e).into()),
        }
    }

    /// Projects one event into model `M`, in order per stream, exactly once per position.
    pub async fn project<M: ReadModel, S: EventStore>(
        &self,
        events: &S,
        event: &RecordedEvent,
    ) -> Result<Projected, ProjectionError> {
        let projection = self.project_with::<M, S, ()>(events, event, |_, _| None).await?;
        Ok(projection.projected)
    }

    /// [`Self::project`], saying which events the write applied, with `also`'s write (given the
    /// item before, `None` when new, and after) in the same transaction as the item's: both or
    /// neither, once per applied event, never for a duplicate.
    pub async fn project_with<M: ReadModel, S: EventStore, T>(
        &self,
        events: &S,
        event: &RecordedEvent,
        also: impl Fn(Option<&M>, &M) -> Option<AlsoWrite<T>>,
    ) -> Result<Projection<T>, ProjectionError> {
        let unchanged = |projected| Projection { projected, applied: Vec::new(), also: None };
        let Ok(stream) = StreamId::parse(&event.stream_id) else { return Ok(unchanged(Projected::Ignored)) };
        let Some(key) = M::key(&stream) else { return Ok(unchanged(Projected::Ignored)) };
        let mut attempts = RETRY.attempts(Deadline::current());
        loop {
            let (mut model, revision) = match self.get::<M>(&key).await? {
                Some((model, revision)) => (model, Some(revision)),
                None => (M::default(), None),
            };
            let before = revision.map(|_| model.clone());
            let mut written = vec![event.clone()];
            let outcome = match model.apply_next(event) {
                Applied::AlreadyApplied => return Ok(unchanged(Projected::AlreadyApplied)),
                Applied::Applied => Projected::Applied,
                Applied::Gap { applied } => {
                    let missing: Vec<RecordedEvent> = events
                        .load(&stream, applied)
                        .await?
                        .into_iter()
                        .take_while(|e| e.version <= event.version)
                        .collect();
                    if missing.last().map(|e| e.version) != Some(event.version) {
                        return Err(ProjectionError::Missing {
                            stream: stream.to_string(),
                            from: applied + 1,
                            to: event.version,
                        });
                    }
                    for e in &missing {
                        model.apply_next(e);
                    }
                    let caught_up = Projected::CaughtUp { events: missing.len() };
                    written = missing;
                    caught_up
                }
            };
            let done = match also(before.as_ref(), &model) {
                None => self.put(&key, &model, revision).await?.then_some(None),
                Some(AlsoWrite { update, then }) => {
                    self.put_with(&key, &model, revision, update).await?.then_some(Some(then))
                }
            };
            if let Some(also) = done {
                return Ok(Projection { projected: outcome, applied: written, also });
            }
            // The item moved since it was read: read again and retry.
            if !attempts.again().await {
                return Err(ProjectionError::Contended(attempts.made()));
            }
        }
    }

    /// [`Self::put`] and `update` in one transaction (false when the item moved since `expected`).
    async fn put_with<M: ReadModel>(
        &self,
        key: &(String, String),
        model: &M,
        expected: Option<u64>,
        update: Update,
    ) -> Result<bool, ProjectionError> {
        let item = self.conditional_put(Self::item(key, model, expected.map_or(1, |r| r + 1))?, expected)?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(item).build())
            .transact_items(TransactWriteItem::builder().update(update).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) => match e.as_service_error() {
                // The item's condition failed, or a concurrent transaction: read again and retry.
                Some(aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(_)) => Ok(false),
                _ => Err(request_error("TransactWriteItems", e).into()),
            },
        }
    }

    /// Adds `delta` to the number `attribute` of the item at `key` (created at 0 if absent): an
    /// update for [`AlsoWrite`].
    pub fn add(&self, key: &(String, String), attribute: &str, delta: i64) -> Result<Update, ProjectionError> {
        Update::builder()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.0.clone()))
            .key("sk", AttributeValue::S(key.1.clone()))
            .update_expression("ADD #n :delta")
            .expression_attribute_names("#n", attribute)
            .expression_attribute_values(":delta", AttributeValue::N(delta.to_string()))
            .build()
            .map_err(|e| ProjectionError::Corrupt(e.to_string()))
    }

    /// The number `attribute` of the item at `key` (consistent read), 0 when absent.
    pub async fn number(&self, key: &(String, String), attribute: &str) -> Result<i64, ProjectionError> {
        Ok(self
            .read_item(key, true)
            .await?
            .and_then(|item| item.get(attribute).and_then(|v| v.as_n().ok()).and_then(|n| n.parse().ok()))
            .unwrap_or(0))
    }

    /// Adds an order event to its day's sales, once: a marker item per applied event is written
    /// in the same transaction as the counters.
    pub async fn project_sales<S: EventStore>(
        &self,
        events: &S,
        event: &RecordedEvent,
    ) -> Result<Projected, ProjectionError> {
        let Ok(stream) = StreamId::parse(&event.stream_id) else { return Ok(Projected::Ignored) };
        if stream.category() != "Order" {
            return Ok(Projected::Ignored);
        }
        let Some(mut delta) = SalesDelta::of(event) else { return Ok(Projected::Ignored) };
        if delta.completed > 0 {
            let total = placed_total(&events.load(&stream, 0).await?);
            delta.revenue =
                Some(total.ok_or(ProjectionError::Missing { stream: stream.to_string(), from: 1, to: 1 })?);
        }
        let key = sales_key(&delta.day);
        let marker: Item = HashMap::from([
            ("pk".to_owned(), AttributeValue::S(key.0.clone())),
            ("sk".to_owned(), AttributeValue::S(format!("APPLIED#{}#{}", event.stream_id, event.version))),
        ]);
        let mut attempts = RETRY.attempts(Deadline::current());
        loop {
            let (mut sales, revision) = match self.get::<DailySales>(&key).await? {
                Some((sales, revision)) => (sales, Some(revision)),
                None => (DailySales::default(), None),
            };
            sales.add(&delta);
            let counters = self.conditional_put(Self::item(&key, &sales, revision.map_or(1, |r| r + 1))?, revision)?;
            let marker = Put::builder()
                .table_name(&self.table)
                .set_item(Some(marker.clone()))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(|e| ProjectionError::Corrupt(e.to_string()))?;
            let result = self
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().put(marker).build())
                .transact_items(TransactWriteItem::builder().put(counters).build())
                .send()
                .await;
            match result {
                Ok(_) => return Ok(Projected::Applied),
                Err(e) => {
                    let reasons: Vec<String> = match e.as_service_error() {
                        Some(aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(t)) => {
                            t.cancellation_reasons().iter().map(|r| r.code().unwrap_or("None").to_owned()).collect()
                        }
                        _ => return Err(request_error("TransactWriteItems", e).into()),
                    };
                    if reasons.first().map(String::as_str) == Some("ConditionalCheckFailed") {
                        return Ok(Projected::AlreadyApplied);
                    }
                    // The counters moved (or a concurrent transaction): read again and retry.
                }
            }
            if !attempts.again().await {
                return Err(ProjectionError::Contended(attempts.made()));
            }
        }
    }

    /// Overwrites an item (the rebuild's write: no condition).
    pub async fn overwrite<M: serde::Serialize>(
        &self,
        key: &(String, String),
        model: &M,
    ) -> Result<(), ProjectionError> {
        let item = Self::item(key, model, 1)?;
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| request_error("PutItem", e).into())
    }

    /// The version a model recorded for `stream`, 0 when it has none.
    pub async fn applied_version<M: ReadModel>(&self, stream: &StreamId) -> Result<u64, ProjectionError> {
        let Some(key) = M::key(stream) else { return Ok(0) };
        Ok(self.get::<M>(&key).await?.and_then(|(mut m, _)| m.versions().get(stream.as_str()).copied()).unwrap_or(0))
    }
}

/// How far a read model is behind the event store for one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Lag {
    pub head: u64,
    pub applied: u64,
    pub behind: u64,
}

impl Lag {
    /// A model that applied up to `applied` of a stream whose head is `head`.
    pub fn new(head: u64, applied: u64) -> Self {
        Self { head, applied, behind: head.saturating_sub(applied) }
    }
}

/// How far model `M` is behind for `stream` (every model following a stream at once:
/// [`super::queries::stream_lag`]). The model is read first, then the head.
pub async fn lag<M: ReadModel, S: EventStore>(
    events: &S,
    models: &ReadModelStore,
    stream: &StreamId,
) -> Result<Lag, ProjectionError> {
    let applied = models.applied_version::<M>(stream).await?;
    Ok(Lag::new(events.head_version(stream).await?, applied))
}

/// Recomputes every read model from the event store (a full scan of the events table) into
/// `target`: what the incremental projections would hold had they seen every event once, in
/// order. Returns the number of items written per model.
pub async fn rebuild(
    dynamodb: &Client,
    events_table: &str,
    target: &ReadModelStore,
) -> Result<BTreeMap<&'static str, usize>, ProjectionError> {
    let mut streams: BTreeMap<String, Vec<RecordedEvent>> = BTreeMap::new();
    let mut start = None;
    loop {
        let page = dynamodb
            .scan()
            .table_name(events_table)
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| request_error("Scan", e))?;
        for item in page.items.unwrap_or_default() {
            let event: RecordedEvent = from_item(item).map_err(|e| ProjectionError::Corrupt(format!("event: {e}")))?;
            streams.entry(event.stream_id.clone()).or_default().push(event);
        }
        start = page.last_evaluated_key;
        if start.is_none() {
            break;
        }
    }
    for events in streams.values_mut() {
        events.sort_by_key(|e| e.version);
    }
    let mut written = BTreeMap::new();
    written.insert(
        crate::readmodel::OrderView::NAME,
        rebuild_model::<crate::readmodel::OrderView>(&streams, target).await?,
    );
    written.insert(
        crate::readmodel::CustomerOrder::NAME,
        rebuild_model::<crate::readmodel::CustomerOrder>(&streams, target).await?,
    );
    written.insert(
        crate::readmodel::InventoryLevel::NAME,
        rebuild_model::<crate::readmodel::InventoryLevel>(&streams, target).await?,
    );
    let mut days: BTreeMap<String, DailySales> = BTreeMap::new();
    for (_, events) in streams.iter().filter(|(stream, _)| stream.starts_with("Order-")) {
        for mut delta in events.iter().filter_map(SalesDelta::of) {
            if delta.completed > 0 {
                delta.revenue = placed_total(events);
            }
            days.entry(delta.day.clone()).or_default().add(&delta);
        }
    }
    for (day, sales) in &days {
        target.overwrite(&sales_key(day), sales).await?;
    }
    written.insert("daily-sales", days.len());
    Ok(written)
}

async fn rebuild_model<M: ReadModel>(
    streams: &BTreeMap<String, Vec<RecordedEvent>>,
    target: &ReadModelStore,
) -> Result<usize, ProjectionError> {
    let mut models: BTreeMap<(String, String), M> = BTreeMap::new();
    for (stream, events) in streams {
        let Ok(id) = StreamId::parse(stream) else { continue };
        let Some(key) = M::key(&id) else { continue };
        let model = models.entry(key).or_default();
        for e in events {
            model.apply_next(e);
        }
    }
    for (key, model) in &models {
        target.overwrite(key, model).await?;
    }
    Ok(models.len())
}
