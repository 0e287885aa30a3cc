use aws_lambda_events::event::dynamodb::Event;
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use outbox_relay::{EventBridgeBus, Relay};
use shared::config::process_env;
use shared::deadline::Deadline;
use shared::retry::RetryPolicy;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let sdk = shared::aws::sdk_config().await;
    let bus = EventBridgeBus::new(aws_sdk_eventbridge::Client::new(&sdk), &process_env)?;
    let relay = Relay { bus, retry: RetryPolicy::default() };
    let relay = &relay;
    run(service_fn(|event: LambdaEvent<Event>| async move {
        let deadline = Deadline::from_epoch_millis(event.context.deadline);
        Ok::<_, Error>(outbox_relay::handle(relay, event.payload, deadline).await)
    }))
    .await
}
