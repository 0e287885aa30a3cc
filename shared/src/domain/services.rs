//! The external services a saga step talks to (payment gateway, shipping carrier, notifier),
//! behind traits, and a simulated implementation with deterministic rules for tests and the
//! local run. Every call carries an idempotency key; the simulation derives its ids from the key,
//! so a retried call gets the same answer, as a real idempotent API would give.

use std::future::Future;
use std::time::Duration;

use super::money::Money;
use super::order::Address;
use crate::config::{ConfigError, Vars, process_env};

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

/// Deterministic rules of the simulation (documented for test writers and the local run):
/// - payment token `tok_decline` is declined ("card declined"), `tok_insufficient_funds` too;
/// - payment token `tok_refund_fails`: charges succeed, their refunds are always unavailable;
/// - postal code `00000` is undeliverable; shipments to address line `CANCEL-FAILS` cannot be
///   cancelled;
/// - customer ids starting `unreachable` cannot be notified;
/// - besides, each call fails as unavailable with probability `failure_rate`, after `latency`.
#[derive(Debug, Clone, Default)]
pub struct Simulated {
    pub failure_rate: f64,
    pub latency: Duration,
}

impl Simulated {
    /// `SIMULATED_FAILURE_RATE` (0 to 1) and `SIMULATED_LATENCY_MS`, both optional.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&process_env)
    }

    pub fn from_vars(vars: Vars<'_>) -> Result<Self, ConfigError> {
        let failure_rate = match vars("SIMULATED_FAILURE_RATE") {
            None => 0.0,
            Some(v) => v.parse::<f64>().ok().filter(|r| (0.0..=1.0).contains(r)).ok_or_else(|| {
                ConfigError::Invalid { name: "SIMULATED_FAILURE_RATE", reason: "expected a number from 0 to 1".into() }
            })?,
        };
        let latency = match vars("SIMULATED_LATENCY_MS") {
            None => Duration::ZERO,
            Some(v) => Duration::from_millis(v.parse().map_err(|_| ConfigError::Invalid {
                name: "SIMULATED_LATENCY_MS",
                reason: "expected whole milliseconds".into(),
            })?),
        };
        Ok(Self { failure_rate, latency })
    }

    async fn call(&self, service: &'static str) -> Result<(), Unavailable> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.failure_rate > 0.0 && fastrand::f64() < self.failure_rate {
            return Err(Unavailable { service, message: "simulated outage".into() });
        }
        Ok(())
    }
}

/// A short, stable id from an idempotency key (FNV-1a): the same key, the same id.
pub fn derived_id(prefix: &str, key: &str) -> String {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{prefix}_{hash:016x}")
}

/// Ids of charges made with `tok_refund_fails` start with this: their refunds always fail.
const REFUND_FAILS: &str = "payrf";
/// Ids of shipments to `CANCEL-FAILS` start with this: their cancellations always fail.
const CANCEL_FAILS: &str = "shpcf";

impl PaymentGateway for Simulated {
    async fn charge(&self, key: &str, _amount: Money, token: &str) -> Result<ChargeOutcome, Unavailable> {
        self.call("payment gateway").await?;
        Ok(match token {
            "tok_decline" => ChargeOutcome::Declined { reason: "card declined".into() },
            "tok_insufficient_funds" => ChargeOutcome::Declined { reason: "insufficient funds".into() },
            "tok_refund_fails" => ChargeOutcome::Charged { payment_id: derived_id(REFUND_FAILS, key) },
            _ => ChargeOutcome::Charged { payment_id: derived_id("pay", key) },
        })
    }

    async fn refund(&self, key: &str, payment_id: &str, _amount: Money) -> Result<String, Unavailable> {
        self.call("payment gateway").await?;
        if payment_id.starts_with(REFUND_FAILS) {
            return Err(Unavailable { service: "payment gateway", message: format!("refund of {payment_id} failed") });
        }
        Ok(derived_id("ref", key))
    }
}

impl Carrier for Simulated {
    async fn create_shipment(&self, key: &str, address: &Address, _items: u32) -> Result<ShipmentOutcome, Unavailable> {
        self.call("carrier").await?;
        if address.postal_code == "00000" {
            return Ok(ShipmentOutcome::Rejected { reason: format!("undeliverable address: {}", address.postal_code) });
        }
        let prefix = if address.line1 == "CANCEL-FAILS" { CANCEL_FAILS } else { "shp" };
        Ok(ShipmentOutcome::Created { shipment_id: derived_id(prefix, key), carrier: "sim-carrier".into() })
    }

    async fn cancel_shipment(&self, _key: &str, shipment_id: &str) -> Result<(), Unavailable> {
        self.call("carrier").await?;
        if shipment_id.starts_with(CANCEL_FAILS) {
            return Err(Unavailable { service: "carrier", message: format!("cancelling {shipment_id} failed") });
        }
        Ok(())
    }
}

impl Notifier for Simulated {
    async fn notify(&self, key: &str, customer_id: &str, _message: &str) -> Result<NotifyOutcome, Unavailable> {
        self.call("notifier").await?;
        if customer_id.starts_with("unreachable") {
            return Ok(NotifyOutcome::Undeliverable { reason: format!("no contact channel for {customer_id}") });
        }
        Ok(NotifyOutcome::Sent { message_id: derived_id("msg", key) })
    }
}
