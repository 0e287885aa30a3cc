//! Read models (the query side of CQRS): what the projections build from events and the query
//! API serves. Each model is a pure fold of events (`apply`) and records, per source stream, the
//! last version it applied, so a duplicate or an older event changes nothing, a gap is seen, and
//! lag against the event store can be measured.
//!
//! All read models live in one table (`READ_MODEL_TABLE`): `pk`/`sk`, plus a `byCustomer` index
//! (`gsi1pk`/`gsi1sk`) for the customer listing, newest first.

pub mod dead_letters;
pub mod queries;
pub mod runtime;
pub mod store;

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::aggregate::decode_event;
use crate::domain::order::{FailedAction, OrderEvent};
use crate::eventstore::{RecordedEvent, StreamId};

/// A read model: keyed by the stream an event comes from, folded from its events.
pub trait ReadModel: Serialize + DeserializeOwned + Default + Clone + PartialEq + Send + Sync {
    /// The projection's name (logs, the rebuild command).
    const NAME: &'static str;

    /// The item an event of `stream` updates, or `None` when this model ignores the stream.
    fn key(stream: &StreamId) -> Option<(String, String)>;

    /// The last version applied per source stream.
    fn versions(&self) -> &BTreeMap<String, u64>;
    fn versions_mut(&mut self) -> &mut BTreeMap<String, u64>;

    /// Folds one event in (never called twice for the same stream position).
    fn apply(&mut self, event: &RecordedEvent);

    /// Applies `event` if it is the next one of its stream. Returns what happened.
    fn apply_next(&mut self, event: &RecordedEvent) -> Applied {
        let applied = self.versions().get(&event.stream_id).copied().unwrap_or(0);
        if event.version <= applied {
            return Applied::AlreadyApplied;
        }
        if event.version > applied + 1 {
            return Applied::Gap { applied };
        }
        self.apply(event);
        self.versions_mut().insert(event.stream_id.clone(), event.version);
        Applied::Applied
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// A duplicate or an older event: nothing changed.
    AlreadyApplied,
    /// Events after `applied` and before this one have not been applied yet.
    Gap {
        applied: u64,
    },
}

pub fn order_key(order_id: &str) -> (String, String) {
    (format!("ORDER#{order_id}"), "VIEW".into())
}

pub fn customer_order_key(order_id: &str) -> (String, String) {
    (format!("ORDER#{order_id}"), "CUSTOMER".into())
}

pub fn inventory_key(sku: &str) -> (String, String) {
    (format!("SKU#{sku}"), "LEVEL".into())
}

pub fn sales_key(day: &str) -> (String, String) {
    (format!("STATS#{day}"), "SALES".into())
}

fn str_field(payload: &Value, name: &str) -> Option<String> {
    payload.get(name).and_then(Value::as_str).map(str::to_owned)
}

/// Where an order stands, as its views show it (stored and served by name, `"Placed"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ViewStatus {
    /// Only payment or shipment events seen so far: across streams, they may arrive first.
    #[default]
    Pending,
    Placed,
    /// Parked, waiting for the payment gateway.
    PaymentPending,
    Completed,
    Cancelled,
    NeedsManualAction,
    ManuallyResolved,
}

impl ViewStatus {
    /// What a customer's listing can be filtered by: the statuses a placed order goes through.
    pub const LISTED: [Self; 5] =
        [Self::Placed, Self::Completed, Self::Cancelled, Self::NeedsManualAction, Self::ManuallyResolved];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Placed => "Placed",
            Self::PaymentPending => "PaymentPending",
            Self::Completed => "Completed",
            Self::Cancelled => "Cancelled",
            Self::NeedsManualAction => "NeedsManualAction",
            Self::ManuallyResolved => "ManuallyResolved",
        }
    }

    /// A listed status by name, as a query names it.
    pub fn listed(name: &str) -> Option<Self> {
        Self::LISTED.into_iter().find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for ViewStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ViewStatus {
    fn eq(&self, name: &&str) -> bool {
        self.as_str() == *name
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimelineEntry {
    pub at: String,
    pub event: String,
    pub stream: String,
    pub version: u64,
}

/// Everything about one order: status, lines, totals, payment and shipment references, and a
/// timeline of the saga's steps as events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    pub order_id: String,
    pub customer_id: String,
    #[serde(default)]
    pub status: ViewStatus,
    pub currency: String,
    pub lines: Vec<Value>,
    pub total_minor: i64,
    pub payment_id: Option<String>,
    pub refund_id: Option<String>,
    pub shipment_id: Option<String>,
    pub carrier: Option<String>,
    pub cancellation_reason: Option<String>,
    /// The step that failed: for a cancelled order the one that ended the saga; for a flagged
    /// one the first of `failed_actions`.
    pub failed_step: Option<String>,
    /// For an order flagged for manual action: every step that kept failing, with its error, in
    /// the order the saga ran them.
    #[serde(default)]
    pub failed_actions: Vec<FailedAction>,
    /// While the order is parked waiting for the payment gateway: until when it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_pending_until: Option<String>,
    /// While the order's refund is parked waiting for the payment gateway: until when it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_pending_until: Option<String>,
    pub placed_at: String,
    pub updated_at: String,
    pub timeline: Vec<TimelineEntry>,
    pub versions: BTreeMap<String, u64>,
}

impl ReadModel for OrderView {
    const NAME: &'static str = "order-view";

    fn key(stream: &StreamId) -> Option<(String, String)> {
        matches!(stream.category(), "Order" | "Payment" | "Shipment").then(|| order_key(stream.id()))
    }

    fn versions(&self) -> &BTreeMap<String, u64> {
        &self.versions
    }

    fn versions_mut(&mut self) -> &mut BTreeMap<String, u64> {
        &mut self.versions
    }

    fn apply(&mut self, e: &RecordedEvent) {
        let p = &e.payload;
        if self.order_id.is_empty() {
            self.order_id = e.stream_id.split_once('-').map(|(_, id)| id.to_owned()).unwrap_or_default();
        }
        match e.event_type.as_str() {
            "OrderPlaced" => {
                self.customer_id = str_field(p, "customerId").unwrap_or_default();
                self.currency = str_field(p, "currency").unwrap_or_default();
                self.lines = p.get("lines").and_then(Value::as_array).cloned().unwrap_or_default();
                self.total_minor = p.pointer("/total/amountMinor").and_then(Value::as_i64).unwrap_or(0);
                self.placed_at = e.recorded_at.clone();
                // Payment or shipment events may have arrived first: placement does not undo what
                // they said (a payment pending stays pending), but ends `Pending`.
                if self.status == ViewStatus::Pending {
                    self.status = ViewStatus::Placed;
                }
            }
            "OrderCompleted" => self.status = ViewStatus::Completed,
            "OrderCancelled" => {
                self.status = ViewStatus::Cancelled;
                self.cancellation_reason = str_field(p, "reason");
                self.failed_step = str_field(p, "failedStep");
                // Flagged before, and its compensations then went through: nothing left to act on.
                self.failed_actions.clear();
            }
            "OrderFlaggedForManualAction" => {
                self.status = ViewStatus::NeedsManualAction;
                // Decoded through the domain, so an event stored in an older schema (one
                // `failedStep`) is upcast to the list.
                self.failed_actions = match decode_event::<OrderEvent>(e) {
                    Ok(OrderEvent::OrderFlaggedForManualAction { failures }) => failures,
                    _ => {
                        tracing::warn!(stream = %e.stream_id, version = e.version, "a flag event that does not decode");
                        vec![]
                    }
                };
                self.failed_step = self.failed_actions.first().map(|f| f.step.clone());
            }
            "OrderManualActionResolved" => self.status = ViewStatus::ManuallyResolved,
            "PaymentPostponed" => {
                self.payment_pending_until = str_field(p, "retryUntil");
                if matches!(self.status, ViewStatus::Pending | ViewStatus::Placed) {
                    self.status = ViewStatus::PaymentPending;
                }
            }
            "PaymentCharged" | "PaymentDeclined" => {
                if e.event_type == "PaymentCharged" {
                    self.payment_id = str_field(p, "paymentId");
                } else {
                    // A lost charge settled as never made (voided): no refund is waiting.
                    self.refund_pending_until = None;
                }
                self.payment_pending_until = None;
                if self.status == ViewStatus::PaymentPending {
                    self.status = ViewStatus::Placed;
                }
            }
            "RefundPostponed" => self.refund_pending_until = str_field(p, "retryUntil"),
            "PaymentRefunded" => {
                self.refund_id = str_field(p, "refundId");
                self.refund_pending_until = None;
            }
            "ShipmentCreated" => {
                self.shipment_id = str_field(p, "shipmentId");
                self.carrier = str_field(p, "carrier");
            }
            _ => {}
        }
        self.updated_at = self.updated_at.clone().max(e.recorded_at.clone());
        self.timeline.push(TimelineEntry {
            at: e.recorded_at.clone(),
            event: e.event_type.clone(),
            stream: e.stream_id.clone(),
            version: e.version,
        });
        // Streams arrive in any relative order: keep the timeline in time order.
        self.timeline.sort_by(|a, b| (&a.at, &a.stream, a.version).cmp(&(&b.at, &b.stream, b.version)));
    }
}

/// One row of a customer's order list (queried newest first through `byCustomer`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomerOrder {
    pub order_id: String,
    pub customer_id: String,
    #[serde(default)]
    pub status: ViewStatus,
    pub total_minor: i64,
    pub currency: String,
    pub placed_at: String,
    /// `CUSTOMER#<customerId>`, set once the order is placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gsi1pk: Option<String>,
    /// `<placedAt>#<orderId>`: newest first when queried backwards.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gsi1sk: Option<String>,
    pub versions: BTreeMap<String, u64>,
}

impl ReadModel for CustomerOrder {
    const NAME: &'static str = "customer-orders";

    fn key(stream: &StreamId) -> Option<(String, String)> {
        (stream.category() == "Order").then(|| customer_order_key(stream.id()))
    }

    fn versions(&self) -> &BTreeMap<String, u64> {
        &self.versions
    }

    fn versions_mut(&mut self) -> &mut BTreeMap<String, u64> {
        &mut self.versions
    }

    fn apply(&mut self, e: &RecordedEvent) {
        let p = &e.payload;
        match e.event_type.as_str() {
            "OrderPlaced" => {
                self.order_id = str_field(p, "orderId").unwrap_or_default();
                self.customer_id = str_field(p, "customerId").unwrap_or_default();
                self.currency = str_field(p, "currency").unwrap_or_default();
                self.total_minor = p.pointer("/total/amountMinor").and_then(Value::as_i64).unwrap_or(0);
                self.placed_at = e.recorded_at.clone();
                self.status = ViewStatus::Placed;
                self.gsi1pk = Some(format!("CUSTOMER#{}", self.customer_id));
                self.gsi1sk = Some(format!("{}#{}", self.placed_at, self.order_id));
            }
            "OrderCompleted" => self.status = ViewStatus::Completed,
            "OrderCancelled" => self.status = ViewStatus::Cancelled,
            "OrderFlaggedForManualAction" => self.status = ViewStatus::NeedsManualAction,
            "OrderManualActionResolved" => self.status = ViewStatus::ManuallyResolved,
            _ => {}
        }
    }
}

/// Stock per SKU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryLevel {
    pub sku: String,
    pub available: i64,
    pub reserved: i64,
    pub versions: BTreeMap<String, u64>,
}

impl ReadModel for InventoryLevel {
    const NAME: &'static str = "inventory-levels";

    fn key(stream: &StreamId) -> Option<(String, String)> {
        (stream.category() == "Inventory").then(|| inventory_key(stream.id()))
    }

    fn versions(&self) -> &BTreeMap<String, u64> {
        &self.versions
    }

    fn versions_mut(&mut self) -> &mut BTreeMap<String, u64> {
        &mut self.versions
    }

    fn apply(&mut self, e: &RecordedEvent) {
        if self.sku.is_empty() {
            self.sku = e.stream_id.split_once('-').map(|(_, s)| s.to_owned()).unwrap_or_default();
        }
        let quantity = e.payload.get("quantity").and_then(Value::as_i64).unwrap_or(0);
        match e.event_type.as_str() {
            "InventoryRestocked" => self.available += quantity,
            "InventoryReserved" => {
                self.available -= quantity;
                self.reserved += quantity;
            }
            "InventoryReleased" => {
                self.reserved -= quantity;
                self.available += quantity;
            }
            "InventoryCommitted" => self.reserved -= quantity,
            _ => {}
        }
    }
}

/// Sales per day (UTC): orders placed, completed, cancelled, and revenue of completed orders
/// per currency. Counters are commutative, so these are kept idempotent by a marker per applied
/// event rather than by per-stream versions (one map per order would not fit one item).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DailySales {
    pub day: String,
    pub placed: i64,
    pub completed: i64,
    pub cancelled: i64,
    pub revenue_minor: BTreeMap<String, i64>,
}

/// What one order event adds to its day's sales. Completion revenue needs the order's total,
/// which the caller reads from the order's `OrderPlaced`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SalesDelta {
    pub day: String,
    pub placed: i64,
    pub completed: i64,
    pub cancelled: i64,
    pub revenue: Option<(String, i64)>,
}

impl SalesDelta {
    /// `None` for events that do not count (or that are not the order's).
    pub fn of(event: &RecordedEvent, placed: Option<&RecordedEvent>) -> Option<Self> {
        let day = event.recorded_at.get(..10)?.to_owned();
        let mut delta = SalesDelta { day, placed: 0, completed: 0, cancelled: 0, revenue: None };
        match event.event_type.as_str() {
            "OrderPlaced" => delta.placed = 1,
            "OrderCompleted" => {
                delta.completed = 1;
                let p = &placed?.payload;
                let currency = p.get("currency").and_then(Value::as_str)?.to_owned();
                delta.revenue = Some((currency, p.pointer("/total/amountMinor").and_then(Value::as_i64)?));
            }
            "OrderCancelled" => delta.cancelled = 1,
            _ => return None,
        }
        Some(delta)
    }
}

impl DailySales {
    pub fn add(&mut self, delta: &SalesDelta) {
        self.day.clone_from(&delta.day);
        self.placed += delta.placed;
        self.completed += delta.completed;
        self.cancelled += delta.cancelled;
        if let Some((currency, amount)) = &delta.revenue {
            *self.revenue_minor.entry(currency.clone()).or_default() += amount;
        }
    }
}

#[cfg(test)]
mod tests;
