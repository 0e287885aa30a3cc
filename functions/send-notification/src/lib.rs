//! Send notification: tells the customer the order is confirmed, once; an unreachable customer
//! answers `NotificationUndeliverable`.
//!
//! Triggered by its SQS queue (the state machine sends the command with a task token); answers
//! Step Functions per message and reports per-message failures for redelivery.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use shared::deadline::Deadline;
use shared::domain::services::Notifier;
use shared::lambda::steps::StepLambda;
use shared::saga::{Step, steps};

pub async fn handle<X: Notifier>(lambda: &StepLambda<X>, event: SqsEvent, deadline: Deadline) -> SqsBatchResponse {
    lambda
        .handle(event, deadline, &[Step::SendNotification], |msg| async move {
            steps::send_notification(&lambda.repo, &lambda.services, &msg).await
        })
        .await
}
