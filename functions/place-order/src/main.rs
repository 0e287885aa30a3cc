// The handler future (the store's append inside a retry loop) nests deeply: the aarch64 build
// overflows the default limit computing its layout.
#![recursion_limit = "256"]

use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use serde_json::Value;
use shared::aggregate::Repository;
use shared::eventstore::{DynamoEventStore, EventStoreConfig};

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let sdk = shared::aws::sdk_config().await;
    let repo =
        Repository::new(DynamoEventStore::new(aws_sdk_dynamodb::Client::new(&sdk), EventStoreConfig::from_env()?));
    run(service_fn(|event: LambdaEvent<Value>| async {
        let invocation =
            place_order::Invocation { request_id: event.context.request_id, trace_header: event.context.xray_trace_id };
        Ok::<_, Error>(place_order::handle(&repo, event.payload, &invocation).await)
    }))
    .await
}
