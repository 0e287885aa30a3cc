// The batch's future (the stream batch loop around a bounded, deadline-aware AWS call, in a
// span) nests deeply: computing its layout overflows the default limit.
#![recursion_limit = "256"]

use aws_lambda_events::event::dynamodb::Event;
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use outbox_relay::{EventBridgeBus, Relay};
use shared::adapters::aws::LazyClient;
use shared::adapters::sqs::SqsDeadLetters;
use shared::config::{process_env, required};
use shared::deadline::Deadline;
use shared::retry::RetryPolicy;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let sdk = shared::adapters::aws::sdk_config().await;
    let bus = EventBridgeBus::new(aws_sdk_eventbridge::Client::new(&sdk), &process_env)?;
    let dead_letters = SqsDeadLetters {
        client: LazyClient::new(&sdk, aws_sdk_sqs::Client::new),
        queue_url: required(&process_env, "DEAD_LETTER_QUEUE_URL")?,
    };
    let relay = Relay { bus, retry: RetryPolicy::default(), dead_letters };
    let relay = &relay;
    run(service_fn(|event: LambdaEvent<Event>| async move {
        let deadline = Deadline::from_epoch_millis(event.context.deadline);
        Ok::<_, Error>(outbox_relay::handle(relay, event.payload, deadline).await)
    }))
    .await
}
