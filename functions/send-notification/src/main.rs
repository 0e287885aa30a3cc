use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use shared::adapters::providers::HttpNotifier;
use shared::deadline::Deadline;
use shared::lambda::steps::StepLambda;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let sdk = shared::adapters::aws::sdk_config().await;
    let lambda = StepLambda::from_sdk(&sdk, HttpNotifier::from_env(&sdk)?)?;
    let lambda = &lambda;
    run(service_fn(|event: LambdaEvent<SqsEvent>| async move {
        let deadline = Deadline::from_epoch_millis(event.context.deadline);
        Ok::<_, Error>(send_notification::handle(lambda, event.payload, deadline).await)
    }))
    .await
}
