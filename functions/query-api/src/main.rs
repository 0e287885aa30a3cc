use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use query_api::{Config, QueryApi};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let sdk = shared::aws::sdk_config().await;
    let api = QueryApi::new(aws_sdk_dynamodb::Client::new(&sdk), Config::from_env()?);
    run(service_fn(|event: LambdaEvent<Value>| async { Ok::<_, Error>(api.handle(event.payload).await) })).await
}
