//! Charge payment: records the request, asks the gateway once per order (idempotency key) and
//! answers with the payment id or `PaymentDeclined`; while the gateway is unavailable, answers
//! `pending` so the state machine parks the order and tries again (see `steps::Parking`).
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
        .handle(event, deadline, &[Step::ChargePayment], |msg| async move {
            steps::charge_payment(&lambda.repo, &lambda.services, parking, &msg).await
        })
        .await
}
