// The projection future (a read-model transaction inside a retry loop, in a span) nests deeply:
// computing its layout overflows the default limit.
#![recursion_limit = "256"]

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use shared::deadline::Deadline;
use shared::lambda::projections::ProjectionLambda;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let lambda = ProjectionLambda::from_env().await?;
    let lambda = &lambda;
    run(service_fn(|event: LambdaEvent<SqsEvent>| async move {
        let deadline = Deadline::from_epoch_millis(event.context.deadline);
        Ok::<_, Error>(project_dead_letters::handle(lambda, event.payload, deadline).await)
    }))
    .await
}
