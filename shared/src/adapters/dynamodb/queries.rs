//! The query side of the read models: what the query API serves, next to the models it reads
//! (the HTTP API only maps requests and answers onto these).
//!
//! - [`ReadModelStore::customer_orders`]: a customer's orders, newest first, optionally one
//!   status, paged by an opaque cursor.
//! - [`stream_lag`]: how far each read model following a stream is behind the event store.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::types::AttributeValue;
use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE_NO_PAD, URL_SAFE_NO_PAD_INDIFFERENT};
use serde_dynamo::aws_sdk_dynamodb_1::from_item;
use serde_json::{Value, json};

use super::readmodels::{Lag, ProjectionError, ReadModelStore, request_error};
use crate::domain::CustomerId;
use crate::eventstore::{EventStore, StreamId};
use crate::readmodel::{CustomerOrder, InventoryLevel, OrderView, ReadModel, ViewStatus};

type Item = HashMap<String, AttributeValue>;

/// The read model table's index for a customer's orders (`gsi1pk`, `gsi1sk`).
pub const CUSTOMER_INDEX: &str = "byCustomer";
/// A filtered listing keeps querying until its page is full; this bounds the reads one request
/// may make (each reads up to 1 MB) when few orders match.
const MAX_QUERY_ROUND_TRIPS: usize = 25;

/// Why a listing could not be read.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Not a position in this customer's listing (another's, or forged).
    #[error("invalid cursor")]
    InvalidCursor,
    #[error(transparent)]
    Store(#[from] ProjectionError),
}

/// One page of a customer's orders.
#[derive(Debug, Clone, PartialEq)]
pub struct OrdersPage {
    /// Newest first; the index keys left out.
    pub items: Vec<CustomerOrder>,
    /// Where the next page starts, if there is one.
    pub next_cursor: Option<String>,
}

impl ReadModelStore {
    /// A customer's orders, newest first, only `status` if given: up to `limit`, after `cursor`.
    pub async fn customer_orders(
        &self,
        customer: &CustomerId,
        status: Option<ViewStatus>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<OrdersPage, QueryError> {
        let gsi1pk = format!("CUSTOMER#{customer}");
        let mut start = cursor.map(|c| decode_cursor(c, &gsi1pk)).transpose()?;
        // One more than the page holds tells whether a next page exists, so a next cursor never
        // leads to an empty page. A filter applies after DynamoDB's `Limit`: keep querying.
        let wanted = limit + 1;
        let mut rows: Vec<Item> = Vec::with_capacity(wanted);
        let mut round_trips = 0;
        let mut stopped_at = None;
        loop {
            round_trips += 1;
            let remaining = wanted - rows.len();
            let page_limit = if status.is_some() { (remaining * 4).clamp(25, 1000) } else { remaining };
            let mut query = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(CUSTOMER_INDEX)
                .key_condition_expression("gsi1pk = :pk")
                .expression_attribute_values(":pk", AttributeValue::S(gsi1pk.clone()))
                .scan_index_forward(false)
                .limit(i32::try_from(page_limit).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take());
            if let Some(status) = status {
                query = query
                    .filter_expression("#status = :status")
                    .expression_attribute_names("#status", "status")
                    .expression_attribute_values(":status", AttributeValue::S(status.as_str().to_owned()));
            }
            let page = query.send().await.map_err(|e| ProjectionError::from(request_error("Query byCustomer", e)))?;
            rows.extend(page.items.unwrap_or_default());
            start = page.last_evaluated_key;
            if rows.len() >= wanted || start.is_none() {
                break;
            }
            if round_trips >= MAX_QUERY_ROUND_TRIPS {
                // Few matches in a long history: answer what was found; the cursor goes on from
                // where the reading stopped.
                stopped_at = start.take();
                break;
            }
        }
        let corrupt = |what: &str| QueryError::Store(ProjectionError::Corrupt(what.to_owned()));
        let next_cursor = if rows.len() > limit {
            rows.truncate(limit);
            let last = rows.last().ok_or_else(|| corrupt("empty page with more rows"))?;
            Some(encode_cursor(last).ok_or_else(|| corrupt("a listed order has no index keys"))?)
        } else {
            match stopped_at {
                Some(key) => Some(encode_cursor(&key).ok_or_else(|| corrupt("unexpected LastEvaluatedKey"))?),
                None => None,
            }
        };
        let items = rows
            .into_iter()
            .map(|item| {
                let mut order: CustomerOrder =
                    from_item(item).map_err(|e| corrupt(&format!("customer order is malformed: {e}")))?;
                // Index keys are storage, not part of the answer.
                order.gsi1pk = None;
                order.gsi1sk = None;
                Ok(order)
            })
            .collect::<Result<Vec<_>, QueryError>>()?;
        Ok(OrdersPage { items, next_cursor })
    }
}

/// A cursor is the position after the last item returned: the listing's `LastEvaluatedKey`
/// (table and index keys), as URL-safe base64 of its JSON.
fn encode_cursor(key: &Item) -> Option<String> {
    let mut json = serde_json::Map::new();
    for name in ["pk", "sk", "gsi1pk", "gsi1sk"] {
        json.insert(name.to_owned(), json!(key.get(name)?.as_s().ok()?));
    }
    Some(URL_SAFE_NO_PAD.encode(Value::Object(json).to_string()))
}

/// Reads a cursor back, refusing anything that is not a position in this customer's listing
/// (so a forged cursor is refused, not a failed query).
fn decode_cursor(cursor: &str, gsi1pk: &str) -> Result<Item, QueryError> {
    let bytes = URL_SAFE_NO_PAD_INDIFFERENT.decode(cursor.trim()).map_err(|_| QueryError::InvalidCursor)?;
    let key: BTreeMap<String, String> = serde_json::from_slice(&bytes).map_err(|_| QueryError::InvalidCursor)?;
    let valid = key.len() == 4
        && key.get("gsi1pk").map(String::as_str) == Some(gsi1pk)
        && key.get("sk").map(String::as_str) == Some("CUSTOMER")
        && key.get("pk").is_some_and(|pk| pk.len() > 6 && pk.starts_with("ORDER#"))
        && key.get("gsi1sk").is_some_and(|sk| !sk.is_empty())
        && key.values().all(|v| v.len() <= 1024);
    if !valid {
        return Err(QueryError::InvalidCursor);
    }
    Ok(key.into_iter().map(|(k, v)| (k, AttributeValue::S(v))).collect())
}

/// How far each read model following a stream is behind the event store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamLag {
    pub head: u64,
    /// The version each model applied, by model name.
    pub applied: BTreeMap<&'static str, u64>,
    /// How many events each model is behind.
    pub behind: BTreeMap<&'static str, u64>,
}

/// The lag of every read model that follows `stream`'s category (`None`: none does). The
/// models are read first, then the head: a model is never seen ahead of the head.
pub async fn stream_lag<S: EventStore>(
    events: &S,
    models: &ReadModelStore,
    stream: &StreamId,
) -> Result<Option<StreamLag>, ProjectionError> {
    let mut applied = BTreeMap::new();
    if OrderView::key(stream).is_some() {
        applied.insert(OrderView::NAME, models.applied_version::<OrderView>(stream).await?);
    }
    if CustomerOrder::key(stream).is_some() {
        applied.insert(CustomerOrder::NAME, models.applied_version::<CustomerOrder>(stream).await?);
    }
    if InventoryLevel::key(stream).is_some() {
        applied.insert(InventoryLevel::NAME, models.applied_version::<InventoryLevel>(stream).await?);
    }
    if applied.is_empty() {
        return Ok(None);
    }
    let head = events.head_version(stream).await?;
    let behind = applied.iter().map(|(name, v)| (*name, Lag::new(head, *v).behind)).collect();
    Ok(Some(StreamLag { head, applied, behind }))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn cursors_round_trip_and_forgeries_are_refused() {
        let key: Item = [("pk", "ORDER#o1"), ("sk", "CUSTOMER"), ("gsi1pk", "CUSTOMER#c1"), ("gsi1sk", "2026#o1")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), AttributeValue::S(v.to_owned())))
            .collect();
        let cursor = encode_cursor(&key).unwrap();
        assert!(cursor.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{cursor}");
        assert_eq!(decode_cursor(&cursor, "CUSTOMER#c1").unwrap(), key);
        assert!(decode_cursor(&cursor, "CUSTOMER#other").is_err(), "another customer's cursor");
        assert!(decode_cursor("not base64!", "CUSTOMER#c1").is_err());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode("[1]"), "CUSTOMER#c1").is_err());
        let forged = URL_SAFE_NO_PAD.encode(r#"{"pk":"x","sk":"CUSTOMER","gsi1pk":"CUSTOMER#c1","gsi1sk":"s"}"#);
        assert!(decode_cursor(&forged, "CUSTOMER#c1").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any cursor is a position in the listing, or refused as invalid: never a panic.
        #[test]
        fn any_cursor_is_a_position_in_the_listing_or_invalid(
            cursor in prop_oneof![".{0,200}", "[A-Za-z0-9_-]{0,200}", any::<Vec<u8>>().prop_map(|b| URL_SAFE_NO_PAD.encode(b))],
        ) {
            match decode_cursor(&cursor, "CUSTOMER#c1") {
                Ok(key) => prop_assert_eq!(key.len(), 4),
                Err(e) => prop_assert!(matches!(e, QueryError::InvalidCursor)),
            }
        }
    }
}
