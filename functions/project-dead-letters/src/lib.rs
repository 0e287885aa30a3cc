//! Projection of the dead letters view (`DeadLetter` events): what operators list and inspect.
//! Subscribed like every projection: its own EventBridge rule, SQS queue and DLQ.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use shared::readmodel::dead_letters::DeadLetterView;
use shared::readmodel::runtime::ProjectionLambda;

pub async fn handle(lambda: &ProjectionLambda, batch: SqsEvent) -> SqsBatchResponse {
    lambda
        .handle(batch, |event| async move { lambda.models.project::<DeadLetterView, _>(&lambda.events, &event).await })
        .await
}
