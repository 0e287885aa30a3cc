//! The AWS edge of a projection Lambda: EventBridge delivers the store's events (through a rule)
//! to the projection's SQS queue; each message is projected, retryable failures are reported
//! per message for redelivery, and a message that is not an event goes to the DLQ with the
//! reason.

use std::future::Future;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use serde::Deserialize;
use tracing::Instrument;

use crate::adapters::aws::LazyClient;
use crate::adapters::dynamodb::readmodels::{Projected, ProjectionError, ReadModelStore};
use crate::adapters::dynamodb::{DynamoEventStore, EventStoreConfig};
use crate::adapters::sqs::SqsDeadLetters;
use crate::config::{ConfigError, Vars, process_env, required};
use crate::deadline::Deadline;
use crate::eventstore::{EventStore, RecordedEvent, StreamId};
use crate::lambda::batch::{Batch, Unhandled};

/// The part of an EventBridge event a projection reads: the envelope published by the relay.
#[derive(Deserialize)]
struct BusEvent {
    detail: serde_json::Value,
}

/// The envelope of an event too large for the bus: the relay published it without its payload
/// (`payloadOmitted`), a claim check on the store.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimCheck {
    pub stream_id: String,
    pub version: u64,
}

/// What a message from the bus carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// The stored event, whole.
    Event(Box<RecordedEvent>),
    /// Where to read the event whose payload was left out.
    Claim(ClaimCheck),
}

fn not_an_event(e: impl std::fmt::Display) -> ProjectionError {
    let reason = format!("not an event from the bus: {e}");
    ProjectionError::Corrupt(crate::text::bounded(&reason, crate::text::MAX_REASON))
}

/// What a message from the bus carries (the relay's envelope, as the EventBridge event's
/// `detail`), or why it is not an event: [`ProjectionError::Corrupt`] (never retried), with a
/// short reason (a decoder's message may quote a field whole).
pub fn decode_bus_message(body: &str) -> Result<Delivery, ProjectionError> {
    let detail = serde_json::from_str::<BusEvent>(body).map_err(not_an_event)?.detail;
    if detail.get("payloadOmitted").and_then(serde_json::Value::as_bool) == Some(true) {
        return serde_json::from_value(detail).map(Delivery::Claim).map_err(not_an_event);
    }
    serde_json::from_value(detail).map(|event| Delivery::Event(Box::new(event))).map_err(not_an_event)
}

/// The whole stored event a message from the bus carries; a claim check is refused (see
/// [`decode_bus_message`] for consumers that read it from the store).
pub fn decode_bus_event(body: &str) -> Result<RecordedEvent, ProjectionError> {
    match decode_bus_message(body)? {
        Delivery::Event(event) => Ok(*event),
        Delivery::Claim(claim) => Err(not_an_event(format!(
            "the payload of {}/{} was left out: read it from the store",
            claim.stream_id, claim.version
        ))),
    }
}

/// The event a claim check names, read from the store. Not there (yet): retried.
pub async fn redeem<S: EventStore>(store: &S, claim: &ClaimCheck) -> Result<RecordedEvent, ProjectionError> {
    let stream = StreamId::parse(&claim.stream_id).map_err(not_an_event)?;
    let missing =
        || ProjectionError::Missing { stream: claim.stream_id.clone(), from: claim.version, to: claim.version };
    let after = claim.version.checked_sub(1).ok_or_else(|| not_an_event("version 0 is no event"))?;
    let page = store.read_page(&stream, after, 1).await?;
    page.into_iter().find(|e| e.version == claim.version).ok_or_else(missing)
}

pub struct ProjectionLambda {
    /// The event store, read to fill gaps.
    pub events: DynamoEventStore,
    pub models: ReadModelStore,
    pub dead_letters: SqsDeadLetters,
}

impl ProjectionLambda {
    /// `EVENTS_TABLE` (and the other store tables), `READ_MODEL_TABLE`, `DEAD_LETTER_QUEUE_URL`.
    pub fn new(
        dynamodb: aws_sdk_dynamodb::Client,
        sqs: impl Into<crate::adapters::aws::LazyClient<aws_sdk_sqs::Client>>,
        vars: Vars<'_>,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            events: DynamoEventStore::new(dynamodb.clone(), EventStoreConfig::from_vars(vars)?),
            models: ReadModelStore::from_vars(dynamodb, vars)?,
            dead_letters: SqsDeadLetters { client: sqs.into(), queue_url: required(vars, "DEAD_LETTER_QUEUE_URL")? },
        })
    }

    pub async fn from_env() -> Result<Self, ConfigError> {
        let sdk = crate::adapters::aws::sdk_config().await;
        Self::new(aws_sdk_dynamodb::Client::new(&sdk), LazyClient::new(&sdk, aws_sdk_sqs::Client::new), &process_env)
    }

    /// Projects every event of the batch with `project`, one after the other, until `deadline`
    /// (what is not done by then is left for redelivery).
    pub async fn handle<F, Fut>(&self, batch: SqsEvent, deadline: Deadline, project: F) -> SqsBatchResponse
    where
        F: Fn(RecordedEvent) -> Fut,
        Fut: Future<Output = Result<Projected, ProjectionError>>,
    {
        let project = &project;
        Batch::new(&self.dead_letters, deadline)
            .sqs(&batch, |message| async move {
                // The event's order, correlation and trace on every line about it.
                let mut span = tracing::Span::none();
                // An event too large for the bus comes as a claim check: read it from the store.
                let decoded = match decode_bus_message(message.body.as_deref().unwrap_or_default()) {
                    Ok(Delivery::Event(event)) => Ok(*event),
                    Ok(Delivery::Claim(claim)) => redeem(&self.events, &claim).await,
                    Err(e) => Err(e),
                };
                let outcome = match decoded {
                    Err(e) => Err(e),
                    Ok(detail) => {
                        span = crate::telemetry::event_span(&detail);
                        span.in_scope(
                            || tracing::debug!(stream = %detail.stream_id, version = detail.version, "projecting"),
                        );
                        project(detail).instrument(span.clone()).await
                    }
                };
                match outcome {
                    Ok(projected) => {
                        span.in_scope(|| tracing::debug!(message_id = ?message.message_id, ?projected, "projected"));
                        Ok(())
                    }
                    Err(e) if e.is_retryable() => Err(Unhandled::retry(e.to_string()).in_span(span)),
                    // It will never project: park it with the reason instead of looping.
                    Err(e) => Err(Unhandled::dead_letter(e.to_string()).in_span(span)),
                }
            })
            .await
    }
}

/// Arbitrary message bodies on a projection's queue: the event they carry, or a typed error that
/// is never retried (the message is dead-lettered with it as the reason), short; never a panic.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use crate::testing::text;

    /// The dead-letter reason for `body`: it must be a short, non-retryable `Corrupt`.
    fn refusal(body: &str) -> Result<String, TestCaseError> {
        match decode_bus_event(body) {
            Ok(event) => Err(TestCaseError::fail(format!("decoded {event:?}"))),
            Err(e @ ProjectionError::Corrupt(_)) => {
                prop_assert!(!e.is_retryable());
                let reason = e.to_string();
                prop_assert!(reason.contains("not an event from the bus"), "{reason}");
                prop_assert!(reason.len() <= crate::text::MAX_REASON + 64, "{} bytes", reason.len());
                Ok(reason)
            }
            Err(e) => Err(TestCaseError::fail(format!("not Corrupt: {e:?}"))),
        }
    }

    /// Any JSON, with the envelope's field names among the keys so that decoding goes deep.
    fn any_json() -> impl Strategy<Value = Value> {
        const KEYS: &[&str] = &[
            "detail",
            "streamId",
            "version",
            "eventId",
            "eventType",
            "schemaVersion",
            "payload",
            "payloadJson",
            "correlationId",
            "recordedAt",
            "traceHeader",
        ];
        crate::testing::json_with_keys(KEYS)
    }

    /// (Without fractions: serde_json reads a float back to within one ulp, not always exactly,
    /// and events hold amounts in minor units.)
    fn any_event() -> impl Strategy<Value = RecordedEvent> {
        let optional = || proptest::option::of(text());
        let payload = any_json().prop_map(without_floats);
        (
            (text(), any::<u64>(), text(), text(), any::<u32>()),
            (payload, text(), optional(), optional(), optional(), text()),
        )
            .prop_map(|((stream_id, version, event_id, event_type, schema_version), rest)| {
                let (payload, correlation_id, causation_id, idempotency_key, trace_header, recorded_at) = rest;
                RecordedEvent {
                    stream_id,
                    version,
                    event_id,
                    event_type,
                    schema_version,
                    payload,
                    correlation_id,
                    causation_id,
                    idempotency_key,
                    trace_header,
                    recorded_at,
                }
            })
    }

    fn without_floats(v: Value) -> Value {
        match v {
            Value::Number(n) if n.is_f64() => json!(n.as_f64().unwrap_or_default() as i64),
            Value::Array(items) => Value::Array(items.into_iter().map(without_floats).collect()),
            Value::Object(fields) => Value::Object(fields.into_iter().map(|(k, v)| (k, without_floats(v))).collect()),
            other => other,
        }
    }

    /// The EventBridge event the relay's entry for `event` becomes, as SQS delivers it.
    fn bus_body(detail: Value) -> String {
        json!({
            "version": "0",
            "id": "7e3a2c1b-0000-4000-8000-000000000001",
            "detail-type": "OrderPlaced",
            "source": "order-saga.Order",
            "account": "123456789012",
            "time": "2026-11-22T03:00:00Z",
            "region": "us-east-1",
            "resources": [],
            "detail": detail,
        })
        .to_string()
    }

    fn detail_of(event: &RecordedEvent) -> Value {
        let mut detail = serde_json::to_value(event).expect("an envelope serializes");
        detail["id"] = json!(format!("{}/{}", event.stream_id, event.version));
        detail
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn any_bytes_are_refused_with_a_short_reason(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            refusal(&String::from_utf8_lossy(&bytes))?;
        }

        #[test]
        fn any_json_body_is_an_event_or_refused_with_a_short_reason(body in any_json()) {
            match decode_bus_event(&body.to_string()) {
                // Only an object with a `detail` that is an envelope decodes.
                Ok(event) => {
                    let detail = &body["detail"];
                    prop_assert_eq!(detail["streamId"].as_str(), Some(event.stream_id.as_str()));
                    prop_assert_eq!(detail["version"].as_u64(), Some(event.version));
                }
                Err(_) => {
                    refusal(&body.to_string())?;
                }
            }
        }

        #[test]
        fn a_published_event_decodes_as_it_was_stored(event in any_event(), as_text in any::<bool>()) {
            let mut detail = detail_of(&event);
            if as_text {
                // The store's other payload encoding: JSON text.
                detail["payloadJson"] = json!(event.payload.to_string());
                detail.as_object_mut().expect("an object").remove("payload");
            }
            let decoded = decode_bus_event(&bus_body(detail));
            prop_assert_eq!(decoded.ok(), Some(event));
        }

        #[test]
        fn any_damaged_detail_is_an_event_or_refused_with_a_short_reason(
            event in any_event(),
            field in prop::sample::select(vec![
                "streamId", "version", "eventId", "eventType", "schemaVersion", "payload", "payloadJson",
                "correlationId", "causationId", "recordedAt", "traceHeader",
            ]),
            value in prop_oneof![any_json(), Just(json!("[".repeat(10_000))), Just(json!(-1)), Just(json!(1e300))],
            nested in 0usize..2_000,
        ) {
            let mut detail = detail_of(&event);
            detail[field] = value;
            let mut body = bus_body(detail);
            if nested > 1_000 {
                // Deeper than any decoder should follow.
                body = format!("{{\"detail\":{}{}}}", "[".repeat(nested), "]".repeat(nested));
            }
            if decode_bus_event(&body).is_err() {
                refusal(&body)?;
            }
        }
    }
}

#[cfg(test)]
mod claim_checks {
    use serde_json::json;

    use super::*;
    use crate::eventstore::{InMemoryEventStore, NewEvent};

    fn bus_body(detail: serde_json::Value) -> String {
        json!({ "detail-type": "OrderPlaced", "source": "order-saga.Order", "detail": detail }).to_string()
    }

    #[tokio::test]
    async fn an_event_published_without_its_payload_is_read_back_from_the_store() {
        // Given an event whose envelope is too large for the bus, in the store
        let store = InMemoryEventStore::new();
        let stream = StreamId::new("Order", "o-big").expect("stream id");
        let payload = json!({ "orderId": "o-big", "note": "x".repeat(300 * 1024) });
        let event = NewEvent::new("OrderPlaced", 1, payload.clone());
        store.append(&stream, 0, vec![event], None).await.expect("append");
        // When the relay's claim check for it arrives
        let body =
            bus_body(json!({ "streamId": "Order-o-big", "version": 1, "payload": null, "payloadOmitted": true }));
        let Delivery::Claim(claim) = decode_bus_message(&body).expect("decodes") else { panic!("not a claim check") };
        // Then the whole event is read back from the store
        let redeemed = redeem(&store, &claim).await.expect("redeemed");
        assert_eq!((redeemed.version, &redeemed.payload), (1, &payload));
        // And a claim on a position not (yet) stored is retried, not dead-lettered
        let ahead = ClaimCheck { stream_id: "Order-o-big".into(), version: 2 };
        assert!(redeem(&store, &ahead).await.is_err_and(|e| e.is_retryable()));
        // And the whole-event decoder refuses a claim check with the reason
        let refused = decode_bus_event(&body).expect_err("a claim is not a whole event");
        assert!(refused.to_string().contains("read it from the store"), "{refused}");
    }
}
