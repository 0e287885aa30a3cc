//! Business and saga metrics, in CloudWatch Embedded Metric Format: JSON lines on stdout that
//! CloudWatch Logs turns into metrics of the namespace [`NAMESPACE`] (locally, `local-env` does
//! the same from the function logs it ships). Written with `metrics_cloudwatch_embedded` (the
//! `metrics` facade's recorder), not by hand.
//!
//! Every metric has the dimension `Service` (the function's name, so one stack's metrics are
//! its own), plus at most one low-cardinality dimension (`Reason`, `Step`, `Outcome`, `Action`).
//! Nothing per order. Each call writes its line at once (a flush of what was recorded), so a
//! metric is never lost to an instance that is frozen or killed before the end of an
//! invocation. Outside Lambda ([`init`] not called, as in unit tests), every call is a no-op.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::Unit;
use metrics_cloudwatch_embedded::Collector;

/// The CloudWatch namespace of every metric here.
pub const NAMESPACE: &str = "OrderSaga";

/// Metric names: the dashboard and the tests read these.
pub mod names {
    pub const ORDERS_PLACED: &str = "OrdersPlaced";
    pub const ORDERS_COMPLETED: &str = "OrdersCompleted";
    pub const ORDERS_CANCELLED: &str = "OrdersCancelled";
    pub const ORDERS_FLAGGED: &str = "OrdersFlaggedForManualAction";
    pub const ORDERS_MANUALLY_RESOLVED: &str = "OrdersManuallyResolved";
    pub const SAGA_DURATION: &str = "SagaDuration";
    pub const COMPENSATIONS_RUN: &str = "CompensationsRun";
    pub const STEP_LATENCY: &str = "StepLatency";
    pub const DEAD_LETTERS: &str = "DeadLetters";
}

static COLLECTOR: OnceLock<&'static Collector> = OnceLock::new();

/// Installs the recorder, with `Service` = `AWS_LAMBDA_FUNCTION_NAME`. Does nothing outside
/// Lambda (no function name) or when called again.
pub fn init() {
    let Ok(service) = std::env::var("AWS_LAMBDA_FUNCTION_NAME") else { return };
    if COLLECTOR.get().is_some() {
        return;
    }
    let built = metrics_cloudwatch_embedded::Builder::new()
        .cloudwatch_namespace(NAMESPACE)
        .with_dimension("Service", service)
        .init();
    match built {
        Ok(collector) => {
            let _ = COLLECTOR.set(collector);
            for name in [
                names::ORDERS_PLACED,
                names::ORDERS_COMPLETED,
                names::ORDERS_CANCELLED,
                names::ORDERS_FLAGGED,
                names::ORDERS_MANUALLY_RESOLVED,
                names::COMPENSATIONS_RUN,
                names::DEAD_LETTERS,
            ] {
                metrics::describe_counter!(name, Unit::Count, "");
            }
            metrics::describe_histogram!(names::SAGA_DURATION, Unit::Milliseconds, "");
            metrics::describe_histogram!(names::STEP_LATENCY, Unit::Milliseconds, "");
        }
        Err(e) => tracing::warn!(error = %e, "metrics recorder not installed"),
    }
}

/// Writes what was recorded as EMF lines on stdout (under its lock: never interleaved with a
/// log line).
fn flush() {
    if let Some(collector) = COLLECTOR.get()
        && let Err(e) = collector.flush(std::io::stdout().lock())
    {
        tracing::warn!(error = %e, "metrics not written");
    }
}

/// How an order ended, as the saga's finalize step records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    Completed,
    /// With the reason: the error the failed step ended with (a code such as `PaymentDeclined`).
    Cancelled(&'a str),
    FlaggedForManualAction(&'a str),
    ManuallyResolved,
}

impl Outcome<'_> {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Completed => "Completed",
            Self::Cancelled(_) => "Cancelled",
            Self::FlaggedForManualAction(_) => "NeedsManualAction",
            Self::ManuallyResolved => "ManuallyResolved",
        }
    }
}

/// One order placed (not a repeat of a placed one).
pub fn order_placed() {
    metrics::counter!(names::ORDERS_PLACED).increment(1);
    flush();
}

/// One order reached an outcome (recorded by this call, not a redelivery), and, when known,
/// how long after it was placed.
pub fn order_outcome(outcome: Outcome<'_>, placed_to_final: Option<Duration>) {
    match outcome {
        Outcome::Completed => metrics::counter!(names::ORDERS_COMPLETED).increment(1),
        Outcome::Cancelled(reason) => {
            metrics::counter!(names::ORDERS_CANCELLED, "Reason" => reason.to_owned()).increment(1);
        }
        Outcome::FlaggedForManualAction(step) => {
            metrics::counter!(names::ORDERS_FLAGGED, "Step" => step.to_owned()).increment(1);
        }
        Outcome::ManuallyResolved => metrics::counter!(names::ORDERS_MANUALLY_RESOLVED).increment(1),
    }
    if let Some(duration) = placed_to_final {
        metrics::histogram!(names::SAGA_DURATION, "Outcome" => outcome.label()).record(millis(duration));
    }
    flush();
}

/// A compensation step ran to its end (`ReleaseInventory`, `RefundPayment`, `CancelShipment`).
pub fn compensation_run(step: &str) {
    metrics::counter!(names::COMPENSATIONS_RUN, "Step" => step.to_owned()).increment(1);
    flush();
}

/// How long one step command took to process (its logic, not the callback).
pub fn step_latency(step: &str, took: Duration) {
    metrics::histogram!(names::STEP_LATENCY, "Step" => step.to_owned()).record(millis(took));
    flush();
}

/// What the dead-letter handler did with one message: `Recorded`, `Redriven`, `Replayed`,
/// `Parked`, `Resolved`.
pub fn dead_letter(action: &'static str) {
    metrics::counter!(names::DEAD_LETTERS, "Action" => action).increment(1);
    flush();
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// The time from `placed` to `final_at`, both RFC 3339 (an event's `recordedAt`).
pub fn between(placed: &str, final_at: &str) -> Option<Duration> {
    use time::format_description::well_known::Rfc3339;
    let placed = time::OffsetDateTime::parse(placed, &Rfc3339).ok()?;
    let final_at = time::OffsetDateTime::parse(final_at, &Rfc3339).ok()?;
    (final_at - placed).try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn between_two_recorded_times() {
        let d = between("2026-11-22T10:00:00.250000Z", "2026-11-22T10:00:02.000000Z");
        assert_eq!(d, Some(Duration::from_millis(1_750)));
        assert_eq!(between("2026-11-22T10:00:02Z", "2026-11-22T10:00:01Z"), None);
        assert_eq!(between("yesterday", "2026-11-22T10:00:01Z"), None);
    }

    #[test]
    fn without_init_every_call_is_a_no_op() {
        order_placed();
        order_outcome(Outcome::Cancelled("PaymentDeclined"), Some(Duration::from_millis(5)));
        step_latency("ChargePayment", Duration::from_millis(3));
        dead_letter("Parked");
        assert!(COLLECTOR.get().is_none());
    }
}
