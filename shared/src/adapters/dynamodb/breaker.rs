//! The circuit breaker's state in DynamoDB: the [`BreakerStore`] port over the commands table
//! (see `resilience::breaker` for the design).

use std::collections::HashMap;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};

use super::DynamoCounters;
use crate::resilience::breaker::{
    BreakerPolicy, BreakerStore, CircuitBreaker, Snapshot, State, StoreError, Transition,
};

/// The breaker of a deployed function: its state and failure counters in the commands table.
pub type SharedBreaker = CircuitBreaker<DynamoBreakerStore, DynamoCounters>;

impl SharedBreaker {
    /// `name`'s breaker over `table` (the commands table), or `None` when the policy turns it off.
    pub fn in_table(client: Client, table: &str, name: &str, policy: Option<BreakerPolicy>) -> Option<Self> {
        let policy = policy?;
        let store = DynamoBreakerStore::new(client.clone(), table);
        Some(CircuitBreaker::new(name, policy, store, DynamoCounters::new(client, table)))
    }
}

/// The state in the commands table (see the module docs; the table is chosen for the same
/// reasons as the rate limiter's counters: a string key, a TTL, and every function that calls a
/// provider already has access to it).
#[derive(Debug, Clone)]
pub struct DynamoBreakerStore {
    client: Client,
    table: String,
}

/// A week: long enough to read an incident's transitions back.
const HISTORY_TTL_S: u64 = 7 * 24 * 3600;

impl DynamoBreakerStore {
    const KEY: &str = "idempotencyKey";

    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }

    fn state_key(name: &str) -> AttributeValue {
        AttributeValue::S(format!("BREAKER#{name}"))
    }

    fn history_key(name: &str, version: u64) -> AttributeValue {
        AttributeValue::S(format!("BREAKER#{name}#{version:08}"))
    }
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn number(item: &HashMap<String, AttributeValue>, name: &str) -> u64 {
    item.get(name).and_then(|v| v.as_n().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn text<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> &'a str {
    item.get(name).and_then(|v| v.as_s().ok()).map_or("", String::as_str)
}

fn store_error(what: &str, e: impl std::error::Error) -> StoreError {
    StoreError(format!("{what}: {}", DisplayErrorContext(e)))
}

impl BreakerStore for DynamoBreakerStore {
    async fn read(&self, name: &str) -> Result<Snapshot, StoreError> {
        let found = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(Self::KEY, Self::state_key(name))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| store_error("GetItem", e))?;
        let Some(item) = found.item() else { return Ok(Snapshot::default()) };
        Ok(Snapshot {
            state: State::parse(text(item, "state")).unwrap_or_default(),
            version: number(item, "version"),
            open_until_ms: number(item, "openUntilMs"),
            probe_until_ms: number(item, "probeUntilMs"),
        })
    }

    async fn transition(
        &self,
        name: &str,
        from: &Snapshot,
        to: &Snapshot,
        at_ms: u64,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let expected =
            if from.version == 0 { "(attribute_not_exists(#version) OR #version = :from)" } else { "#version = :from" };
        let state = Update::builder()
            .table_name(&self.table)
            .key(Self::KEY, Self::state_key(name))
            .update_expression(
                "SET #state = :to, #version = :version, openUntilMs = :openUntil, probeUntilMs = :probeUntil, \
                 changedAtMs = :at, reason = :reason",
            )
            .condition_expression(format!("{expected} AND (attribute_not_exists(#state) OR #state = :fromState)"))
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#version", "version")
            .expression_attribute_values(":to", AttributeValue::S(to.state.as_str().into()))
            .expression_attribute_values(":fromState", AttributeValue::S(from.state.as_str().into()))
            .expression_attribute_values(":version", n(to.version))
            .expression_attribute_values(":from", n(from.version))
            .expression_attribute_values(":openUntil", n(to.open_until_ms))
            .expression_attribute_values(":probeUntil", n(to.probe_until_ms))
            .expression_attribute_values(":at", n(at_ms))
            .expression_attribute_values(":reason", AttributeValue::S(reason.into()))
            .build()
            .map_err(|e| StoreError(e.to_string()))?;
        let history = Put::builder()
            .table_name(&self.table)
            .item(Self::KEY, Self::history_key(name, to.version))
            .item("from", AttributeValue::S(from.state.as_str().into()))
            .item("to", AttributeValue::S(to.state.as_str().into()))
            .item("atMs", n(at_ms))
            .item("reason", AttributeValue::S(reason.into()))
            .item("expiresAt", n(at_ms / 1000 + HISTORY_TTL_S))
            .build()
            .map_err(|e| StoreError(e.to_string()))?;
        let written = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(state).build())
            .transact_items(TransactWriteItem::builder().put(history).build())
            .send()
            .await;
        match written {
            Ok(_) => Ok(true),
            Err(e) => {
                let cancelled = e.as_service_error().is_some_and(|s| s.is_transaction_canceled_exception());
                if cancelled { Ok(false) } else { Err(store_error("TransactWriteItems", e)) }
            }
        }
    }

    async fn claim_probe(&self, name: &str, from: &Snapshot, until_ms: u64) -> Result<bool, StoreError> {
        let claimed = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(Self::KEY, Self::state_key(name))
            .update_expression("SET probeUntilMs = :until")
            .condition_expression("#version = :version AND probeUntilMs = :lease")
            .expression_attribute_names("#version", "version")
            .expression_attribute_values(":version", n(from.version))
            .expression_attribute_values(":lease", n(from.probe_until_ms))
            .expression_attribute_values(":until", n(until_ms))
            .send()
            .await;
        match claimed {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => Ok(false),
            Err(e) => Err(store_error("UpdateItem", e)),
        }
    }

    async fn history(&self, name: &str, count: u64) -> Result<Vec<Transition>, StoreError> {
        let last = self.read(name).await?.version;
        if last == 0 || count == 0 {
            return Ok(Vec::new());
        }
        let first = last.saturating_sub(count - 1).max(1);
        let mut transitions = Vec::new();
        // BatchGetItem takes 100 keys.
        for chunk in (first..=last).collect::<Vec<_>>().chunks(100) {
            let mut keys = aws_sdk_dynamodb::types::KeysAndAttributes::builder().consistent_read(true);
            for version in chunk {
                keys = keys.keys(HashMap::from([(Self::KEY.to_owned(), Self::history_key(name, *version))]));
            }
            let keys = keys.build().map_err(|e| StoreError(e.to_string()))?;
            let got = self
                .client
                .batch_get_item()
                .request_items(&self.table, keys)
                .send()
                .await
                .map_err(|e| store_error("BatchGetItem", e))?;
            for item in got.responses().and_then(|r| r.get(&self.table)).into_iter().flatten() {
                let version = text(item, Self::KEY).rsplit('#').next().and_then(|v| v.parse().ok()).unwrap_or(0);
                transitions.push(Transition {
                    version,
                    from: State::parse(text(item, "from")).unwrap_or_default(),
                    to: State::parse(text(item, "to")).unwrap_or_default(),
                    at_ms: number(item, "atMs"),
                    reason: text(item, "reason").to_owned(),
                });
            }
        }
        transitions.sort_by_key(|t| t.version);
        Ok(transitions)
    }
}
