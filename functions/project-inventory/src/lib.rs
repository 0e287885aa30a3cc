//! Projection of the inventory levels per SKU: available and reserved (Inventory events).
//!
//! Subscribed through its own EventBridge rule and SQS queue (with a DLQ): idempotent and
//! ordered per stream, whatever order and however often the bus delivers.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use shared::deadline::Deadline;
use shared::lambda::projections::ProjectionLambda;
use shared::readmodel::InventoryLevel;

pub async fn handle(lambda: &ProjectionLambda, batch: SqsEvent, deadline: Deadline) -> SqsBatchResponse {
    lambda
        .handle(batch, deadline, |event| async move {
            lambda.models.project::<InventoryLevel, _>(&lambda.events, &event).await
        })
        .await
}
