//! Saga starter: fed by the event store's DynamoDB stream (filtered to `OrderPlaced` in the
//! template), it starts the order saga with the order id as the execution name. A replayed or
//! duplicated record therefore cannot start a second saga: Step Functions refuses the name.
//! The order is placed by one write (the event); the saga starts from what was committed: no
//! dual write.
//!
//! The records of a batch start concurrently (at most [`START_CONCURRENCY`] at once); the
//! response still names the first record, in stream order, that did not start, so nothing
//! after a failure is skipped. Work stops before the invocation's deadline in the same way.

use std::future::Future;

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use serde_json::json;
use shared::adapters::aws::LazyClient;
use shared::adapters::sqs::SqsDeadLetters;
use shared::aggregate::decode_event;
use shared::config::{ConfigError, Vars, required};
use shared::deadline::Deadline;
use shared::domain::order::{OrderEvent, PlaceOrder};
use shared::eventstore::RecordedEvent;
use shared::lambda::batch::{Batch, DeadLetters, one_by_one};
use tracing::Instrument;

/// `StartExecution` calls in flight at once: Step Functions' StartExecution quota (a bucket of
/// 1,300 refilled at 300/s in the large regions) is far above what one batch asks.
pub const START_CONCURRENCY: usize = 10;

/// Starts executions of the saga's state machine; Step Functions in production, a seam for tests.
pub trait Executions: Send + Sync {
    /// Starts execution `name` in the X-Ray trace `trace_header`; an execution of that name
    /// already existing is `AlreadyStarted`.
    fn start(
        &self,
        name: &str,
        input: String,
        trace_header: Option<&str>,
    ) -> impl Future<Output = Result<Outcome, String>> + Send;
}

pub struct StepFunctions {
    pub client: aws_sdk_sfn::Client,
    pub state_machine_arn: String,
}

impl Executions for StepFunctions {
    async fn start(&self, name: &str, input: String, trace_header: Option<&str>) -> Result<Outcome, String> {
        // The order's trace, not this invocation's: the saga continues the flow that placed it.
        let started = self
            .client
            .start_execution()
            .state_machine_arn(&self.state_machine_arn)
            .name(name)
            .input(input)
            .set_trace_header(trace_header.map(str::to_owned))
            .send()
            .await;
        match started {
            Ok(out) => {
                tracing::info!(execution = out.execution_arn(), "saga started");
                Ok(Outcome::Started)
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_execution_already_exists()) => {
                tracing::info!("saga already started for this order");
                Ok(Outcome::AlreadyStarted)
            }
            Err(e) => Err(aws_sdk_sfn::error::DisplayErrorContext(&e).to_string()),
        }
    }
}

pub struct Starter<E, D> {
    pub executions: E,
    pub dead_letters: D,
}

impl Starter<StepFunctions, SqsDeadLetters> {
    /// `STATE_MACHINE_ARN` and `DEAD_LETTER_QUEUE_URL`.
    pub fn new(
        sfn: aws_sdk_sfn::Client,
        sqs: impl Into<LazyClient<aws_sdk_sqs::Client>>,
        vars: Vars<'_>,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            executions: StepFunctions { client: sfn, state_machine_arn: required(vars, "STATE_MACHINE_ARN")? },
            dead_letters: SqsDeadLetters { client: sqs.into(), queue_url: required(vars, "DEAD_LETTER_QUEUE_URL")? },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Started,
    AlreadyStarted,
}

/// Starts a saga per `OrderPlaced` record, concurrently (see [`Batch::stream`]). On a failure
/// that a retry may cure, or at the deadline, reports the first such record in stream order, so
/// the stream resumes from it: nothing after it is skipped (records after it that did start are
/// started again, and Step Functions refuses the duplicate name). A record that will never
/// decode must not block the stream: it is parked with the reason.
pub async fn handle<E: Executions, D: DeadLetters>(
    starter: &Starter<E, D>,
    event: Event,
    deadline: Deadline,
) -> DynamoDbEventResponse {
    let work = |placed: Vec<(RecordedEvent, PlaceOrder)>| async move {
        for (recorded, order) in placed {
            start(&starter.executions, recorded, order).await.map_err(|reason| (0, reason))?;
        }
        Ok(())
    };
    let batch = Batch::new(&starter.dead_letters, deadline).concurrently(START_CONCURRENCY);
    batch.stream(&event, order_placed, one_by_one, work).await
}

/// The order an `OrderPlaced` insert placed; `None` for any other record.
fn order_placed(record: &EventRecord) -> Result<Option<(RecordedEvent, PlaceOrder)>, String> {
    if record.event_name != "INSERT" {
        return Ok(None);
    }
    let recorded = serde_dynamo::from_item::<_, RecordedEvent>(record.change.new_image.clone())
        .map_err(|e| format!("not an event envelope: {e}"))?;
    match decode_event::<OrderEvent>(&recorded) {
        Ok(OrderEvent::OrderPlaced(order)) => Ok(Some((recorded, order))),
        Ok(_) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

async fn start<E: Executions>(executions: &E, recorded: RecordedEvent, order: PlaceOrder) -> Result<(), String> {
    let input = json!({
        "order": order,
        "correlationId": recorded.correlation_id,
        // The state machine hands it to every step command (`null` when the order had none).
        "traceHeader": recorded.trace_header,
        "placedAt": recorded.recorded_at,
        "results": {},
        "compensations": {},
    });
    let span = shared::telemetry::event_span(&recorded);
    let trace = recorded.trace_header.as_deref();
    async {
        let started = executions.start(order.order_id.as_str(), input.to_string(), trace).await;
        if let Err(reason) = &started {
            tracing::warn!(%reason, "saga not started");
        }
        started.map(drop)
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use serde_json::Value;
    use shared::lambda::batch::KeptDeadLetters;

    use super::*;

    /// Executions that take `latency` each, and record what started and how many starts were in
    /// flight at once.
    #[derive(Default)]
    struct Recording {
        latency: Duration,
        started: Mutex<Vec<String>>,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
    }

    impl Executions for Recording {
        async fn start(&self, name: &str, _input: String, _trace: Option<&str>) -> Result<Outcome, String> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.latency).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let mut started = self.started.lock().expect("lock");
            if started.iter().any(|s| s == name) {
                return Ok(Outcome::AlreadyStarted);
            }
            started.push(name.to_owned());
            Ok(Outcome::Started)
        }
    }

    /// The sample's `OrderPlaced` record for orders `o1..=on`, sequence numbers `1..=n`.
    fn batch(n: usize) -> Event {
        let sample: Value = serde_json::from_str(include_str!("../../../events/saga-starter/order-placed.json"))
            .expect("the sample event");
        let record = sample["Records"][0].clone();
        let records: Vec<Value> = (1..=n)
            .map(|i| {
                let mut r = record.clone();
                r["dynamodb"]["SequenceNumber"] = json!(i.to_string());
                r["dynamodb"]["NewImage"]["streamId"]["S"] = json!(format!("Order-o{i}"));
                r["dynamodb"]["NewImage"]["payload"]["M"]["orderId"]["S"] = json!(format!("o{i}"));
                r
            })
            .collect();
        serde_json::from_value(json!({ "Records": records })).expect("a stream event")
    }

    fn failed_at(response: &DynamoDbEventResponse) -> Vec<Option<String>> {
        response.batch_item_failures.iter().map(|f| f.item_identifier.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_starts_concurrently_one_execution_per_order() {
        // Given Step Functions taking 500 ms per start
        let starter = Starter {
            executions: Recording { latency: Duration::from_millis(500), ..Recording::default() },
            dead_letters: KeptDeadLetters::default(),
        };

        // When a batch of 25 orders (the first one twice) arrives
        let mut event = batch(25);
        event.records.push(event.records[0].clone());
        let began = tokio::time::Instant::now();
        let response = handle(&starter, event, Deadline::never()).await;

        // Then 25 sagas start, at most START_CONCURRENCY at a time: 3 rounds, not 26
        assert!(response.batch_item_failures.is_empty());
        assert_eq!(starter.executions.started.lock().expect("lock").len(), 25);
        assert_eq!(starter.executions.most_in_flight.load(Ordering::SeqCst), START_CONCURRENCY);
        assert_eq!(began.elapsed(), Duration::from_millis(1_500));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreadable_order_placed_is_parked_and_the_batch_goes_on() {
        // Given a batch whose second record has an OrderPlaced payload that does not decode
        let mut event = batch(3);
        let mut bad = serde_json::to_value(&event.records[1]).expect("record");
        bad["dynamodb"]["NewImage"]["payload"] = json!({ "M": { "orderId": { "N": "12" } } });
        event.records[1] = serde_json::from_value(bad).expect("record");
        let starter = Starter { executions: Recording::default(), dead_letters: KeptDeadLetters::default() };

        // When it is handled
        let response = handle(&starter, event, Deadline::never()).await;

        // Then it is dead-lettered with the reason and the two good orders start
        assert!(response.batch_item_failures.is_empty());
        assert_eq!(starter.dead_letters.reasons().len(), 1);
        assert_eq!(starter.executions.started.lock().expect("lock").len(), 2);
    }

    /// Arbitrary `NewImage`s on the store's stream: a valid `OrderPlaced` starts its saga, a
    /// damaged one is dead-lettered with a short reason; none panics, none holds back the stream.
    mod properties {
        use proptest::prelude::*;
        use serde_dynamo::{AttributeValue, Item};
        use shared::testing::*;
        use shared::text::MAX_REASON;

        use super::*;

        const ORDER_FIELDS: &[&str] =
            &["orderId", "customerId", "currency", "lines", "paymentToken", "shippingAddress", "total"];

        /// The sample `OrderPlaced` image (order `o1`).
        fn sample() -> Item {
            batch(1).records.remove(0).change.new_image
        }

        /// The sample damaged so that no reader accepts it as an `OrderPlaced`.
        fn broken() -> impl Strategy<Value = Item> {
            prop_oneof![
                not_an_event(sample),
                // A schema version from the future.
                (2u32..).prop_map(|n| with(sample(), "schemaVersion", AttributeValue::N(n.to_string()))),
                // An event type no one knows, long.
                ("[A-Za-z]{1,4}", 1usize..20_000).prop_map(|(s, n)| with(
                    sample(),
                    "eventType",
                    AttributeValue::S(format!("X{}", s.repeat(n)))
                )),
                // A payload that is not an order.
                prop_oneof![
                    text().prop_map(AttributeValue::S),
                    number().prop_map(AttributeValue::N),
                    Just(AttributeValue::Bool(false)),
                    Just(AttributeValue::L(vec![])),
                ]
                .prop_map(|value| with(sample(), "payload", value)),
            ]
        }

        /// Anything: attributes of the sample, or of its order, replaced; or any map at all.
        fn arbitrary() -> impl Strategy<Value = Item> {
            prop_oneof![
                prop::collection::vec((name(), attribute()), 1..4).prop_map(|changes| {
                    changes.into_iter().fold(sample(), |item, (name, value)| with(item, &name, value))
                }),
                (prop::sample::select(ORDER_FIELDS), attribute()).prop_map(|(field, value)| {
                    let mut item = sample();
                    if let Some(AttributeValue::M(order)) = item.get_mut("payload") {
                        order.insert(field.to_owned(), value);
                    }
                    item
                }),
                prop::collection::hash_map(name(), attribute(), 0..8).prop_map(Item::from),
            ]
        }

        #[derive(Debug, Clone)]
        enum Image {
            /// The sample, for its own order, maybe without its optional attributes: it starts.
            Valid(Vec<&'static str>),
            /// Dead-lettered.
            Broken(Item),
            /// Either.
            Any(Item),
        }

        fn image() -> impl Strategy<Value = Image> {
            let optional = prop::sample::subsequence(vec!["causationId", "idempotencyKey", "traceHeader"], 0..=3);
            prop_oneof![
                optional.prop_map(Image::Valid),
                broken().prop_map(Image::Broken),
                arbitrary().prop_map(Image::Any),
            ]
        }

        fn record(i: usize, image: &Image) -> EventRecord {
            let item = match image {
                Image::Valid(dropped) => {
                    let mut item = sample();
                    for name in dropped {
                        item.remove(*name);
                    }
                    item.insert("streamId".into(), AttributeValue::S(format!("Order-o{i}")));
                    if let Some(AttributeValue::M(order)) = item.get_mut("payload") {
                        order.insert("orderId".into(), AttributeValue::S(format!("o{i}")));
                    }
                    item
                }
                Image::Broken(item) | Image::Any(item) => item.clone(),
            };
            inserted(i, item)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn any_new_image_starts_its_saga_or_is_dead_lettered_with_a_short_reason(
                images in prop::collection::vec(image(), 1..6),
            ) {
                let mut event = Event::default();
                event.records = images.iter().enumerate().map(|(i, image)| record(i, image)).collect();
                let starter = Starter { executions: Recording::default(), dead_letters: Parked::default() };
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                let response = runtime.block_on(handle(&starter, event, Deadline::never()));

                prop_assert!(response.batch_item_failures.is_empty(), "{:?}", failed_at(&response));
                let started = starter.executions.started.lock().expect("lock").clone();
                let parked = starter.dead_letters.0.lock().expect("lock").clone();
                for (at, reason) in &parked {
                    prop_assert!(!reason.is_empty() && reason.len() <= MAX_REASON, "{} bytes", reason.len());
                    prop_assert_eq!(parked.iter().filter(|(other, _)| other == at).count(), 1);
                }
                for (i, image) in images.iter().enumerate() {
                    let was_parked = parked.iter().any(|(at, _)| *at == i.to_string());
                    match image {
                        Image::Valid(_) => {
                            prop_assert!(started.contains(&format!("o{i}")), "o{} not started: {:?}", i, started);
                            prop_assert!(!was_parked);
                        }
                        Image::Broken(_) => prop_assert!(was_parked, "record {} not dead-lettered", i),
                        Image::Any(_) => {}
                    }
                }
                prop_assert!(started.len() + parked.len() <= images.len());
            }
        }
    }
}
