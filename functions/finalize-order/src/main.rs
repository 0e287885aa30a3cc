use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use shared::saga::runtime::StepLambda;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let lambda = StepLambda::from_env(()).await?;
    run(service_fn(|event: LambdaEvent<SqsEvent>| async {
        Ok::<_, Error>(finalize_order::handle(&lambda, event.payload).await)
    }))
    .await
}
