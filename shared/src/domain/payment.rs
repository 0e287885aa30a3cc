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
    /// Requested, and parked while the gateway is unavailable: the charge is tried again until
    /// `retry_until` (RFC 3339), then the order is compensated.
    Postponed {
        amount: Money,
        retry_until: String,
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
    PaymentRequested {
        order_id: OrderId,
        amount: Money,
    },
    /// The gateway could not be asked (its breaker open) or did not answer: the order waits
    /// for it, until `retry_until`. Recorded once, when the order is first parked.
    PaymentPostponed {
        order_id: OrderId,
        amount: Money,
        reason: String,
        retry_until: String,
    },
    PaymentCharged {
        order_id: OrderId,
        payment_id: String,
        amount: Money,
    },
    PaymentDeclined {
        order_id: OrderId,
        reason: String,
    },
    PaymentRefunded {
        order_id: OrderId,
        payment_id: String,
        refund_id: String,
        amount: Money,
    },
}

impl DomainEvent for PaymentEvent {}

#[derive(Debug, Clone)]
pub enum PaymentCommand {
    Request { order_id: OrderId, amount: Money },
    Postpone { order_id: OrderId, reason: String, retry_until: String },
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
            Payment::Postponed { .. } => "postponed",
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
            PaymentEvent::PaymentPostponed { amount, retry_until, .. } => {
                Payment::Postponed { amount: *amount, retry_until: retry_until.clone() }
            }
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
            (C::Postpone { order_id, reason, retry_until }, Payment::Requested { amount }) => {
                Ok(vec![PaymentEvent::PaymentPostponed {
                    order_id: order_id.clone(),
                    amount: *amount,
                    reason: reason.clone(),
                    retry_until: retry_until.clone(),
                }])
            }
            // Parked already: the first deadline stands.
            (C::Postpone { .. }, Payment::Postponed { .. }) => Ok(vec![]),
            (
                C::RecordCharge { order_id, payment_id },
                Payment::Requested { amount } | Payment::Postponed { amount, .. },
            ) => Ok(vec![PaymentEvent::PaymentCharged {
                order_id: order_id.clone(),
                payment_id: payment_id.clone(),
                amount: *amount,
            }]),
            (C::RecordDecline { order_id, reason }, Payment::Requested { .. } | Payment::Postponed { .. }) => {
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
            (C::Postpone { .. }, _) => Err(PaymentError(self.name(), "postpone")),
            (C::RecordRefund { .. }, _) => Err(PaymentError(self.name(), "refund")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::money::Currency;

    fn given(events: &[PaymentEvent]) -> Payment {
        events.iter().fold(Payment::default(), |mut p, e| {
            p.apply(e);
            p
        })
    }

    #[test]
    fn a_parked_charge_keeps_its_first_deadline_and_records_the_gateway_answer_later() {
        // Given a requested payment
        let order_id = OrderId::parse("o-1").expect("id");
        let amount = Money::new(1999, Currency::EUR);
        let requested = given(&[PaymentEvent::PaymentRequested { order_id: order_id.clone(), amount }]);
        // When it is postponed twice
        let postpone = |until: &str| PaymentCommand::Postpone {
            order_id: order_id.clone(),
            reason: "gateway down".into(),
            retry_until: until.into(),
        };
        let first = requested.decide(&postpone("2026-11-22T11:00:00Z")).expect("postponed");
        let parked = given(&[PaymentEvent::PaymentRequested { order_id: order_id.clone(), amount }, first[0].clone()]);
        // Then only the first is recorded, with its deadline
        assert_eq!(parked, Payment::Postponed { amount, retry_until: "2026-11-22T11:00:00Z".into() });
        assert_eq!(parked.decide(&postpone("2026-11-22T12:00:00Z")), Ok(vec![]));
        // And the charge, once the gateway answers, is recorded from the parked state
        let charge = PaymentCommand::RecordCharge { order_id: order_id.clone(), payment_id: "pay-1".into() };
        assert_eq!(
            parked.decide(&charge),
            Ok(vec![PaymentEvent::PaymentCharged { order_id: order_id.clone(), payment_id: "pay-1".into(), amount }])
        );
        // But a charged payment is never postponed
        let charged =
            given(&[PaymentEvent::PaymentCharged { order_id: order_id.clone(), payment_id: "pay-1".into(), amount }]);
        assert!(charged.decide(&postpone("2026-11-22T11:00:00Z")).is_err());
    }
}
