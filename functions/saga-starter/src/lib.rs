//! Saga starter: fed by the event store's DynamoDB stream (filtered to `OrderPlaced` in the
//! template), it starts the order saga with the order id as the execution name. A replayed or
//! duplicated record therefore cannot start a second saga: Step Functions refuses the name.
//! The order is placed by one write (the event); the saga starts from what was committed: no
//! dual write.

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use serde_json::json;
use shared::aggregate::decode_event;
use shared::config::{ConfigError, Vars, required};
use shared::domain::order::OrderEvent;
use shared::eventstore::RecordedEvent;
use shared::saga::runtime::{DeadLetters, Source, SqsDeadLetters};

pub struct Starter<D> {
    pub sfn: aws_sdk_sfn::Client,
    pub state_machine_arn: String,
    pub dead_letters: D,
}

impl Starter<SqsDeadLetters> {
    /// `STATE_MACHINE_ARN` and `DEAD_LETTER_QUEUE_URL`.
    pub fn new(sfn: aws_sdk_sfn::Client, sqs: aws_sdk_sqs::Client, vars: Vars<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            sfn,
            state_machine_arn: required(vars, "STATE_MACHINE_ARN")?,
            dead_letters: SqsDeadLetters { client: sqs, queue_url: required(vars, "DEAD_LETTER_QUEUE_URL")? },
        })
    }
}

enum Outcome {
    Started,
    Skipped,
}

/// Starts a saga per `OrderPlaced` record. On a failure that a retry may cure, reports that
/// record's sequence number so the stream resumes from it: nothing after it is skipped.
pub async fn handle<D: DeadLetters>(starter: &Starter<D>, event: Event) -> DynamoDbEventResponse {
    let mut response = DynamoDbEventResponse::default();
    for record in event.records {
        if let Err(reason) = start(starter, &record).await {
            tracing::warn!(sequence = ?record.change.sequence_number, %reason, "saga not started; the stream retries from here");
            let mut failure = DynamoDbBatchItemFailure::default();
            failure.item_identifier = record.change.sequence_number.clone();
            response.batch_item_failures.push(failure);
            break;
        }
    }
    response
}

async fn start<D: DeadLetters>(starter: &Starter<D>, record: &EventRecord) -> Result<Outcome, String> {
    if record.event_name != "INSERT" {
        return Ok(Outcome::Skipped);
    }
    let placed = serde_dynamo::from_item::<_, RecordedEvent>(record.change.new_image.clone())
        .map_err(|e| format!("not an event envelope: {e}"))
        .and_then(|recorded| match decode_event::<OrderEvent>(&recorded) {
            Ok(OrderEvent::OrderPlaced(order)) => Ok(Some((recorded, order))),
            Ok(_) => Ok(None),
            Err(e) => Err(e.to_string()),
        });
    let (recorded, order) = match placed {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(Outcome::Skipped),
        Err(reason) => {
            // A record that will never decode must not block the stream: park it with the reason.
            let body = serde_json::to_string(&record.change.new_image).unwrap_or_default();
            let source =
                Source { arn: record.event_source_arn.as_deref(), id: record.change.sequence_number.as_deref() };
            starter.dead_letters.dead_letter(&body, &reason, &source).await?;
            tracing::error!(%reason, "undecodable OrderPlaced record dead-lettered");
            return Ok(Outcome::Skipped);
        }
    };
    let input = json!({
        "order": order,
        "correlationId": recorded.correlation_id,
        "placedAt": recorded.recorded_at,
        "results": {},
        "compensations": {},
    });
    let started = starter
        .sfn
        .start_execution()
        .state_machine_arn(&starter.state_machine_arn)
        .name(order.order_id.as_str())
        .input(input.to_string())
        .send()
        .await;
    match started {
        Ok(out) => {
            tracing::info!(order_id = %order.order_id, execution = out.execution_arn(), "saga started");
            Ok(Outcome::Started)
        }
        Err(e) if e.as_service_error().is_some_and(|e| e.is_execution_already_exists()) => {
            tracing::info!(order_id = %order.order_id, "saga already started for this order");
            Ok(Outcome::Started)
        }
        Err(e) => Err(aws_sdk_sfn::error::DisplayErrorContext(&e).to_string()),
    }
}
