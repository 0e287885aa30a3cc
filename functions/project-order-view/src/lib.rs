//! Projection of the order view: status, lines, totals, payment and shipment references, a
//! timeline of the saga's steps (Order, Payment and Shipment events).
//!
//! Subscribed through its own EventBridge rule and SQS queue (with a DLQ): idempotent and
//! ordered per stream, whatever order and however often the bus delivers.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use shared::readmodel::OrderView;
use shared::readmodel::runtime::ProjectionLambda;

pub async fn handle(lambda: &ProjectionLambda, batch: SqsEvent) -> SqsBatchResponse {
    lambda
        .handle(batch, |event| async move { lambda.models.project::<OrderView, _>(&lambda.events, &event).await })
        .await
}
