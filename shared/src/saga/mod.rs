//! The order saga: the contract between the state machine and the step handlers, and each
//! step's logic. Steps are idempotent by state: every outcome is read from the aggregates, so a
//! redelivered command returns the original outcome and never repeats an effect.

pub mod steps;
/// Every step and compensation, on the in-memory event store with scripted services.
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::aggregate::ExecuteError;
use crate::domain::order::{FailedAction, PlaceOrder};

/// Error names the state machine branches on (`Catch` / `Retry`).
pub mod errors {
    pub const INVENTORY_UNAVAILABLE: &str = "InventoryUnavailable";
    pub const PAYMENT_DECLINED: &str = "PaymentDeclined";
    pub const SHIPMENT_REJECTED: &str = "ShipmentRejected";
    pub const NOTIFICATION_UNDELIVERABLE: &str = "NotificationUndeliverable";
    /// A transient failure of an external service: retried with backoff by the state machine.
    pub const SERVICE_UNAVAILABLE: &str = "ServiceUnavailable";
    /// The payment gateway stayed unavailable for as long as an order (or its refund) may wait.
    pub const PAYMENT_PROVIDER_UNAVAILABLE: &str = "PaymentProviderUnavailable";
    /// The gateway refused the refund for good: a person must act (not retried).
    pub const REFUND_REFUSED: &str = "RefundRefused";
    /// The command could not be read; it went to the step's DLQ.
    pub const MALFORMED_COMMAND: &str = "MalformedCommand";
    /// A permanent failure that is not a business answer (a broken invariant).
    pub const STEP_FAILED: &str = "StepFailed";

    /// Every name above: the template tests check the state machine catches only these.
    pub const ALL: [&str; 9] = [
        INVENTORY_UNAVAILABLE,
        PAYMENT_DECLINED,
        SHIPMENT_REJECTED,
        NOTIFICATION_UNDELIVERABLE,
        SERVICE_UNAVAILABLE,
        PAYMENT_PROVIDER_UNAVAILABLE,
        REFUND_REFUSED,
        MALFORMED_COMMAND,
        STEP_FAILED,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Step {
    ReserveInventory,
    ChargePayment,
    CreateShipment,
    SendNotification,
    ReleaseInventory,
    RefundPayment,
    CancelShipment,
    CompleteOrder,
    CancelOrder,
    FlagForManualAction,
}

impl Step {
    /// Every step: the template tests check each has a task state and a queue with a consumer.
    pub const ALL: [Self; 10] = [
        Self::ReserveInventory,
        Self::ChargePayment,
        Self::CreateShipment,
        Self::SendNotification,
        Self::ReleaseInventory,
        Self::RefundPayment,
        Self::CancelShipment,
        Self::CompleteOrder,
        Self::CancelOrder,
        Self::FlagForManualAction,
    ];

    /// Where `self` sits in [`Self::ALL`]; exhaustive, so a new step breaks the build here until
    /// it is listed there too.
    pub const fn position(self) -> usize {
        match self {
            Self::ReserveInventory => 0,
            Self::ChargePayment => 1,
            Self::CreateShipment => 2,
            Self::SendNotification => 3,
            Self::ReleaseInventory => 4,
            Self::RefundPayment => 5,
            Self::CancelShipment => 6,
            Self::CompleteOrder => 7,
            Self::CancelOrder => 8,
            Self::FlagForManualAction => 9,
        }
    }
}

/// What the state machine's Catch put at `$.failure`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    #[serde(rename = "Error")]
    pub error: String,
    #[serde(rename = "Cause", default)]
    pub cause: String,
}

impl Failure {
    /// `Error: Cause`, or the error alone when there is no cause.
    pub fn describe(&self) -> String {
        if self.cause.is_empty() { self.error.clone() } else { format!("{}: {}", self.error, self.cause) }
    }
}

/// The steps whose failure after their retries ends in manual action, in the order the saga runs
/// them: the compensations (each runs even when one before it failed), then the final steps.
const FLAGGABLE_IN_ORDER: [Step; 5] =
    [Step::CancelShipment, Step::RefundPayment, Step::ReleaseInventory, Step::CancelOrder, Step::CompleteOrder];

/// The state machine's record of the steps that kept failing (`$.compensationFailures`: each
/// step's Catch output under its name), as a list in the order the saga ran them. A name the
/// saga does not know comes last, still listed.
pub fn failed_actions(failures: &BTreeMap<String, Failure>) -> Vec<FailedAction> {
    let rank = |name: &str| {
        FLAGGABLE_IN_ORDER.iter().position(|s| format!("{s:?}") == name).unwrap_or(FLAGGABLE_IN_ORDER.len())
    };
    let mut list: Vec<_> = failures.iter().collect();
    // Stable: unknown names stay in name order.
    list.sort_by_key(|(name, _)| rank(name));
    list.into_iter().map(|(name, failure)| FailedAction::new(name, failure.describe())).collect()
}

/// The command message a state machine task sends to a step queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepMessage {
    pub task_token: String,
    pub step: Step,
    pub order: PlaceOrder,
    /// On the way to cancellation or manual action: the step that failed and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// On the way to manual action: every step that kept failing, by name (what the state
    /// machine's Catches recorded at `$.compensationFailures`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<String, Failure>,
    /// The flow's correlation id (the execution input's), kept on every event the step appends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The X-Ray trace the order was placed in, carried by the command itself: the trace
    /// header Step Functions gives its SQS send does not reach the function on every path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_header: Option<String>,
}

impl StepMessage {
    /// The steps that kept failing, in the order the saga ran them. A message in the shape from
    /// before the saga ran every compensation (`failedStep` and `failure`, no `failures`) names one.
    pub fn failed_actions(&self) -> Vec<FailedAction> {
        if !self.failures.is_empty() {
            return failed_actions(&self.failures);
        }
        let step = self.failed_step.clone().unwrap_or_else(|| "unknown".into());
        let error = self.failure.as_ref().map_or_else(|| "no reason given".into(), Failure::describe);
        vec![FailedAction::new(step, error)]
    }

    /// What the step's log lines are about.
    pub fn about(&self) -> crate::telemetry::About<'_> {
        crate::telemetry::About {
            order_id: Some(self.order.order_id.as_str()),
            correlation_id: Some(self.correlation_id.as_deref().unwrap_or(self.order.order_id.as_str())),
            trace_header: self.trace_header.as_deref(),
        }
    }
}

/// A business answer the state machine branches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFailure {
    pub error: &'static str,
    pub cause: String,
}

impl StepFailure {
    pub fn new(error: &'static str, cause: impl Into<String>) -> Self {
        Self { error, cause: cause.into() }
    }
}

/// Success carries the task output; failure a named business error.
pub type StepOutcome = Result<Value, StepFailure>;

/// Failures of the machinery rather than answers of the business.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Redelivering the message may succeed (a store outage, contention).
    #[error("retryable: {0}")]
    Retryable(String),
    /// It will not: reported to the state machine as `StepFailed`.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl<E: std::error::Error + 'static> From<ExecuteError<E>> for StepError {
    fn from(e: ExecuteError<E>) -> Self {
        if e.is_retryable() { StepError::Retryable(e.to_string()) } else { StepError::Permanent(e.to_string()) }
    }
}

impl From<crate::aggregate::LoadError> for StepError {
    fn from(e: crate::aggregate::LoadError) -> Self {
        match &e {
            crate::aggregate::LoadError::Store(s) if s.is_retryable() => StepError::Retryable(e.to_string()),
            _ => StepError::Permanent(e.to_string()),
        }
    }
}

#[cfg(test)]
mod listing_tests {
    use super::Step;

    #[test]
    fn every_step_is_listed_once_in_all() {
        for (i, step) in Step::ALL.into_iter().enumerate() {
            assert_eq!(step.position(), i, "{step:?} is not at its place in Step::ALL");
        }
    }
}
