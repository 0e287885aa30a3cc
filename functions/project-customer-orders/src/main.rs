// The projection future (a read-model transaction inside a retry loop, in a span) nests deeply:
// computing its layout overflows the default limit.
#![recursion_limit = "256"]

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use shared::lambda::projections::ProjectionLambda;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let lambda = ProjectionLambda::from_env().await?;
    run(service_fn(|event: LambdaEvent<SqsEvent>| async {
        Ok::<_, Error>(project_customer_orders::handle(&lambda, event.payload).await)
    }))
    .await
}
