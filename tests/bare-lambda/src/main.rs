//! The cold-start baseline: nothing but the Lambda runtime, started the way the functions start
//! it (`#[tokio::main]`, `lambda_runtime::run`), answering each event with itself.

use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    run(service_fn(|event: LambdaEvent<Value>| async { Ok::<_, Error>(event.payload) })).await
}
