//! Outbox relay: publishes every event the store commits (its DynamoDB stream is the outbox) to
//! the custom EventBridge bus. detail-type = event type, source = `order-saga.<Category>`,
//! detail = the stored envelope plus `id` = `<stream>/<version>`, the same for every publication
//! of a stream position, so consumers can de-duplicate.
//!
//! Entries go out in PutEvents calls within its limits (10 entries, 256 KB), several calls at
//! once. Only the entries that failed (`FailedEntryCount`) are sent again, with jittered
//! backoff; if some still fail, or the invocation's deadline nears, the stream batch reports the
//! first unpublished record, so the stream resumes there: nothing is skipped or lost, and no
//! batch is retried whole forever.

use std::future::Future;
use std::ops::Range;

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use serde_json::{Value, json};
use shared::config::{ConfigError, Vars, required};
use shared::deadline::Deadline;
use shared::eventstore::{RecordedEvent, StreamId};
use shared::lambda::batch::{Batch, DeadLetters};
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
    /// The event's X-Ray trace: EventBridge continues it to the rule's targets (the detail
    /// carries it too, for consumers of services that drop it).
    pub trace_header: Option<String>,
}

impl BusEntry {
    fn size(&self) -> usize {
        // (The trace header counted too: the limit's sum is generous to be sure of.)
        self.source.len()
            + self.detail_type.len()
            + self.detail.len()
            + self.trace_header.as_ref().map_or(0, String::len)
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
                .set_trace_header(e.trace_header.clone())
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
    BusEntry {
        source: format!("{SOURCE_PREFIX}{category}"),
        detail_type: event.event_type.clone(),
        detail: text,
        trace_header: event.trace_header.clone(),
    }
}

pub struct Relay<B, D> {
    pub bus: B,
    pub retry: RetryPolicy,
    /// Where a record that is not a stored event goes, with the reason (`DEAD_LETTER_QUEUE_URL`).
    pub dead_letters: D,
}

/// PutEvents calls in flight at once. EventBridge's PutEvents quota is thousands of entries per
/// second per account; eight calls of ten entries keep a 100-record stream batch to about two
/// round trips without bursting into throttling.
pub const PUBLISH_CONCURRENCY: usize = 8;

/// Publishes `entries`, sending again only those that failed, never past `deadline`; `Err(i)`
/// names the first entry still unpublished.
async fn publish<B: Bus, D>(relay: &Relay<B, D>, entries: &[BusEntry], deadline: &Deadline) -> Result<(), usize> {
    let mut pending: Vec<usize> = (0..entries.len()).collect();
    let mut attempts = relay.retry.attempts(*deadline);
    loop {
        let batch: Vec<BusEntry> = pending.iter().map(|&i| entries[i].clone()).collect();
        pending = match deadline.run(relay.bus.put(&batch)).await {
            // Cut off: the call may or may not have landed; the stream delivers these again and
            // consumers de-duplicate by `id`.
            None => return Err(pending[0]),
            Some(Ok(results)) if results.len() == batch.len() => pending
                .iter()
                .zip(results)
                .filter_map(|(&i, error)| error.map(|code| (i, code)))
                .map(|(i, code)| {
                    tracing::warn!(entry = i, %code, "entry not accepted by the bus");
                    i
                })
                .collect(),
            Some(Ok(_)) => pending.clone(),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "PutEvents failed");
                pending.clone()
            }
        };
        // Only the refused entries are sent again.
        if pending.is_empty() {
            return Ok(());
        }
        if !attempts.again().await {
            return Err(pending[0]);
        }
    }
}

/// Splits entries into PutEvents calls: at most [`MAX_ENTRIES`] and [`MAX_BATCH_BYTES`] each.
fn chunks(entries: &[BusEntry]) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < entries.len() && end - start < MAX_ENTRIES && bytes + entries[end].size() <= MAX_BATCH_BYTES {
            bytes += entries[end].size();
            end += 1;
        }
        let end = end.max(start + 1);
        chunks.push(start..end);
        start = end;
    }
    chunks
}

/// Relays a stream batch, up to [`PUBLISH_CONCURRENCY`] PutEvents calls at a time, until
/// `deadline` (see [`Batch::stream`]). On a failure or at the deadline, the response
/// names the first unpublished record, so the stream resumes there: what was published before it
/// is not sent again, and a batch too large for one invocation still moves forward.
pub async fn handle<B: Bus, D: DeadLetters>(
    relay: &Relay<B, D>,
    batch: Event,
    deadline: Deadline,
) -> DynamoDbEventResponse {
    let put = |entries: Vec<BusEntry>| async move {
        let unpublished = publish(relay, &entries, &deadline).await;
        unpublished.map_err(|i| (i, format!("{} of {} entries unpublished", entries.len() - i, entries.len())))
    };
    let relaying = Batch::new(&relay.dead_letters, deadline).concurrently(PUBLISH_CONCURRENCY);
    relaying.stream(&batch, stored_event, chunks, put).await
}

/// The entry of an inserted event; `None` for any other change. Something other than the store
/// wrote to its table if it is not an event: retrying will not make it one, and failing would
/// hold back (and, once the retries run out, skip) every event behind it, so it is parked.
fn stored_event(record: &EventRecord) -> Result<Option<BusEntry>, String> {
    if record.event_name != "INSERT" {
        return Ok(None);
    }
    match serde_dynamo::from_item::<_, RecordedEvent>(record.change.new_image.clone()) {
        Ok(event) if StreamId::parse(&event.stream_id).is_ok() => Ok(Some(entry(&event))),
        Ok(event) => Err(format!("not an event: stream id {:?}", event.stream_id)),
        Err(e) => Err(format!("not an event envelope: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use shared::lambda::batch::KeptDeadLetters;

    use super::*;

    /// A bus that takes `latency` per call, refuses the entries named in `refuse` on their first
    /// try, and records what it accepted and how many calls were in flight at once.
    #[derive(Default)]
    struct RecordingBus {
        latency: Duration,
        refuse: Mutex<HashSet<String>>,
        accepted: Mutex<Vec<String>>,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
    }

    impl Bus for RecordingBus {
        async fn put(&self, entries: &[BusEntry]) -> Result<Vec<Option<String>>, String> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.latency).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(entries
                .iter()
                .map(|e| {
                    let id = serde_json::from_str::<Value>(&e.detail).expect("detail")["id"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned();
                    if self.refuse.lock().expect("lock").remove(&id) {
                        Some("ThrottlingException".to_owned())
                    } else {
                        self.accepted.lock().expect("lock").push(id);
                        None
                    }
                })
                .collect())
        }
    }

    /// A stream batch of `n` committed events, sequence numbers `1..=n`.
    fn batch(n: u64) -> Event {
        let mut event = Event::default();
        event.records = (1..=n)
            .map(|v| {
                let recorded = RecordedEvent {
                    stream_id: "Order-o1".into(),
                    version: v,
                    event_id: format!("e{v}"),
                    event_type: "OrderPlaced".into(),
                    schema_version: 1,
                    payload: json!({ "n": v }),
                    correlation_id: "c".into(),
                    causation_id: None,
                    idempotency_key: None,
                    trace_header: None,
                    recorded_at: "2026-11-22T00:00:00Z".into(),
                };
                let mut record = EventRecord::default();
                record.event_name = "INSERT".into();
                record.change.sequence_number = Some(v.to_string());
                record.change.new_image = serde_dynamo::to_item(&recorded).expect("item");
                record
            })
            .collect();
        event
    }

    fn relay(bus: RecordingBus) -> Relay<RecordingBus, KeptDeadLetters> {
        Relay {
            bus,
            retry: RetryPolicy { max_attempts: 3, ..RetryPolicy::default() },
            dead_letters: KeptDeadLetters::default(),
        }
    }

    fn failed_at(response: &DynamoDbEventResponse) -> Vec<Option<String>> {
        response.batch_item_failures.iter().map(|f| f.item_identifier.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_published_with_bounded_parallel_calls() {
        // Given a bus that takes 2 s per call
        let relay = relay(RecordingBus { latency: Duration::from_secs(2), ..RecordingBus::default() });

        // When 100 records are relayed with 9 s to go
        let response = handle(&relay, batch(100), Deadline::after(Duration::from_secs(9))).await;

        // Then all 100 are published, in 2 rounds of at most 8 calls: 4 s, not 20
        assert_eq!(failed_at(&response), Vec::<Option<String>>::new());
        assert_eq!(relay.bus.accepted.lock().expect("lock").len(), 100);
        assert_eq!(relay.bus.most_in_flight.load(Ordering::SeqCst), PUBLISH_CONCURRENCY);
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_deadline_the_batch_reports_the_first_unpublished_record() {
        // Given a bus so slow that only the first round of calls fits before the deadline
        let relay = relay(RecordingBus { latency: Duration::from_secs(3), ..RecordingBus::default() });

        // When 100 records are relayed with 4 s to go
        let response = handle(&relay, batch(100), Deadline::after(Duration::from_secs(4))).await;

        // Then the first 80 (8 calls of 10) are out and the stream resumes at record 81
        assert_eq!(failed_at(&response), vec![Some("81".to_owned())]);
        let accepted = relay.bus.accepted.lock().expect("lock").clone();
        let expected: HashSet<String> = (1..=80).map(|v| format!("Order-o1/{v}")).collect();
        assert_eq!(accepted.into_iter().collect::<HashSet<_>>(), expected);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_entry_is_sent_again_alone() {
        // Given a bus that refuses record 15 once
        let bus = RecordingBus::default();
        bus.refuse.lock().expect("lock").insert("Order-o1/15".into());
        let relay = relay(bus);

        // When 20 records are relayed
        let response = handle(&relay, batch(20), Deadline::never()).await;

        // Then each is accepted exactly once
        assert!(response.batch_item_failures.is_empty());
        let mut accepted = relay.bus.accepted.lock().expect("lock").clone();
        accepted.sort();
        accepted.dedup();
        assert_eq!(accepted.len(), 20);
        assert_eq!(relay.bus.accepted.lock().expect("lock").len(), 20, "no entry sent twice once accepted");
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_refused_past_its_retries_stops_the_batch_there() {
        // Given a bus that refuses record 25 on every try
        struct Refusing(RecordingBus);
        impl Bus for Refusing {
            async fn put(&self, entries: &[BusEntry]) -> Result<Vec<Option<String>>, String> {
                self.0.refuse.lock().expect("lock").insert("Order-o1/25".into());
                self.0.put(entries).await
            }
        }
        let relay = Relay {
            bus: Refusing(RecordingBus::default()),
            retry: RetryPolicy { max_attempts: 3, ..RetryPolicy::default() },
            dead_letters: KeptDeadLetters::default(),
        };

        // When 40 records are relayed
        let response = handle(&relay, batch(40), Deadline::never()).await;

        // Then the stream resumes at record 25, and nothing before it is missing
        assert_eq!(failed_at(&response), vec![Some("25".to_owned())]);
        let accepted: HashSet<String> = relay.bus.0.accepted.lock().expect("lock").iter().cloned().collect();
        assert!((1..25).all(|v| accepted.contains(&format!("Order-o1/{v}"))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_that_is_not_an_event_is_dead_lettered_and_the_rest_published() {
        // Given a batch of 30 events with two foreign items among them (one with no envelope,
        // one whose stream id is not a stream's)
        let relay = relay(RecordingBus::default());
        let mut batch = batch(30);
        batch.records[9].change.new_image =
            serde_dynamo::to_item(json!({ "streamId": "x", "version": 10 })).expect("item");
        let mut bad_stream = batch.records[19].change.new_image.clone();
        bad_stream.insert("streamId".into(), serde_dynamo::AttributeValue::S("NoSeparator".into()));
        batch.records[19].change.new_image = bad_stream;

        // When the batch is relayed
        let response = handle(&relay, batch, Deadline::never()).await;

        // Then nothing is retried, the 28 events are published, and both items are parked with
        // their reasons
        assert!(response.batch_item_failures.is_empty(), "{:?}", failed_at(&response));
        let accepted: HashSet<String> = relay.bus.accepted.lock().expect("lock").iter().cloned().collect();
        let expected: HashSet<String> =
            (1..=30).filter(|v| *v != 10 && *v != 20).map(|v| format!("Order-o1/{v}")).collect();
        assert_eq!(accepted, expected);
        let reasons = relay.dead_letters.reasons();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].starts_with("not an event envelope"), "{reasons:?}");
        assert!(reasons[1].starts_with("not an event: stream id"), "{reasons:?}");
    }

    /// Arbitrary `NewImage`s on the store's stream: each record is published (a stored event,
    /// with its `id`) or dead-lettered with a short reason; none panics, none holds back the stream.
    mod properties {
        use proptest::prelude::*;
        use serde_dynamo::{AttributeValue, Item};
        use shared::testing::*;
        use shared::text::MAX_REASON;

        use super::*;

        /// Every entry put, accepted.
        #[derive(Default)]
        struct Published(Mutex<Vec<BusEntry>>);

        impl Bus for Published {
            async fn put(&self, entries: &[BusEntry]) -> Result<Vec<Option<String>>, String> {
                self.0.lock().expect("lock").extend(entries.iter().cloned());
                Ok(vec![None; entries.len()])
            }
        }

        /// The sample's committed `OrderPlaced` (stream `Order-ord-happy`, version 1).
        fn sample() -> Item {
            let sample: Value = serde_json::from_str(include_str!("../../../events/outbox-relay/committed.json"))
                .expect("the sample event");
            let event: Event = serde_json::from_value(sample).expect("a stream event");
            event.records.into_iter().next().expect("a record").change.new_image
        }

        /// The sample damaged so that it is not a stored event.
        fn broken() -> impl Strategy<Value = Item> {
            let stream_id = prop_oneof![
                "[A-Za-z0-9]{0,20}",
                "[0-9_][A-Za-z0-9]{0,8}-[a-z0-9]{1,8}",
                "Order-[a-z]{1,8}[/ #?][a-z]{0,8}",
                (257usize..20_000).prop_map(|n| format!("Order-{}", "o".repeat(n))),
            ];
            prop_oneof![
                not_an_event(sample),
                stream_id.prop_map(|id| with(sample(), "streamId", AttributeValue::S(id)))
            ]
        }

        /// Anything: attributes of the sample replaced, or any map at all.
        fn arbitrary() -> impl Strategy<Value = Item> {
            prop_oneof![
                prop::collection::vec((name(), attribute()), 1..4).prop_map(|changes| {
                    changes.into_iter().fold(sample(), |item, (name, value)| with(item, &name, value))
                }),
                prop::collection::hash_map(name(), attribute(), 0..8).prop_map(Item::from),
            ]
        }

        #[derive(Debug, Clone)]
        enum Image {
            /// The sample at its own stream position, maybe without its optional attributes, its
            /// payload maybe anything: published.
            Valid(Vec<&'static str>, Option<AttributeValue>),
            /// Dead-lettered.
            Broken(Item),
            /// Either.
            Any(Item),
        }

        fn image() -> impl Strategy<Value = Image> {
            let optional = prop::sample::subsequence(vec!["causationId", "idempotencyKey", "traceHeader"], 0..=3);
            prop_oneof![
                (optional, proptest::option::of(json_attribute()))
                    .prop_map(|(dropped, payload)| Image::Valid(dropped, payload)),
                broken().prop_map(Image::Broken),
                arbitrary().prop_map(Image::Any),
            ]
        }

        fn record(i: usize, image: &Image) -> EventRecord {
            let item = match image {
                Image::Valid(dropped, payload) => {
                    let mut item = sample();
                    for name in dropped {
                        item.remove(*name);
                    }
                    if let Some(payload) = payload {
                        item.insert("payload".into(), payload.clone());
                    }
                    item.insert("streamId".into(), AttributeValue::S(format!("Order-o{i}")));
                    with(item, "version", AttributeValue::N((i + 1).to_string()))
                }
                Image::Broken(item) | Image::Any(item) => item.clone(),
            };
            inserted(i, item)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn any_new_image_is_published_or_dead_lettered_with_a_short_reason(
                images in prop::collection::vec(image(), 1..6),
            ) {
                let mut event = Event::default();
                event.records = images.iter().enumerate().map(|(i, image)| record(i, image)).collect();
                let (bus, dead_letters) = (Published::default(), Parked::default());
                let relay = Relay { bus, retry: RetryPolicy::default(), dead_letters };
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                let response = runtime.block_on(handle(&relay, event, Deadline::never()));

                prop_assert!(response.batch_item_failures.is_empty(), "{:?}", failed_at(&response));
                let published = relay.bus.0.lock().expect("lock").clone();
                let parked = relay.dead_letters.0.lock().expect("lock").clone();
                prop_assert_eq!(published.len() + parked.len(), images.len(), "each record published or parked");
                for (_, reason) in &parked {
                    prop_assert!(reason.starts_with("not an event"), "{}", reason);
                    prop_assert!(reason.len() <= MAX_REASON, "{} bytes: {}", reason.len(), reason);
                }
                let details: Vec<Value> = published
                    .iter()
                    .map(|e| serde_json::from_str(&e.detail))
                    .collect::<Result<_, _>>()
                    .map_err(|e| TestCaseError::fail(format!("a detail is not JSON: {e}")))?;
                for (i, image) in images.iter().enumerate() {
                    let was_parked = parked.iter().any(|(at, _)| *at == i.to_string());
                    match image {
                        Image::Valid(..) => {
                            prop_assert!(!was_parked, "record {} parked: {:?}", i, parked);
                            let id = format!("Order-o{i}/{}", i + 1);
                            let found = published.iter().zip(&details).find(|(_, d)| d["id"] == id.as_str());
                            let Some((entry, detail)) = found else {
                                return Err(TestCaseError::fail(format!("{id} not published")));
                            };
                            prop_assert_eq!(&entry.source, "order-saga.Order");
                            prop_assert_eq!(&entry.detail_type, "OrderPlaced");
                            prop_assert_eq!(&detail["streamId"], &Value::String(format!("Order-o{i}")));
                        }
                        Image::Broken(_) => prop_assert!(was_parked, "record {} not dead-lettered", i),
                        Image::Any(_) => {}
                    }
                }
            }
        }
    }
}
