//! Finalize order: records how the saga ended on the Order stream: completed (stock committed),
//! cancelled with the failed step and reason, or flagged for manual action.
//!
//! Triggered by its SQS queue (the state machine sends the command with a task token); answers
//! Step Functions per message and reports per-message failures for redelivery.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use shared::deadline::Deadline;
use shared::lambda::steps::StepLambda;
use shared::saga::{Step, steps};

pub async fn handle(lambda: &StepLambda<()>, event: SqsEvent, deadline: Deadline) -> SqsBatchResponse {
    lambda
        .handle(
            event,
            deadline,
            &[Step::CompleteOrder, Step::CancelOrder, Step::FlagForManualAction],
            |msg| async move {
                match msg.step {
                    Step::CompleteOrder => steps::complete_order(&lambda.repo, &msg).await,
                    Step::CancelOrder => steps::cancel_order(&lambda.repo, &msg).await,
                    _ => steps::flag_for_manual_action(&lambda.repo, &msg).await,
                }
            },
        )
        .await
}
