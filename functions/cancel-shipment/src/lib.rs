//! Cancel shipment: compensation of the booking, including a booking whose answer was lost.
//!
//! Triggered by its SQS queue (the state machine sends the command with a task token); answers
//! Step Functions per message and reports per-message failures for redelivery.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use shared::deadline::Deadline;
use shared::domain::services::Carrier;
use shared::lambda::steps::StepLambda;
use shared::saga::{Step, steps};

pub async fn handle<X: Carrier>(lambda: &StepLambda<X>, event: SqsEvent, deadline: Deadline) -> SqsBatchResponse {
    lambda
        .handle(event, deadline, &[Step::CancelShipment], |msg| async move {
            steps::cancel_shipment(&lambda.repo, &lambda.services, &msg).await
        })
        .await
}
