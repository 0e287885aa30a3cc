//! Release inventory: compensation of the reservation. Returns every unit the order holds;
//! nothing held is not an error.
//!
//! Triggered by its SQS queue (the state machine sends the command with a task token); answers
//! Step Functions per message and reports per-message failures for redelivery.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use shared::deadline::Deadline;
use shared::lambda::steps::StepLambda;
use shared::saga::{Step, steps};

pub async fn handle(lambda: &StepLambda<()>, event: SqsEvent, deadline: Deadline) -> SqsBatchResponse {
    lambda
        .handle(event, deadline, &[Step::ReleaseInventory], |msg| async move {
            steps::release_inventory(&lambda.repo, &msg).await
        })
        .await
}
