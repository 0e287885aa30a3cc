//! Projection of the order view: status, lines, totals, payment and shipment references, a
//! timeline of the saga's steps (Order, Payment and Shipment events).
//!
//! Subscribed through its own EventBridge rule and SQS queue (with a DLQ): idempotent and
//! ordered per stream, whatever order and however often the bus delivers.
//!
//! It counts `OrdersManuallyResolved`: an operator resolves a flagged order from the `ops`
//! command line (not a Lambda, so no metrics), and this projection sees every order event once
//! (counted when its write applied the `OrderManualActionResolved`, never on a redelivery).

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use shared::aggregate::decode_event;
use shared::deadline::Deadline;
use shared::domain::order::OrderEvent;
use shared::eventstore::RecordedEvent;
use shared::lambda::projections::ProjectionLambda;
use shared::metrics::Outcome;
use shared::readmodel::OrderView;

pub async fn handle(lambda: &ProjectionLambda, batch: SqsEvent, deadline: Deadline) -> SqsBatchResponse {
    lambda
        .handle(batch, deadline, |event| async move {
            let projection =
                lambda.models.project_with::<OrderView, _, ()>(&lambda.events, &event, |_, _| None).await?;
            for _ in 0..manual_resolutions(&projection.applied) {
                shared::metrics::order_outcome(Outcome::ManuallyResolved, None);
            }
            Ok(projection.projected)
        })
        .await
}

/// How many of the events a write applied resolve a flagged order.
pub fn manual_resolutions(applied: &[RecordedEvent]) -> usize {
    applied.iter().filter(|e| matches!(decode_event(e), Ok(OrderEvent::OrderManualActionResolved { .. }))).count()
}
