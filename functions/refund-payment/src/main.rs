use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use shared::adapters::providers::HttpPaymentGateway;
use shared::deadline::Deadline;
use shared::lambda::steps::StepLambda;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let sdk = shared::adapters::aws::sdk_config().await;
    let lambda = StepLambda::from_sdk(&sdk, HttpPaymentGateway::from_env(&sdk)?)?;
    let parking = &shared::saga::steps::Parking::from_vars(&shared::config::process_env)?;
    let lambda = &lambda;
    run(service_fn(|event: LambdaEvent<SqsEvent>| async move {
        let deadline = Deadline::from_epoch_millis(event.context.deadline);
        Ok::<_, Error>(refund_payment::handle(lambda, parking, event.payload, deadline).await)
    }))
    .await
}
