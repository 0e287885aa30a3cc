use lambda_http::{Error, run};
use query_api::{Config, QueryApi, router};

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let sdk = shared::adapters::aws::sdk_config().await;
    run(router(QueryApi::new(aws_sdk_dynamodb::Client::new(&sdk), Config::from_env()?))).await
}
