//! The external services a saga step talks to (payment gateway, shipping carrier, notifier),
//! behind traits: the domain's view of them. Their HTTP clients are at the edge
//! (`crate::providers`); locally and in tests they talk to the provider simulator
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Charged { payment_id: String },
    Declined { reason: String },
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

    /// Returns the refund id.
    fn refund(
        &self,
        idempotency_key: &str,
        payment_id: &str,
        amount: Money,
    ) -> impl Future<Output = Result<String, Unavailable>> + Send;
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
