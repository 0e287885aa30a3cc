//! The rate limiter's and the circuit breaker's window counters in DynamoDB: the
//! [`WindowCounters`] port over the commands table.

use std::collections::HashMap;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};

use crate::ratelimit::{CounterError, WindowCounters};

/// The counters as items of the commands table: `idempotencyKey` = `RATE#<key>#<window start>`,
/// `hits` (N) and `expiresAt` (N, the table's TTL attribute).
///
/// Why that table and not one of its own: it already has exactly what a counter needs, a string
/// hash key, on-demand capacity and a TTL attribute, and every function that appends may already
/// `GetItem`/`UpdateItem` it (the `EventStoreAccess` policy): no new table, environment variable
/// or permission. The `RATE#` prefix cannot meet an idempotency key, which always starts with its
/// command's name (`PlaceOrder:…`), and nothing scans the table. The cost: point-in-time recovery
/// also backs up these short-lived items (a few bytes each, per customer-minute).
#[derive(Debug, Clone)]
pub struct DynamoCounters {
    client: Client,
    table: String,
}

impl DynamoCounters {
    pub const KEY_ATTRIBUTE: &str = "idempotencyKey";

    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }

    /// The item key of `key`'s counter for the window starting at `window_start`.
    pub fn item_key(key: &str, window_start: u64) -> String {
        format!("RATE#{key}#{window_start}")
    }
}

fn hits(item: Option<&HashMap<String, AttributeValue>>) -> Result<i64, CounterError> {
    match item.and_then(|item| item.get("hits")) {
        None => Ok(0),
        Some(value) => value
            .as_n()
            .ok()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| CounterError(format!("hits is not a whole number: {value:?}"))),
    }
}

impl WindowCounters for DynamoCounters {
    async fn add(&self, key: &str, window_start: u64, delta: i64, expires_at: u64) -> Result<i64, CounterError> {
        let updated = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(Self::KEY_ATTRIBUTE, AttributeValue::S(Self::item_key(key, window_start)))
            .update_expression("ADD hits :delta SET expiresAt = if_not_exists(expiresAt, :expires)")
            .expression_attribute_values(":delta", AttributeValue::N(delta.to_string()))
            .expression_attribute_values(":expires", AttributeValue::N(expires_at.to_string()))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| CounterError(format!("UpdateItem: {}", DisplayErrorContext(&e))))?;
        hits(updated.attributes())
    }

    async fn get(&self, key: &str, window_start: u64) -> Result<i64, CounterError> {
        let found = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(Self::KEY_ATTRIBUTE, AttributeValue::S(Self::item_key(key, window_start)))
            .projection_expression("hits")
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| CounterError(format!("GetItem: {}", DisplayErrorContext(&e))))?;
        hits(found.item())
    }
}
