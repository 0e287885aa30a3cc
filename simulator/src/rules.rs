//! The providers' business rules: the simulator's own, deterministic, documented here:
//! - payment token `tok_decline` is declined ("card declined"), `tok_insufficient_funds` too
//!   ("insufficient funds"); `tok_refund_fails` charges succeed (id prefix `payrf`) but their
//!   refunds are refused (`422`, "the charge is disputed"): final for that key, as a gateway's
//!   refusal is, unlike an outage, which a retry may outlast;
//! - postal code `00000` is undeliverable; shipments to address line `CANCEL-FAILS` (id prefix
//!   `shpcf`) cannot be cancelled;
//! - customer ids starting `unreachable` cannot be notified.
//!
//! Ids derive from the idempotency key, so a retried call gets the same id.

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Answer;

/// A failure of the provider itself (not a business answer): never stored, so a retry may pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Money {
    pub amount_minor: i64,
    pub currency: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChargeRequest {
    pub amount: Money,
    pub payment_token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VoidRequest {
    /// The idempotency key of the charge to settle.
    pub charge_key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefundRequest {
    pub payment_id: String,
    pub amount: Money,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Address {
    pub name: String,
    pub line1: String,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShipmentRequest {
    pub address: Address,
    pub items: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageRequest {
    pub customer_id: String,
    pub message: String,
}

/// A short, stable id from an idempotency key (FNV-1a 64): the same as `shared`'s `derived_id`.
pub fn derived_id(prefix: &str, key: &str) -> String {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{prefix}_{hash:016x}")
}

/// Ids of charges made with `tok_refund_fails` start with this: their refunds are refused.
const REFUND_FAILS: &str = "payrf";
/// Ids of shipments to `CANCEL-FAILS` start with this: their cancellations always fail.
const CANCEL_FAILS: &str = "shpcf";

fn answer(status: StatusCode, body: Value) -> Result<Answer, Unavailable> {
    Ok(Answer { status, body })
}

pub fn charge(key: &str, request: &ChargeRequest) -> Result<Answer, Unavailable> {
    let declined = |reason: &str| answer(StatusCode::PAYMENT_REQUIRED, json!({"status": "declined", "reason": reason}));
    let charged =
        |prefix: &str| answer(StatusCode::CREATED, json!({"paymentId": derived_id(prefix, key), "status": "charged"}));
    match request.payment_token.as_str() {
        "tok_decline" => declined("card declined"),
        "tok_insufficient_funds" => declined("insufficient funds"),
        "tok_refund_fails" => charged(REFUND_FAILS),
        _ => charged("pay"),
    }
}

/// A charge key voided before any charge was made with it.
pub fn void_charge(_key: &str, _request: &VoidRequest) -> Result<Answer, Unavailable> {
    let reason = "voided before it was made";
    answer(StatusCode::UNPROCESSABLE_ENTITY, json!({"status": "voided", "reason": reason}))
}

pub fn refund(key: &str, request: &RefundRequest) -> Result<Answer, Unavailable> {
    if request.payment_id.starts_with(REFUND_FAILS) {
        let reason = format!("refund of {} refused: the charge is disputed", request.payment_id);
        return answer(StatusCode::UNPROCESSABLE_ENTITY, json!({"status": "refused", "reason": reason}));
    }
    answer(StatusCode::CREATED, json!({"refundId": derived_id("ref", key)}))
}

pub fn create_shipment(key: &str, request: &ShipmentRequest) -> Result<Answer, Unavailable> {
    let address = &request.address;
    if address.postal_code == "00000" {
        let reason = format!("undeliverable address: {}", address.postal_code);
        return answer(StatusCode::UNPROCESSABLE_ENTITY, json!({"status": "rejected", "reason": reason}));
    }
    let prefix = if address.line1 == "CANCEL-FAILS" { CANCEL_FAILS } else { "shp" };
    answer(StatusCode::CREATED, json!({"shipmentId": derived_id(prefix, key), "carrier": "sim-carrier"}))
}

pub fn cancel_shipment(shipment_id: &str) -> Result<Answer, Unavailable> {
    if shipment_id.starts_with(CANCEL_FAILS) {
        return Err(Unavailable(format!("cancelling {shipment_id} failed")));
    }
    answer(StatusCode::OK, json!({"shipmentId": shipment_id, "status": "cancelled"}))
}

pub fn notify(key: &str, request: &MessageRequest) -> Result<Answer, Unavailable> {
    if request.customer_id.starts_with("unreachable") {
        let reason = format!("no contact channel for {}", request.customer_id);
        return answer(StatusCode::UNPROCESSABLE_ENTITY, json!({"status": "undeliverable", "reason": reason}));
    }
    answer(StatusCode::CREATED, json!({"messageId": derived_id("msg", key)}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_fnv1a_64() {
        // Published FNV-1a 64 test vectors: the offset basis for "", and "a".
        assert_eq!(derived_id("pay", ""), "pay_cbf29ce484222325");
        assert_eq!(derived_id("msg", "a"), "msg_af63dc4c8601ec8c");
    }
}
