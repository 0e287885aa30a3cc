//! Create shipment: books with the carrier once per order and answers with the shipment id or
//! `ShipmentRejected`.
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
        .handle(event, deadline, &[Step::CreateShipment], |msg| async move {
            steps::create_shipment(&lambda.repo, &lambda.services, &msg).await
        })
        .await
}
