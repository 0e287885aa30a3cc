//! The simulated services, their operations, and an HTTP answer as stored for idempotent replay.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Service {
    Payments,
    Carrier,
    Notifier,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Operation {
    Charge,
    Refund,
    CreateShipment,
    CancelShipment,
    Notify,
}

impl Operation {
    pub const ALL: [Operation; 5] =
        [Self::Charge, Self::Refund, Self::CreateShipment, Self::CancelShipment, Self::Notify];

    /// The name as on the wire (ledger, control API, logs).
    pub fn name(self) -> &'static str {
        match self {
            Self::Charge => "charge",
            Self::Refund => "refund",
            Self::CreateShipment => "createShipment",
            Self::CancelShipment => "cancelShipment",
            Self::Notify => "notify",
        }
    }

    pub fn service(self) -> Service {
        match self {
            Self::Charge | Self::Refund => Service::Payments,
            Self::CreateShipment | Self::CancelShipment => Service::Carrier,
            Self::Notify => Service::Notifier,
        }
    }
}

/// A status and JSON body: what a provider answered, kept to replay for a repeated key.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

impl Answer {
    pub fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, body: json!({"error": message.into()}) }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::error(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}
