use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use shared::domain::services::Simulated;
use shared::saga::runtime::StepLambda;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let lambda = StepLambda::from_env(Simulated::from_env()?).await?;
    run(service_fn(|event: LambdaEvent<SqsEvent>| async {
        Ok::<_, Error>(charge_payment::handle(&lambda, event.payload).await)
    }))
    .await
}
