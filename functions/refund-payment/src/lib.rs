//! Refund payment: compensation of the charge, including a charge whose answer was lost. While
//! the gateway is unavailable, answers `pending` so the state machine waits and tries again
//! (for as long as `steps::Parking` allows); a refusal by the gateway is final (`RefundRefused`).
//!
//! Triggered by its SQS queue (the state machine sends the command with a task token); answers
//! Step Functions per message and reports per-message failures for redelivery.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use shared::deadline::Deadline;
use shared::domain::services::PaymentGateway;
use shared::lambda::steps::StepLambda;
use shared::saga::{Step, steps};

pub async fn handle<X: PaymentGateway>(
    lambda: &StepLambda<X>,
    parking: &steps::Parking,
    event: SqsEvent,
    deadline: Deadline,
) -> SqsBatchResponse {
    lambda
        .handle(event, deadline, &[Step::RefundPayment], |msg| async move {
            steps::refund_payment(&lambda.repo, &lambda.services, parking, &msg).await
        })
        .await
}
