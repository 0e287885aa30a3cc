//! Read models (the query side of CQRS): what the projections build from events and the query
//! API serves. Each model is a pure fold of events (`apply`) and records, per source stream, the
//! last version it applied, so a duplicate or an older event changes nothing, a gap is seen, and
//! lag against the event store can be measured.
//!
//! All read models live in one table (`READ_MODEL_TABLE`): `pk`/`sk`, plus a `byCustomer` index
//! (`gsi1pk`/`gsi1sk`) for the customer listing, newest first.

pub mod dead_letters;

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::aggregate::{CodecError, DomainEvent, decode_event};
use crate::domain::order::{FailedAction, OrderEvent, OrderLine};
use crate::domain::{Currency, Money};
use crate::eventstore::{RecordedEvent, StreamId};

/// A read model: keyed by the stream an event comes from, folded from its events.
pub trait ReadModel: Serialize + DeserializeOwned + Default + Clone + PartialEq + Send + Sync {
    /// The projection's name (logs, the rebuild command).
    const NAME: &'static str;

    /// The item an event of `stream` updates, or `None` when this model ignores the stream.
    fn key(stream: &StreamId) -> Option<(String, String)>;

    /// The last version applied per source stream.
    fn versions(&mut self) -> &mut BTreeMap<String, u64>;

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
        self.versions().insert(event.stream_id.clone(), event.version);
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

/// `event` as the domain's event type `E` (upcast from an older schema), `None` when it is not one:
/// an event type `E` does not have is ignored, one that does not decode is logged and skipped.
pub(crate) fn decode<E: DomainEvent>(event: &RecordedEvent) -> Option<E> {
    decode_event(event)
        .inspect_err(|error| match error {
            CodecError::Decode { message, .. } if message.starts_with("unknown variant") => {}
            _ => tracing::warn!(stream = %event.stream_id, version = event.version, %error, "event skipped"),
        })
        .ok()
}

/// An order's total as its views store and serve it, `totalMinor` and `currency` (`0` and `""`
/// until the order is placed).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredTotal {
    total_minor: i64,
    currency: String,
}

fn serialize_total<S: Serializer>(total: &Option<Money>, s: S) -> Result<S::Ok, S::Error> {
    let (total_minor, currency) = total.map_or((0, String::new()), |m| (m.amount_minor, m.currency.to_string()));
    StoredTotal { total_minor, currency }.serialize(s)
}

fn deserialize_total<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Money>, D::Error> {
    let StoredTotal { total_minor, currency } = StoredTotal::deserialize(d)?;
    match Currency::parse(&currency) {
        None if !currency.is_empty() => Err(serde::de::Error::custom(format!("{currency:?} is not a currency"))),
        parsed => Ok(parsed.map(|currency| Money::new(total_minor, currency))),
    }
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
    pub lines: Vec<OrderLine>,
    /// `None` until the order is placed; stored and served as `totalMinor` and `currency`.
    #[serde(flatten, serialize_with = "serialize_total", deserialize_with = "deserialize_total")]
    pub total: Option<Money>,
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

    fn versions(&mut self) -> &mut BTreeMap<String, u64> {
        &mut self.versions
    }

    fn apply(&mut self, e: &RecordedEvent) {
        use crate::domain::{order::OrderEvent::*, payment::PaymentEvent::*, shipment::ShipmentEvent::ShipmentCreated};
        let (category, id) = e.stream_id.split_once('-').unwrap_or_default();
        if self.order_id.is_empty() {
            id.clone_into(&mut self.order_id);
        }
        match category {
            "Order" => match decode(e) {
                Some(OrderPlaced(order)) => {
                    self.customer_id = order.customer_id.into();
                    (self.lines, self.total) = (order.lines, Some(order.total));
                    self.placed_at.clone_from(&e.recorded_at);
                }
                Some(OrderCompleted { .. }) => self.status = ViewStatus::Completed,
                Some(OrderCancelled { reason, failed_step }) => {
                    self.status = ViewStatus::Cancelled;
                    (self.cancellation_reason, self.failed_step) = (Some(reason), Some(failed_step));
                    // Flagged before, and its compensations then went through: nothing left to act on.
                    self.failed_actions.clear();
                }
                // An event stored in an older schema (one `failedStep`) is upcast to the list.
                Some(OrderFlaggedForManualAction { failures }) => {
                    self.status = ViewStatus::NeedsManualAction;
                    self.failed_step = failures.first().map(|f| f.step.clone());
                    self.failed_actions = failures;
                }
                Some(OrderManualActionResolved { .. }) => self.status = ViewStatus::ManuallyResolved,
                Some(CustomerNotified { .. }) | None => {}
            },
            "Payment" => match decode(e) {
                Some(PaymentPostponed { retry_until, .. }) => self.payment_pending_until = Some(retry_until),
                Some(PaymentCharged { payment_id: id, .. }) => {
                    (self.payment_id, self.payment_pending_until) = (Some(id), None)
                }
                // A lost charge settled as never made (voided): no refund is waiting either.
                Some(PaymentDeclined { .. }) => (self.payment_pending_until, self.refund_pending_until) = (None, None),
                Some(RefundPostponed { retry_until, .. }) => self.refund_pending_until = Some(retry_until),
                Some(PaymentRefunded { refund_id: id, .. }) => {
                    (self.refund_id, self.refund_pending_until) = (Some(id), None)
                }
                Some(PaymentRequested { .. }) | None => {}
            },
            "Shipment" => {
                if let Some(ShipmentCreated { shipment_id, carrier, .. }) = decode(e) {
                    (self.shipment_id, self.carrier) = (Some(shipment_id), Some(carrier));
                }
            }
            _ => {}
        }
        // Payment or shipment events may arrive before the order's own: placement ends `Pending`
        // but leaves a postponed payment pending; a payment waits until settled, then is placed.
        self.status = match (self.status, &self.payment_pending_until) {
            (ViewStatus::Pending | ViewStatus::Placed, Some(_)) => ViewStatus::PaymentPending,
            (ViewStatus::PaymentPending, None) => ViewStatus::Placed,
            (ViewStatus::Pending, None) if !self.placed_at.is_empty() => ViewStatus::Placed,
            (status, _) => status,
        };
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
    /// `None` until the order is placed; stored and served as `totalMinor` and `currency`.
    #[serde(flatten, serialize_with = "serialize_total", deserialize_with = "deserialize_total")]
    pub total: Option<Money>,
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

    fn versions(&mut self) -> &mut BTreeMap<String, u64> {
        &mut self.versions
    }

    fn apply(&mut self, e: &RecordedEvent) {
        use OrderEvent::*;
        match decode(e) {
            Some(OrderPlaced(order)) => {
                (self.order_id, self.customer_id) = (order.order_id.into(), order.customer_id.into());
                self.total = Some(order.total);
                self.placed_at.clone_from(&e.recorded_at);
                self.status = ViewStatus::Placed;
                self.gsi1pk = Some(format!("CUSTOMER#{}", self.customer_id));
                self.gsi1sk = Some(format!("{}#{}", self.placed_at, self.order_id));
            }
            Some(OrderCompleted { .. }) => self.status = ViewStatus::Completed,
            Some(OrderCancelled { .. }) => self.status = ViewStatus::Cancelled,
            Some(OrderFlaggedForManualAction { .. }) => self.status = ViewStatus::NeedsManualAction,
            Some(OrderManualActionResolved { .. }) => self.status = ViewStatus::ManuallyResolved,
            Some(CustomerNotified { .. }) | None => {}
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

    fn versions(&mut self) -> &mut BTreeMap<String, u64> {
        &mut self.versions
    }

    fn apply(&mut self, e: &RecordedEvent) {
        use crate::domain::inventory::InventoryEvent::*;
        if self.sku.is_empty() {
            self.sku = e.stream_id.split_once('-').map(|(_, s)| s.to_owned()).unwrap_or_default();
        }
        let (available, reserved) = match decode(e) {
            Some(InventoryRestocked { quantity, .. }) => (i64::from(quantity), 0),
            Some(InventoryReserved { quantity, .. }) => (-i64::from(quantity), i64::from(quantity)),
            Some(InventoryReleased { quantity, .. }) => (i64::from(quantity), -i64::from(quantity)),
            Some(InventoryCommitted { quantity, .. }) => (0, -i64::from(quantity)),
            Some(InventoryReservationRejected { .. }) | None => (0, 0),
        };
        self.available += available;
        self.reserved += reserved;
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

/// What one order event adds to its day's sales.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SalesDelta {
    pub day: String,
    pub placed: i64,
    pub completed: i64,
    pub cancelled: i64,
    /// A completion's: the order's total, which the caller reads from its `OrderPlaced`
    /// ([`placed_total`]).
    pub revenue: Option<Money>,
}

impl SalesDelta {
    /// `None` for events that do not count (or that are not the order's).
    pub fn of(event: &RecordedEvent) -> Option<Self> {
        let day = event.recorded_at.get(..10)?.to_owned();
        let (placed, completed, cancelled) = match decode(event)? {
            OrderEvent::OrderPlaced(_) => (1, 0, 0),
            OrderEvent::OrderCompleted { .. } => (0, 1, 0),
            OrderEvent::OrderCancelled { .. } => (0, 0, 1),
            _ => return None,
        };
        Some(SalesDelta { day, placed, completed, cancelled, revenue: None })
    }
}

/// The total of the order whose events these are, from its `OrderPlaced`.
pub fn placed_total(events: &[RecordedEvent]) -> Option<Money> {
    events.iter().find_map(|e| match decode(e) {
        Some(OrderEvent::OrderPlaced(order)) => Some(order.total),
        _ => None,
    })
}

impl DailySales {
    pub fn add(&mut self, delta: &SalesDelta) {
        self.day.clone_from(&delta.day);
        self.placed += delta.placed;
        self.completed += delta.completed;
        self.cancelled += delta.cancelled;
        if let Some(revenue) = delta.revenue {
            *self.revenue_minor.entry(revenue.currency.to_string()).or_default() += revenue.amount_minor;
        }
    }
}

#[cfg(test)]
mod tests;
