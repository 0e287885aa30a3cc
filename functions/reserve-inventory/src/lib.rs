//! Reserve inventory: the saga's first step. Reserves every line of the order on its SKU's stream;
//! if any SKU is short it releases what it took and answers `InventoryUnavailable`.
//!
//! Triggered by its SQS queue (the state machine sends the command with a task token); answers
//! Step Functions per message and reports per-message failures for redelivery.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use shared::deadline::Deadline;
use shared::lambda::steps::StepLambda;
use shared::saga::{Step, steps};

pub async fn handle(lambda: &StepLambda<()>, event: SqsEvent, deadline: Deadline) -> SqsBatchResponse {
    lambda
        .handle(event, deadline, &[Step::ReserveInventory], |msg| async move {
            steps::reserve_inventory(&lambda.repo, &msg).await
        })
        .await
}
