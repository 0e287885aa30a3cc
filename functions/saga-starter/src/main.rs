// The batch's future (the stream batch loop around a bounded, deadline-aware AWS call, in a
// span) nests deeply: computing its layout overflows the default limit.
#![recursion_limit = "256"]

use aws_lambda_events::event::dynamodb::Event;
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use shared::adapters::aws::LazyClient;
use shared::config::process_env;
use shared::deadline::Deadline;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let sdk = shared::adapters::aws::sdk_config().await;
    let starter = saga_starter::Starter::new(
        aws_sdk_sfn::Client::new(&sdk),
        LazyClient::new(&sdk, aws_sdk_sqs::Client::new),
        &process_env,
    )?;
    let starter = &starter;
    run(service_fn(|event: LambdaEvent<Event>| async move {
        let deadline = Deadline::from_epoch_millis(event.context.deadline);
        Ok::<_, Error>(saga_starter::handle(starter, event.payload, deadline).await)
    }))
    .await
}
