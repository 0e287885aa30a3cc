//! The Order aggregate: placed once, then completed, cancelled (with the reason) or flagged for
//! manual action naming every step that could not be carried out.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::ids::{CustomerId, FieldError, OrderId, Sku};
use super::money::{Currency, Money};
use crate::aggregate::{Aggregate, DomainEvent};

pub const MAX_LINES: usize = 50;
pub const MAX_QUANTITY: u32 = 1_000;
/// 1,000,000 major units: a guard against typos and overflow, not a business rule.
pub const MAX_UNIT_PRICE_MINOR: i64 = 100_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    pub sku: Sku,
    pub quantity: u32,
    pub unit_price_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Address {
    pub name: String,
    pub line1: String,
    pub city: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
}

/// An order as a client submits it: untrusted, validated into [`PlaceOrder`].
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderRequest {
    pub order_id: String,
    pub customer_id: String,
    pub currency: String,
    pub lines: Vec<LineRequest>,
    pub payment_token: String,
    pub shipping_address: Address,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LineRequest {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_minor: i64,
}

/// A validated order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlaceOrder {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub currency: Currency,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    pub payment_token: String,
    pub shipping_address: Address,
}

fn check_text(errors: &mut Vec<FieldError>, field: &str, value: &str, max: usize) {
    if value.trim().is_empty() || value.len() > max || value.chars().any(char::is_control) {
        errors.push(FieldError::new(field, format!("must be 1 to {max} printable characters")));
    }
}

impl OrderRequest {
    /// Validates everything and reports every problem at once.
    pub fn validate(&self) -> Result<PlaceOrder, Vec<FieldError>> {
        let mut errors = Vec::new();
        let order_id = OrderId::parse(&self.order_id).map_err(|e| errors.push(e)).ok();
        let customer_id = CustomerId::parse(&self.customer_id).map_err(|e| errors.push(e)).ok();
        let currency = Currency::parse(&self.currency);
        if currency.is_none() {
            errors.push(FieldError::new("currency", format!("{:?} is not a supported currency", self.currency)));
        }
        if self.lines.is_empty() || self.lines.len() > MAX_LINES {
            errors.push(FieldError::new("lines", format!("an order has 1 to {MAX_LINES} lines")));
        }
        let mut lines = Vec::with_capacity(self.lines.len());
        for (i, line) in self.lines.iter().enumerate() {
            let field = |name: &str| format!("lines[{i}].{name}");
            let sku = Sku::parse(&line.sku).map_err(|e| errors.push(FieldError::new(field("sku"), e.message))).ok();
            if self.lines[..i].iter().any(|l| l.sku == line.sku) {
                errors.push(FieldError::new(field("sku"), "appears twice: put the quantity on one line"));
            }
            let quantity = u32::try_from(line.quantity).ok().filter(|q| (1..=MAX_QUANTITY).contains(q));
            if quantity.is_none() {
                errors.push(FieldError::new(field("quantity"), format!("must be 1 to {MAX_QUANTITY}")));
            }
            if !(1..=MAX_UNIT_PRICE_MINOR).contains(&line.unit_price_minor) {
                errors.push(FieldError::new(
                    field("unitPriceMinor"),
                    format!("must be 1 to {MAX_UNIT_PRICE_MINOR} minor units"),
                ));
            }
            if let (Some(sku), Some(quantity)) = (sku, quantity) {
                lines.push(OrderLine { sku, quantity, unit_price_minor: line.unit_price_minor });
            }
        }
        check_text(&mut errors, "paymentToken", &self.payment_token, 128);
        let a = &self.shipping_address;
        check_text(&mut errors, "shippingAddress.name", &a.name, 200);
        check_text(&mut errors, "shippingAddress.line1", &a.line1, 200);
        check_text(&mut errors, "shippingAddress.city", &a.city, 100);
        check_text(&mut errors, "shippingAddress.postalCode", &a.postal_code, 20);
        if a.country.len() != 2 || !a.country.chars().all(|c| c.is_ascii_uppercase()) {
            errors.push(FieldError::new("shippingAddress.country", "must be an ISO 3166 alpha-2 code"));
        }
        let (Some(order_id), Some(customer_id), Some(currency), true) =
            (order_id, customer_id, currency, errors.is_empty())
        else {
            return Err(errors);
        };
        // Bounded above (50 lines x 1,000 x 10^8), so this cannot overflow; checked all the same.
        let total = lines.iter().try_fold(Money::zero(currency), |sum, l| {
            Money::new(l.unit_price_minor, currency).checked_mul(l.quantity).and_then(|m| sum.checked_add(m))
        });
        let Some(total) = total else { return Err(vec![FieldError::new("lines", "the total overflows")]) };
        Ok(PlaceOrder {
            order_id,
            customer_id,
            currency,
            lines,
            total,
            payment_token: self.payment_token.clone(),
            shipping_address: self.shipping_address.clone(),
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    #[default]
    New,
    Placed,
    Completed,
    Cancelled,
    NeedsManualAction,
    /// A person settled a flagged order by hand (final, like completed or cancelled).
    ManuallyResolved,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub status: OrderStatus,
    pub placed: Option<PlaceOrder>,
    pub payment_id: Option<String>,
    pub shipment_id: Option<String>,
    pub cancellation_reason: Option<String>,
    pub notified: bool,
    /// When flagged for manual action: every step that kept failing, in the order they ran.
    #[serde(default)]
    pub failed_actions: Vec<FailedAction>,
}

/// A step that still failed after its retries (a compensation, or the final cancel or complete),
/// and how: what a person has to act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedAction {
    pub step: String,
    pub error: String,
}

impl FailedAction {
    pub fn new(step: impl Into<String>, error: impl Into<String>) -> Self {
        Self { step: step.into(), error: error.into() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum OrderEvent {
    OrderPlaced(PlaceOrder),
    #[serde(rename_all = "camelCase")]
    CustomerNotified {
        channel: String,
        message_id: String,
    },
    #[serde(rename_all = "camelCase")]
    OrderCompleted {
        payment_id: String,
        shipment_id: String,
    },
    #[serde(rename_all = "camelCase")]
    OrderCancelled {
        reason: String,
        failed_step: String,
    },
    /// Steps failed after their retries (the saga ran the other compensations all the same):
    /// someone has to act on each of them. Schema v2; v1 named one step (`failedStep`, `error`)
    /// and is upcast to a list of one.
    #[serde(rename_all = "camelCase")]
    OrderFlaggedForManualAction {
        failures: Vec<FailedAction>,
    },
    /// A person settled a flagged order by hand, saying how.
    #[serde(rename_all = "camelCase")]
    OrderManualActionResolved {
        by: String,
        note: String,
    },
}

/// `OrderFlaggedForManualAction`'s schema: v2 lists every step that failed.
const FLAGGED_SCHEMA_VERSION: u32 = 2;

impl DomainEvent for OrderEvent {
    fn current_schema_version(event_type: &str) -> u32 {
        match event_type {
            "OrderFlaggedForManualAction" => FLAGGED_SCHEMA_VERSION,
            _ => 1,
        }
    }

    fn upcast(event_type: &str, from_version: u32, payload: Value) -> Result<Value, String> {
        match (event_type, from_version) {
            // v1 `{failedStep, error}`: the one compensation that failed, before the saga ran the
            // others all the same.
            ("OrderFlaggedForManualAction", 1) => {
                let text = |field: &str| {
                    payload
                        .get(field)
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .ok_or_else(|| format!("v1 has no text {field:?}"))
                };
                Ok(json!({ "failures": [{ "step": text("failedStep")?, "error": text("error")? }] }))
            }
            _ => Err(format!("no upcaster for {event_type} from schema version {from_version}")),
        }
    }
}

#[derive(Debug, Clone)]
pub enum OrderCommand {
    Place(PlaceOrder),
    RecordNotification { channel: String, message_id: String },
    Complete { payment_id: String, shipment_id: String },
    Cancel { reason: String, failed_step: String },
    FlagForManualAction { failures: Vec<FailedAction> },
    ResolveManualAction { by: String, note: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("order {0} already exists with different content")]
    AlreadyPlacedDifferently(String),
    #[error("order is {status:?}: cannot {action}")]
    InvalidTransition { status: OrderStatus, action: &'static str },
    #[error("flagging for manual action needs at least one failed step")]
    NothingFailed,
}

impl Aggregate for Order {
    const CATEGORY: &'static str = "Order";
    /// One order's stream: a handful of events, replayed in one Query.
    const SNAPSHOTS: bool = false;
    type Event = OrderEvent;
    type Command = OrderCommand;
    type Error = OrderError;

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderPlaced(placed) => {
                self.status = OrderStatus::Placed;
                self.placed = Some(placed.clone());
            }
            OrderEvent::CustomerNotified { .. } => self.notified = true,
            OrderEvent::OrderCompleted { payment_id, shipment_id } => {
                self.status = OrderStatus::Completed;
                self.payment_id = Some(payment_id.clone());
                self.shipment_id = Some(shipment_id.clone());
            }
            OrderEvent::OrderCancelled { reason, .. } => {
                self.status = OrderStatus::Cancelled;
                self.cancellation_reason = Some(reason.clone());
            }
            OrderEvent::OrderFlaggedForManualAction { failures } => {
                self.status = OrderStatus::NeedsManualAction;
                self.failed_actions = failures.clone();
            }
            OrderEvent::OrderManualActionResolved { .. } => self.status = OrderStatus::ManuallyResolved,
        }
    }

    fn decide(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderStatus::*;
        let invalid = |action| Err(OrderError::InvalidTransition { status: self.status, action });
        match (command, self.status) {
            (OrderCommand::Place(p), New) => Ok(vec![OrderEvent::OrderPlaced(p.clone())]),
            // Placing the same order again is a retry, not an error.
            (OrderCommand::Place(p), _) if self.placed.as_ref() == Some(p) => Ok(vec![]),
            (OrderCommand::Place(p), _) => Err(OrderError::AlreadyPlacedDifferently(p.order_id.to_string())),
            (OrderCommand::RecordNotification { .. }, Placed) if self.notified => Ok(vec![]),
            (OrderCommand::RecordNotification { channel, message_id }, Placed) => {
                Ok(vec![OrderEvent::CustomerNotified { channel: channel.clone(), message_id: message_id.clone() }])
            }
            (OrderCommand::RecordNotification { .. }, _) => invalid("record a notification"),
            (OrderCommand::Complete { payment_id, shipment_id }, Placed) => Ok(vec![OrderEvent::OrderCompleted {
                payment_id: payment_id.clone(),
                shipment_id: shipment_id.clone(),
            }]),
            (OrderCommand::Complete { .. }, Completed) => Ok(vec![]),
            (OrderCommand::Complete { .. }, _) => invalid("complete"),
            // Placed, or flagged and its compensations retried by a person until they went through.
            (OrderCommand::Cancel { reason, failed_step }, Placed | NeedsManualAction) => {
                Ok(vec![OrderEvent::OrderCancelled { reason: reason.clone(), failed_step: failed_step.clone() }])
            }
            (OrderCommand::Cancel { .. }, Cancelled) => Ok(vec![]),
            (OrderCommand::Cancel { .. }, _) => invalid("cancel"),
            (OrderCommand::FlagForManualAction { failures }, _) if failures.is_empty() => {
                Err(OrderError::NothingFailed)
            }
            (OrderCommand::FlagForManualAction { failures }, Placed | Cancelled) => {
                Ok(vec![OrderEvent::OrderFlaggedForManualAction { failures: failures.clone() }])
            }
            // Flagged again (its compensations retried by a person): a redelivery, or the same
            // steps failing again, changes nothing; other steps failing is news.
            (OrderCommand::FlagForManualAction { failures }, NeedsManualAction) => {
                let steps = |list: &[FailedAction]| list.iter().map(|f| f.step.clone()).collect::<Vec<_>>();
                if steps(failures) == steps(&self.failed_actions) {
                    Ok(vec![])
                } else {
                    Ok(vec![OrderEvent::OrderFlaggedForManualAction { failures: failures.clone() }])
                }
            }
            (OrderCommand::FlagForManualAction { .. }, _) => invalid("flag for manual action"),
            (OrderCommand::ResolveManualAction { by, note }, NeedsManualAction) => {
                Ok(vec![OrderEvent::OrderManualActionResolved { by: by.clone(), note: note.clone() }])
            }
            (OrderCommand::ResolveManualAction { .. }, ManuallyResolved) => Ok(vec![]),
            (OrderCommand::ResolveManualAction { .. }, _) => invalid("resolve by hand"),
        }
    }
}

#[cfg(test)]
mod tests;
