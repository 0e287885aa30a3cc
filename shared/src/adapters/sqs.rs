//! SQS as the [`DeadLetters`] port: unreadable messages parked on a function's DLQ, with the
//! reason and their source as message attributes.

use aws_sdk_sqs::types::MessageAttributeValue;

use crate::lambda::batch::{DeadLetters, Source};

/// A function's DLQ (`DEAD_LETTER_QUEUE_URL`): for a step, the same queue its redrive policy
/// uses, so everything that needs a look is in one place. The SQS client is made at the first
/// dead letter (a rare path), not in the init phase.
#[derive(Clone)]
pub struct SqsDeadLetters {
    pub client: crate::adapters::aws::LazyClient<aws_sdk_sqs::Client>,
    pub queue_url: String,
}

impl DeadLetters for SqsDeadLetters {
    async fn dead_letter(&self, body: &str, reason: &str, source: &Source<'_>) -> Result<(), String> {
        let attribute = |v: &str| {
            MessageAttributeValue::builder().data_type("String").string_value(v).build().map_err(|e| e.to_string())
        };
        let reason: String = reason.chars().take(1_000).collect();
        let mut send = self
            .client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .message_attributes("reason", attribute(&reason)?);
        if let Some(arn) = source.arn {
            send = send.message_attributes("sourceArn", attribute(arn)?);
        }
        if let Some(id) = source.id {
            send = send.message_attributes("sourceId", attribute(id)?);
        }
        send.send().await.map(|_| ()).map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(&e).to_string())
    }
}
