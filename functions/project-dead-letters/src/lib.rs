//! Projection of the dead letters view (`DeadLetter` events): what operators list and inspect.
//! Subscribed like every projection: its own EventBridge rule, SQS queue and DLQ.
//!
//! It also keeps how many dead letters and manual-action cases wait for someone (pending or
//! parked), one counter item per kind, changed in the same transaction as the view when the
//! view opens or closes, and reports the level after each change as `UnresolvedDeadLetters`
//! (dimension `Kind`), which the template's alarms watch.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use shared::adapters::dynamodb::readmodels::{AlsoWrite, Projected, ProjectionError, ReadModelStore};
use shared::deadline::Deadline;
use shared::lambda::projections::ProjectionLambda;
use shared::readmodel::dead_letters::{DeadLetterView, UNRESOLVED, unresolved_change, unresolved_key};

pub async fn handle(lambda: &ProjectionLambda, batch: SqsEvent, deadline: Deadline) -> SqsBatchResponse {
    lambda
        .handle(batch, deadline, |event| async move {
            let models = &lambda.models;
            let projection = models
                .project_with::<DeadLetterView, _, _>(&lambda.events, &event, |before, after| {
                    let (kind, delta) = unresolved_change(before, after)?;
                    let update = models.add(&unresolved_key(kind), UNRESOLVED, delta).ok()?;
                    Some(AlsoWrite { update, then: kind })
                })
                .await?;
            if let Some(kind) = projection.also {
                report(models, kind).await;
            }
            Ok::<Projected, ProjectionError>(projection.projected)
        })
        .await
}

/// The level of `kind` as it stands now (read after the change: the latest read has every
/// committed change), as a metric. A failed read loses one report, not the count.
async fn report(models: &ReadModelStore, kind: &'static str) {
    match models.number(&unresolved_key(kind), UNRESOLVED).await {
        Ok(level) => shared::metrics::unresolved_dead_letters(kind, level),
        Err(e) => tracing::warn!(error = %e, kind, "unresolved level not read; not reported"),
    }
}

/// Arbitrary dead letters (any body, reason, attributes) as the bus delivers their events to this
/// projection: each message decodes to its event, and the view keeps the reason, the attributes
/// and at most its share of the body; a damaged payload is skipped, never a panic.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Value, json};
    use shared::aggregate::encode_event;
    use shared::domain::dead_letter::{Arrival, DeadLetterEvent, Failure, Status};
    use shared::eventstore::RecordedEvent;
    use shared::lambda::projections::decode_bus_event;
    use shared::readmodel::ReadModel;

    use super::*;

    /// What a view keeps of a body (the readmodel's `BODY_KEPT`).
    const BODY_KEPT: usize = 16 * 1024;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![4 => ".{0,30}", 1 => (".{1,4}", 1_000usize..12_000).prop_map(|(s, n)| s.repeat(n))]
    }

    fn arrival() -> impl Strategy<Value = Arrival> {
        let failure = prop::sample::select(vec![
            Failure::Transient,
            Failure::Poison,
            Failure::StreamBatch,
            Failure::ManualAction,
        ]);
        let attributes = prop::collection::btree_map("[a-zA-Z_]{1,12}", text(), 0..4);
        (text(), text(), attributes, failure, any::<u32>()).prop_map(|(body, reason, attributes, failure, count)| {
            Arrival {
                dead_letter_queue: "arn:aws:sqs:us-east-1:123456789012:order-saga-ReserveInventoryDlq".into(),
                source: None,
                message_id: "3f0c6a7e-2b1d-4c8e-9a55-1d2e3f4a5b6c".into(),
                body,
                attributes,
                failure,
                reason,
                receive_count: count,
                seen_at: "2026-11-22T03:00:00.000000Z".into(),
            }
        })
    }

    /// The SQS body the bus delivers for event `version` of dead letter `d1`.
    fn message(version: u64, event: &DeadLetterEvent) -> String {
        let new = encode_event(event).expect("an event encodes");
        let recorded = RecordedEvent {
            stream_id: "DeadLetter-d1".into(),
            version,
            event_id: format!("e{version}"),
            event_type: new.event_type.clone(),
            schema_version: new.schema_version,
            payload: new.payload,
            correlation_id: "d1".into(),
            causation_id: None,
            idempotency_key: None,
            trace_header: None,
            recorded_at: format!("2026-11-22T03:00:0{version}.000000Z"),
        };
        let mut detail = serde_json::to_value(&recorded).expect("an envelope serializes");
        detail["id"] = json!(format!("DeadLetter-d1/{version}"));
        json!({ "version": "0", "detail-type": new.event_type, "source": "order-saga.DeadLetter", "detail": detail })
            .to_string()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn any_dead_letter_is_viewed_with_its_reason_and_a_bounded_body(arrival in arrival(), parked in text()) {
            let events = [
                DeadLetterEvent::DeadLetterRecorded { dead_letter_id: "d1".into(), arrival: arrival.clone() },
                DeadLetterEvent::DeadLetterParked { dead_letter_id: "d1".into(), reason: parked.clone() },
            ];
            let mut view = DeadLetterView::default();
            let mut before = None;
            for (i, event) in events.iter().enumerate() {
                let recorded = decode_bus_event(&message(i as u64 + 1, event))
                    .map_err(|e| TestCaseError::fail(format!("does not decode: {e}")))?;
                view.apply(&recorded);
                if i == 0 {
                    prop_assert_eq!(view.status, Status::Pending);
                    prop_assert_eq!(&view.reason, &arrival.reason);
                    prop_assert_eq!(unresolved_change(None, &view), None);
                    before = Some(view.clone());
                }
            }
            prop_assert_eq!(view.status, Status::Parked);
            prop_assert_eq!(&view.reason, &parked);
            prop_assert_eq!(&view.attributes, &arrival.attributes);
            prop_assert!(view.body.len() <= BODY_KEPT && arrival.body.starts_with(&view.body));
            prop_assert_eq!(view.body_truncated, arrival.body.len() > BODY_KEPT);
            prop_assert_eq!(view.history.len(), 2);
            prop_assert_eq!(unresolved_change(before.as_ref(), &view), Some(("DeadLetter", 1)));
        }

        #[test]
        fn a_damaged_payload_is_skipped_by_the_view(
            field in prop::sample::select(vec!["deadLetterId", "arrival", "reason", "body", "failure", "receiveCount"]),
            value in prop_oneof![
                Just(Value::Null),
                any::<i64>().prop_map(|n| json!(n)),
                text().prop_map(Value::String),
                Just(json!([])),
            ],
        ) {
            let sample: Value =
                serde_json::from_str(include_str!("../../../events/project-dead-letters/event.json")).expect("sample");
            let mut body: Value =
                serde_json::from_str(sample["Records"][0]["body"].as_str().expect("a body")).expect("a bus event");
            let payload = &mut body["detail"]["payload"];
            if payload.get(field).is_some() {
                payload[field] = value.clone();
            } else {
                payload["arrival"][field] = value.clone();
            }
            let recorded = decode_bus_event(&body.to_string())
                .map_err(|e| TestCaseError::fail(format!("the envelope does not decode: {e}")))?;
            let mut view = DeadLetterView::default();
            view.apply(&recorded);
            // Whether it still decodes depends on the value (a string is a string); if it did
            // not, the view is as it was.
            if view.status == Status::None {
                prop_assert_eq!(view, DeadLetterView::default());
            } else {
                prop_assert_eq!(view.status, Status::Pending);
                prop_assert!(view.body.len() <= BODY_KEPT);
            }
        }
    }
}
