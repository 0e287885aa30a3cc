//! The AWS edge of a projection Lambda: EventBridge delivers the store's events (through a rule)
//! to the projection's SQS queue; each message is projected, retryable failures are reported
//! per message for redelivery, and a message that is not an event goes to the DLQ with the
//! reason.

use std::future::Future;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use serde::Deserialize;
use tracing::Instrument;

use super::store::{Projected, ProjectionError, ReadModelStore};
use crate::aws::LazyClient;
use crate::config::{ConfigError, Vars, process_env, required};
use crate::eventstore::{DynamoEventStore, EventStoreConfig, RecordedEvent};
use crate::saga::runtime::{DeadLetters, Source, SqsDeadLetters};

/// The part of an EventBridge event a projection reads: the envelope published by the relay.
#[derive(Deserialize)]
struct BusEvent {
    detail: RecordedEvent,
}

pub struct ProjectionLambda {
    /// The event store, read to fill gaps.
    pub events: DynamoEventStore,
    pub models: ReadModelStore,
    pub dead_letters: SqsDeadLetters,
}

impl ProjectionLambda {
    /// `EVENTS_TABLE` (and the other store tables), `READ_MODEL_TABLE`, `DEAD_LETTER_QUEUE_URL`.
    pub fn new(
        dynamodb: aws_sdk_dynamodb::Client,
        sqs: impl Into<crate::aws::LazyClient<aws_sdk_sqs::Client>>,
        vars: Vars<'_>,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            events: DynamoEventStore::new(dynamodb.clone(), EventStoreConfig::from_vars(vars)?),
            models: ReadModelStore::from_vars(dynamodb, vars)?,
            dead_letters: SqsDeadLetters { client: sqs.into(), queue_url: required(vars, "DEAD_LETTER_QUEUE_URL")? },
        })
    }

    pub async fn from_env() -> Result<Self, ConfigError> {
        let sdk = crate::aws::sdk_config().await;
        Self::new(aws_sdk_dynamodb::Client::new(&sdk), LazyClient::new(&sdk, aws_sdk_sqs::Client::new), &process_env)
    }

    /// Projects every event of the batch with `project`.
    pub async fn handle<F, Fut>(&self, batch: SqsEvent, project: F) -> SqsBatchResponse
    where
        F: Fn(RecordedEvent) -> Fut,
        Fut: Future<Output = Result<Projected, ProjectionError>>,
    {
        let mut response = SqsBatchResponse::default();
        for message in batch.records {
            let id = message.message_id.clone().unwrap_or_default();
            let body = message.body.as_deref().unwrap_or_default();
            let source = Source { arn: message.event_source_arn.as_deref(), id: message.message_id.as_deref() };
            // The event's order, correlation and trace on every line about it.
            let mut span = tracing::Span::none();
            let outcome = match serde_json::from_str::<BusEvent>(body) {
                Err(e) => Err(ProjectionError::Corrupt(format!("not an event from the bus: {e}"))),
                Ok(BusEvent { detail }) => {
                    span = crate::telemetry::event_span(&detail);
                    span.in_scope(
                        || tracing::debug!(stream = %detail.stream_id, version = detail.version, "projecting"),
                    );
                    project(detail).instrument(span.clone()).await
                }
            };
            let failed = match outcome {
                Ok(projected) => {
                    span.in_scope(|| tracing::debug!(message_id = %id, ?projected, "projected"));
                    false
                }
                Err(e) if e.is_retryable() => {
                    span.in_scope(|| tracing::warn!(message_id = %id, error = %e, "projection will be retried"));
                    true
                }
                // It will never project: park it with the reason instead of looping.
                Err(e) => match self.dead_letters.dead_letter(body, &e.to_string(), &source).await {
                    Ok(()) => {
                        span.in_scope(|| tracing::error!(message_id = %id, error = %e, "dead-lettered"));
                        false
                    }
                    Err(dlq) => {
                        span.in_scope(|| {
                            tracing::error!(message_id = %id, error = %e, %dlq, "dead-lettering failed; left for redelivery")
                        });
                        true
                    }
                },
            };
            if failed {
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = id;
                response.batch_item_failures.push(failure);
            }
        }
        response
    }
}
