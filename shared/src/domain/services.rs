//! The external services a saga step talks to (payment gateway, shipping carrier, notifier),
//! behind traits: the domain's view of them. Their HTTP clients are at the edge
//! (`crate::adapters::providers`); locally and in tests they talk to the provider simulator
//! (`simulator/`). Every call carries an idempotency key, so a retried call has one effect.

use std::future::Future;

use super::money::Money;
use super::order::Address;

/// A failure of the service itself (not a business answer): worth retrying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{service} unavailable: {message}")]
pub struct Unavailable {
    pub service: &'static str,
    pub message: String,
    pub why: Why,
    /// When trying again may help (an open breaker's recovery time), if known.
    pub retry_after: Option<std::time::Duration>,
}

/// Why a service was unavailable: the caller's fallback differs. A call that was never made
/// (the breaker is open, the bulkhead is full) can be deferred without asking the provider
/// what happened; one that failed or timed out may have had its effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The call was made and failed (an error answer, no connection).
    Failed,
    /// The call was made and no answer came in time.
    TimedOut,
    /// Not called: the shared circuit breaker is open for this provider.
    CircuitOpen,
    /// Not called: this instance already has as many calls in flight as its bulkhead admits.
    BulkheadFull,
    /// Not called: no time was left before the invocation's deadline.
    NoTimeLeft,
    /// Not called: this instance could not read the provider's API key (the parameter store).
    NoCredentials,
}

impl Unavailable {
    pub fn new(service: &'static str, why: Why, message: impl Into<String>) -> Self {
        Self { service, message: message.into(), why, retry_after: None }
    }

    pub fn retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Whether the provider was never asked, so nothing can have happened there.
    pub fn not_called(&self) -> bool {
        matches!(self.why, Why::CircuitOpen | Why::BulkheadFull | Why::NoTimeLeft | Why::NoCredentials)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Charged { payment_id: String },
    Declined { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    Refunded {
        refund_id: String,
    },
    /// The gateway's final "no" (a disputed charge, say): no retry changes it; a person must act.
    Refused {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShipmentOutcome {
    Created { shipment_id: String, carrier: String },
    Rejected { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyOutcome {
    Sent { message_id: String },
    Undeliverable { reason: String },
}

pub trait PaymentGateway: Send + Sync {
    fn charge(
        &self,
        idempotency_key: &str,
        amount: Money,
        payment_token: &str,
    ) -> impl Future<Output = Result<ChargeOutcome, Unavailable>> + Send;

    fn refund(
        &self,
        idempotency_key: &str,
        payment_id: &str,
        amount: Money,
    ) -> impl Future<Output = Result<RefundOutcome, Unavailable>> + Send;

    /// Settles the charge requested with `charge_key` whose answer was lost, without charging:
    /// the charge's answer if the gateway made it, or else `Declined` ("voided"), and the key is
    /// voided so that a charge still on its way with it can no longer be made.
    fn void_charge(
        &self,
        idempotency_key: &str,
        charge_key: &str,
    ) -> impl Future<Output = Result<ChargeOutcome, Unavailable>> + Send;
}

pub trait Carrier: Send + Sync {
    fn create_shipment(
        &self,
        idempotency_key: &str,
        address: &Address,
        items: u32,
    ) -> impl Future<Output = Result<ShipmentOutcome, Unavailable>> + Send;

    fn cancel_shipment(
        &self,
        idempotency_key: &str,
        shipment_id: &str,
    ) -> impl Future<Output = Result<(), Unavailable>> + Send;
}

pub trait Notifier: Send + Sync {
    fn notify(
        &self,
        idempotency_key: &str,
        customer_id: &str,
        message: &str,
    ) -> impl Future<Output = Result<NotifyOutcome, Unavailable>> + Send;
}
