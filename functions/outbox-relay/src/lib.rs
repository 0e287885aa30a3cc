//! Outbox relay: publishes every event the store commits (its DynamoDB stream is the outbox) to
//! the custom EventBridge bus. detail-type = event type, source = `order-saga.<Category>`,
//! detail = the stored envelope plus `id` = `<stream>/<version>`, the same for every publication
//! of a stream position, so consumers can de-duplicate.
//!
//! Entries go out in batches within PutEvents' limits (10 entries, 256 KB). Only the entries
//! that failed (`FailedEntryCount`) are sent again, with jittered backoff; if some still fail,
//! the stream batch reports the first unpublished record, so the stream resumes there: nothing
//! is skipped or lost.

use std::future::Future;

use aws_lambda_events::event::dynamodb::Event;
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use serde_json::{Value, json};
use shared::config::{ConfigError, Vars, required};
use shared::eventstore::{RecordedEvent, StreamId};
use shared::retry::RetryPolicy;

pub const SOURCE_PREFIX: &str = "order-saga.";
/// PutEvents takes 10 entries and 256 KB per call.
pub const MAX_ENTRIES: usize = 10;
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// An envelope larger than this is published without its payload (a claim check): consumers
/// read the event from the store.
pub const MAX_DETAIL_BYTES: usize = 200 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct BusEntry {
    pub source: String,
    pub detail_type: String,
    pub detail: String,
}

impl BusEntry {
    fn size(&self) -> usize {
        self.source.len() + self.detail_type.len() + self.detail.len()
    }
}

/// The bus, at the edge: EventBridge in production, a fault-injecting wrapper in tests.
pub trait Bus: Send + Sync {
    /// Puts the entries; per entry, `None` if accepted or the error code if not.
    fn put(&self, entries: &[BusEntry]) -> impl Future<Output = Result<Vec<Option<String>>, String>> + Send;
}

pub struct EventBridgeBus {
    pub client: aws_sdk_eventbridge::Client,
    pub bus_name: String,
}

impl EventBridgeBus {
    /// `EVENT_BUS_NAME`.
    pub fn new(client: aws_sdk_eventbridge::Client, vars: Vars<'_>) -> Result<Self, ConfigError> {
        Ok(Self { client, bus_name: required(vars, "EVENT_BUS_NAME")? })
    }
}

impl Bus for EventBridgeBus {
    async fn put(&self, entries: &[BusEntry]) -> Result<Vec<Option<String>>, String> {
        let entries = entries.iter().map(|e| {
            aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                .event_bus_name(&self.bus_name)
                .source(&e.source)
                .detail_type(&e.detail_type)
                .detail(&e.detail)
                .build()
        });
        let out = self
            .client
            .put_events()
            .set_entries(Some(entries.collect()))
            .send()
            .await
            .map_err(|e| aws_sdk_eventbridge::error::DisplayErrorContext(&e).to_string())?;
        Ok(out.entries().iter().map(|r| r.error_code().map(str::to_owned)).collect())
    }
}

/// The entry for a stored event.
pub fn entry(event: &RecordedEvent) -> BusEntry {
    let category = event.stream_id.split_once('-').map_or("Unknown", |(c, _)| c);
    let mut detail = serde_json::to_value(event).unwrap_or(Value::Null);
    detail["id"] = json!(format!("{}/{}", event.stream_id, event.version));
    let mut text = detail.to_string();
    if text.len() > MAX_DETAIL_BYTES {
        detail["payload"] = Value::Null;
        detail["payloadOmitted"] = json!(true);
        text = detail.to_string();
    }
    BusEntry { source: format!("{SOURCE_PREFIX}{category}"), detail_type: event.event_type.clone(), detail: text }
}

pub struct Relay<B> {
    pub bus: B,
    pub retry: RetryPolicy,
}

/// Publishes `entries`, sending again only those that failed; `Err(i)` names the first entry
/// still unpublished after the retries.
async fn publish<B: Bus>(relay: &Relay<B>, entries: &[BusEntry]) -> Result<(), usize> {
    let mut pending: Vec<usize> = (0..entries.len()).collect();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let batch: Vec<BusEntry> = pending.iter().map(|&i| entries[i].clone()).collect();
        let still = match relay.bus.put(&batch).await {
            Ok(results) if results.len() == batch.len() => pending
                .iter()
                .zip(results)
                .filter_map(|(&i, error)| error.map(|code| (i, code)))
                .map(|(i, code)| {
                    tracing::warn!(entry = i, %code, "entry not accepted by the bus");
                    i
                })
                .collect(),
            Ok(_) => pending.clone(),
            Err(e) => {
                tracing::warn!(error = %e, "PutEvents failed");
                pending.clone()
            }
        };
        if still.is_empty() {
            return Ok(());
        }
        if !relay.retry.allows_another(attempt) {
            return Err(still[0]);
        }
        pending = still;
        tokio::time::sleep(relay.retry.delay(attempt - 1)).await;
    }
}

/// Relays a stream batch. On a failure, the response names the first unpublished record.
pub async fn handle<B: Bus>(relay: &Relay<B>, batch: Event) -> DynamoDbEventResponse {
    let mut response = DynamoDbEventResponse::default();
    let mut fail_at = |sequence: Option<String>| {
        let mut failure = DynamoDbBatchItemFailure::default();
        failure.item_identifier = sequence;
        response.batch_item_failures.push(failure);
    };
    let mut records = Vec::new();
    for record in batch.records.into_iter().filter(|r| r.event_name == "INSERT") {
        let sequence = record.change.sequence_number.clone();
        match serde_dynamo::from_item::<_, RecordedEvent>(record.change.new_image) {
            Ok(event) if StreamId::parse(&event.stream_id).is_ok() => records.push((sequence, entry(&event))),
            Ok(event) => tracing::error!(stream = %event.stream_id, "skipping an item that is not an event"),
            // The store wrote it; if it does not decode, retrying will not help: the mapping's
            // retries end in its OnFailure destination, which keeps the record.
            Err(e) => {
                tracing::error!(error = %e, "undecodable event in the store's stream");
                fail_at(sequence);
                return response;
            }
        }
    }
    let mut start = 0;
    while start < records.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < records.len() && end - start < MAX_ENTRIES && bytes + records[end].1.size() <= MAX_BATCH_BYTES {
            bytes += records[end].1.size();
            end += 1;
        }
        let end = end.max(start + 1);
        let entries: Vec<BusEntry> = records[start..end].iter().map(|(_, e)| e.clone()).collect();
        if let Err(index) = publish(relay, &entries).await {
            fail_at(records[start + index].0.clone());
            return response;
        }
        start = end;
    }
    response
}
