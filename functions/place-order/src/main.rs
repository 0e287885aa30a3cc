// The handler future (the store's append inside a retry loop) nests deeply: the aarch64 build
// overflows the default limit computing its layout.
#![recursion_limit = "256"]

use std::sync::Arc;

use lambda_http::{Error, run};
use place_order::{PlaceOrder, router};
use shared::adapters::dynamodb::DynamoCounters;
use shared::adapters::dynamodb::{DynamoEventStore, EventStoreConfig};
use shared::aggregate::Repository;
use shared::config::process_env;
use shared::ratelimit::{Limit, RateLimiter};

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let dynamodb = aws_sdk_dynamodb::Client::new(&shared::adapters::aws::sdk_config().await);
    let config = EventStoreConfig::from_env()?;
    // The orders-per-customer limit's counters live in the commands table (see DynamoCounters).
    let limiter = Limit::per_minute_from_vars(&process_env, "ORDERS_PER_CUSTOMER_PER_MINUTE")?
        .map(|limit| RateLimiter::new(DynamoCounters::new(dynamodb.clone(), &config.commands_table), limit));
    let repo = Repository::new(DynamoEventStore::new(dynamodb, config));
    run(router(Arc::new(PlaceOrder { repo, limiter }))).await
}
