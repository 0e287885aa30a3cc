//! Payment per order (stream `Payment-<orderId>`). The request is recorded before the gateway is
//! called and its answer after, so a charge whose answer was lost (the handler died in between)
//! is known to exist: the refund resolves it through the gateway's idempotency key before undoing
//! it, and a redelivered command reuses the recorded answer instead of charging again.

use serde::{Deserialize, Serialize};

use super::ids::OrderId;
use super::money::Money;
use crate::aggregate::{Aggregate, DomainEvent};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Payment {
    #[default]
    None,
    Requested {
        amount: Money,
    },
    Charged {
        payment_id: String,
        amount: Money,
    },
    Declined {
        reason: String,
    },
    Refunded {
        payment_id: String,
        refund_id: String,
        amount: Money,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all_fields = "camelCase")]
pub enum PaymentEvent {
    PaymentRequested { order_id: OrderId, amount: Money },
    PaymentCharged { order_id: OrderId, payment_id: String, amount: Money },
    PaymentDeclined { order_id: OrderId, reason: String },
    PaymentRefunded { order_id: OrderId, payment_id: String, refund_id: String, amount: Money },
}

impl DomainEvent for PaymentEvent {}

#[derive(Debug, Clone)]
pub enum PaymentCommand {
    Request { order_id: OrderId, amount: Money },
    RecordCharge { order_id: OrderId, payment_id: String },
    RecordDecline { order_id: OrderId, reason: String },
    RecordRefund { order_id: OrderId, refund_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payment is {0}: cannot {1}")]
pub struct PaymentError(&'static str, &'static str);

impl Payment {
    fn name(&self) -> &'static str {
        match self {
            Payment::None => "not requested",
            Payment::Requested { .. } => "requested",
            Payment::Charged { .. } => "charged",
            Payment::Declined { .. } => "declined",
            Payment::Refunded { .. } => "refunded",
        }
    }
}

impl Aggregate for Payment {
    const CATEGORY: &'static str = "Payment";
    /// One order's stream: a handful of events, replayed in one Query.
    const SNAPSHOTS: bool = false;
    type Event = PaymentEvent;
    type Command = PaymentCommand;
    type Error = PaymentError;

    fn apply(&mut self, event: &PaymentEvent) {
        *self = match event {
            PaymentEvent::PaymentRequested { amount, .. } => Payment::Requested { amount: *amount },
            PaymentEvent::PaymentCharged { payment_id, amount, .. } => {
                Payment::Charged { payment_id: payment_id.clone(), amount: *amount }
            }
            PaymentEvent::PaymentDeclined { reason, .. } => Payment::Declined { reason: reason.clone() },
            PaymentEvent::PaymentRefunded { payment_id, refund_id, amount, .. } => {
                Payment::Refunded { payment_id: payment_id.clone(), refund_id: refund_id.clone(), amount: *amount }
            }
        };
    }

    fn decide(&self, command: &PaymentCommand) -> Result<Vec<PaymentEvent>, PaymentError> {
        use PaymentCommand as C;
        match (command, self) {
            (C::Request { order_id, amount }, Payment::None) => {
                Ok(vec![PaymentEvent::PaymentRequested { order_id: order_id.clone(), amount: *amount }])
            }
            (C::Request { .. }, _) => Ok(vec![]),
            (C::RecordCharge { order_id, payment_id }, Payment::Requested { amount }) => {
                Ok(vec![PaymentEvent::PaymentCharged {
                    order_id: order_id.clone(),
                    payment_id: payment_id.clone(),
                    amount: *amount,
                }])
            }
            (C::RecordDecline { order_id, reason }, Payment::Requested { .. }) => {
                Ok(vec![PaymentEvent::PaymentDeclined { order_id: order_id.clone(), reason: reason.clone() }])
            }
            // The gateway's answer is already recorded (a concurrent redelivery got there first).
            (C::RecordCharge { .. }, Payment::Charged { .. } | Payment::Refunded { .. }) => Ok(vec![]),
            (C::RecordDecline { .. }, Payment::Declined { .. }) => Ok(vec![]),
            (C::RecordRefund { order_id, refund_id }, Payment::Charged { payment_id, amount }) => {
                Ok(vec![PaymentEvent::PaymentRefunded {
                    order_id: order_id.clone(),
                    payment_id: payment_id.clone(),
                    refund_id: refund_id.clone(),
                    amount: *amount,
                }])
            }
            (C::RecordRefund { .. }, Payment::Refunded { .. }) => Ok(vec![]),
            (C::RecordCharge { .. }, _) => Err(PaymentError(self.name(), "record a charge")),
            (C::RecordDecline { .. }, _) => Err(PaymentError(self.name(), "record a decline")),
            (C::RecordRefund { .. }, _) => Err(PaymentError(self.name(), "refund")),
        }
    }
}
