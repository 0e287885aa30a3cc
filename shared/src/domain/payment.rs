//! Payment per order (stream `Payment-<orderId>`). The request is recorded before the gateway is
//! called and its answer after, so a charge whose answer was lost (the handler died in between)
//! is known to exist: the refund settles it with the gateway first (the charge if it was made,
//! else the key voided), and a redelivered command reuses the recorded answer instead of
//! charging again.

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
    /// Being compensated, and the refund parked while the gateway is unavailable: tried again
    /// until `retry_until`, then the order is flagged for manual action. `payment_id` is none
    /// while the charge itself is still unresolved (its answer was lost).
    RefundPostponed {
        payment_id: Option<String>,
        amount: Money,
        retry_until: String,
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
    /// The refund could not be made (the gateway's breaker open, or no answer): it waits for
    /// the gateway until `retry_until`. Recorded once, when the refund is first parked.
    RefundPostponed {
        order_id: OrderId,
        reason: String,
        retry_until: String,
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
    PostponeRefund { order_id: OrderId, reason: String, retry_until: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payment is {0}: cannot {1}")]
pub struct PaymentError(&'static str, &'static str);

impl Payment {
    /// What a refund would give back: the charge's id (none while its answer is unknown) and
    /// amount; none when nothing was or may have been charged, or it is refunded already.
    pub fn refundable(&self) -> Option<(Option<&str>, Money)> {
        match self {
            Payment::Requested { amount } | Payment::Postponed { amount, .. } => Some((None, *amount)),
            Payment::Charged { payment_id, amount } => Some((Some(payment_id), *amount)),
            Payment::RefundPostponed { payment_id, amount, .. } => Some((payment_id.as_deref(), *amount)),
            Payment::None | Payment::Declined { .. } | Payment::Refunded { .. } => None,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Payment::None => "not requested",
            Payment::Requested { .. } => "requested",
            Payment::Postponed { .. } => "postponed",
            Payment::Charged { .. } => "charged",
            Payment::Declined { .. } => "declined",
            Payment::Refunded { .. } => "refunded",
            Payment::RefundPostponed { .. } => "waiting to be refunded",
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
        *self = match (event, &*self) {
            // The lost answer of a charge being refunded, resolved: the refund still waits.
            (PaymentEvent::PaymentCharged { payment_id, .. }, Payment::RefundPostponed { amount, retry_until, .. }) => {
                Payment::RefundPostponed {
                    payment_id: Some(payment_id.clone()),
                    amount: *amount,
                    retry_until: retry_until.clone(),
                }
            }
            (PaymentEvent::RefundPostponed { retry_until, .. }, current) => match current.refundable() {
                Some((payment_id, amount)) => Payment::RefundPostponed {
                    payment_id: payment_id.map(str::to_owned),
                    amount,
                    retry_until: retry_until.clone(),
                },
                None => current.clone(),
            },
            (PaymentEvent::PaymentRequested { amount, .. }, _) => Payment::Requested { amount: *amount },
            (PaymentEvent::PaymentPostponed { amount, retry_until, .. }, _) => {
                Payment::Postponed { amount: *amount, retry_until: retry_until.clone() }
            }
            (PaymentEvent::PaymentCharged { payment_id, amount, .. }, _) => {
                Payment::Charged { payment_id: payment_id.clone(), amount: *amount }
            }
            (PaymentEvent::PaymentDeclined { reason, .. }, _) => Payment::Declined { reason: reason.clone() },
            (PaymentEvent::PaymentRefunded { payment_id, refund_id, amount, .. }, _) => {
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
            // A charge whose answer was lost, resolved while its refund waits for the gateway.
            (C::RecordCharge { order_id, payment_id }, Payment::RefundPostponed { payment_id: None, amount, .. }) => {
                Ok(vec![PaymentEvent::PaymentCharged {
                    order_id: order_id.clone(),
                    payment_id: payment_id.clone(),
                    amount: *amount,
                }])
            }
            (C::RecordDecline { order_id, reason }, Payment::RefundPostponed { payment_id: None, .. }) => {
                Ok(vec![PaymentEvent::PaymentDeclined { order_id: order_id.clone(), reason: reason.clone() }])
            }
            // The gateway's answer is already recorded (a concurrent redelivery got there first).
            (
                C::RecordCharge { .. },
                Payment::Charged { .. } | Payment::Refunded { .. } | Payment::RefundPostponed { .. },
            ) => Ok(vec![]),
            (C::RecordDecline { .. }, Payment::Declined { .. }) => Ok(vec![]),
            (
                C::PostponeRefund { order_id, reason, retry_until },
                Payment::Requested { .. } | Payment::Postponed { .. } | Payment::Charged { .. },
            ) => Ok(vec![PaymentEvent::RefundPostponed {
                order_id: order_id.clone(),
                reason: reason.clone(),
                retry_until: retry_until.clone(),
            }]),
            // Parked already: the first deadline stands.
            (C::PostponeRefund { .. }, Payment::RefundPostponed { .. }) => Ok(vec![]),
            (
                C::RecordRefund { order_id, refund_id },
                Payment::Charged { payment_id, amount }
                | Payment::RefundPostponed { payment_id: Some(payment_id), amount, .. },
            ) => Ok(vec![PaymentEvent::PaymentRefunded {
                order_id: order_id.clone(),
                payment_id: payment_id.clone(),
                refund_id: refund_id.clone(),
                amount: *amount,
            }]),
            (C::RecordRefund { .. }, Payment::Refunded { .. }) => Ok(vec![]),
            (C::RecordCharge { .. }, _) => Err(PaymentError(self.name(), "record a charge")),
            (C::RecordDecline { .. }, _) => Err(PaymentError(self.name(), "record a decline")),
            (C::Postpone { .. }, _) => Err(PaymentError(self.name(), "postpone")),
            (C::RecordRefund { .. }, _) => Err(PaymentError(self.name(), "refund")),
            (C::PostponeRefund { .. }, _) => Err(PaymentError(self.name(), "postpone a refund")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::testing::given;
    use crate::domain::money::Currency;

    fn order_id() -> OrderId {
        OrderId::parse("o-1").expect("id")
    }

    fn requested(amount: Money) -> PaymentEvent {
        PaymentEvent::PaymentRequested { order_id: order_id(), amount }
    }

    fn charged(payment_id: &str, amount: Money) -> PaymentEvent {
        PaymentEvent::PaymentCharged { order_id: order_id(), payment_id: payment_id.into(), amount }
    }

    fn record_charge(payment_id: &str) -> PaymentCommand {
        PaymentCommand::RecordCharge { order_id: order_id(), payment_id: payment_id.into() }
    }

    #[test]
    fn a_parked_charge_keeps_its_first_deadline_and_records_the_gateway_answer_later() {
        let amount = Money::new(1999, Currency::EUR);
        let postpone = |until: &str| PaymentCommand::Postpone {
            order_id: order_id(),
            reason: "gateway down".into(),
            retry_until: until.into(),
        };
        // Given a requested payment, when it is postponed twice, then only the first is
        // recorded, with its deadline
        let parked = given::<Payment>([requested(amount)])
            .when(postpone("2026-11-22T11:00:00Z"))
            .then_expect([PaymentEvent::PaymentPostponed {
                order_id: order_id(),
                amount,
                reason: "gateway down".into(),
                retry_until: "2026-11-22T11:00:00Z".into(),
            }])
            .when(postpone("2026-11-22T12:00:00Z"))
            .then_nothing();
        assert_eq!(parked.state(), &Payment::Postponed { amount, retry_until: "2026-11-22T11:00:00Z".into() });
        // And the charge, once the gateway answers, is recorded from the parked state
        parked.when(record_charge("pay-1")).then_expect([charged("pay-1", amount)]);
        // But a charged payment is never postponed
        given::<Payment>([charged("pay-1", amount)])
            .when(postpone("2026-11-22T11:00:00Z"))
            .then_error(PaymentError("charged", "postpone"));
    }

    #[test]
    fn a_parked_refund_keeps_its_first_deadline_and_is_recorded_once_the_gateway_answers() {
        let amount = Money::new(4499, Currency::EUR);
        let postpone = |until: &str| PaymentCommand::PostponeRefund {
            order_id: order_id(),
            reason: "gateway down".into(),
            retry_until: until.into(),
        };
        // Given a charged payment, when its refund is postponed twice, then only the first is
        // recorded, with its deadline, and the charge is still known
        let parked = given::<Payment>([charged("pay-2", amount)])
            .when(postpone("2026-11-23T11:00:00Z"))
            .then_expect([PaymentEvent::RefundPostponed {
                order_id: order_id(),
                reason: "gateway down".into(),
                retry_until: "2026-11-23T11:00:00Z".into(),
            }])
            .when(postpone("2026-11-23T12:00:00Z"))
            .then_nothing();
        let waiting = Payment::RefundPostponed {
            payment_id: Some("pay-2".into()),
            amount,
            retry_until: "2026-11-23T11:00:00Z".into(),
        };
        assert_eq!(parked.state(), &waiting);
        // And the refund, once made, is recorded from the parked state
        let refund = PaymentCommand::RecordRefund { order_id: order_id(), refund_id: "ref-2".into() };
        let refunded = parked.when(refund).then_expect([PaymentEvent::PaymentRefunded {
            order_id: order_id(),
            payment_id: "pay-2".into(),
            refund_id: "ref-2".into(),
            amount,
        }]);
        assert_eq!(
            refunded.into_state(),
            Payment::Refunded { payment_id: "pay-2".into(), refund_id: "ref-2".into(), amount }
        );
    }

    #[test]
    fn a_refund_parked_before_its_lost_charge_was_resolved_learns_the_charge_and_still_waits() {
        // Given a charge whose answer was lost, and its refund parked
        let amount = Money::new(1999, Currency::EUR);
        let postpone = PaymentCommand::PostponeRefund {
            order_id: order_id(),
            reason: "gateway down".into(),
            retry_until: "2026-11-23T11:00:00Z".into(),
        };
        let parked =
            given::<Payment>([requested(amount)]).when(postpone.clone()).then_expect([PaymentEvent::RefundPostponed {
                order_id: order_id(),
                reason: "gateway down".into(),
                retry_until: "2026-11-23T11:00:00Z".into(),
            }]);
        assert_eq!(
            parked.state(),
            &Payment::RefundPostponed { payment_id: None, amount, retry_until: "2026-11-23T11:00:00Z".into() }
        );
        // When the gateway tells the charge, then the refund still waits, with its deadline, now
        // knowing what to refund
        let learned = parked.when(record_charge("pay-3")).then_expect([charged("pay-3", amount)]);
        assert_eq!(
            learned.into_state(),
            Payment::RefundPostponed {
                payment_id: Some("pay-3".into()),
                amount,
                retry_until: "2026-11-23T11:00:00Z".into()
            }
        );
        // But a declined payment has no refund to postpone
        let declined = PaymentEvent::PaymentDeclined { order_id: order_id(), reason: "no".into() };
        given::<Payment>([declined]).when(postpone).then_error(PaymentError("declined", "postpone a refund"));
    }
}
