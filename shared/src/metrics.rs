//! Business and saga metrics, in CloudWatch Embedded Metric Format: JSON lines on stdout that
//! CloudWatch Logs turns into metrics of the namespace [`NAMESPACE`] (locally, `local-env` does
//! the same from the function logs it ships). Written with `metrics_cloudwatch_embedded` (the
//! `metrics` facade's recorder), not by hand.
//!
//! Every metric has the dimension `Service` (the function's name, so one stack's metrics are
//! its own), plus at most one low-cardinality dimension (`Reason`, `Step`, `Outcome`, `Action`,
//! `Kind`). Nothing per order. Each call writes its line at once (a flush of what was
//! recorded), so a metric is never lost to an instance that is frozen or killed before the end
//! of an invocation. Outside Lambda ([`init`] not called, as in unit tests), every call is a no-op.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
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
    pub const PROVIDER_LATENCY: &str = "ProviderLatency";
    pub const PROVIDER_HEDGES: &str = "ProviderHedges";
    pub const DEAD_LETTERS: &str = "DeadLetters";
    pub const COLD_STARTS: &str = "ColdStarts";
    pub const UNRESOLVED_DEAD_LETTERS: &str = "UnresolvedDeadLetters";
    pub const BREAKER_OPENED: &str = "CircuitBreakerOpened";
    pub const CALLS_SHORT_CIRCUITED: &str = "ProviderCallsShortCircuited";
    pub const PAYMENTS_PARKED: &str = "PaymentsParked";
    pub const REFUNDS_PARKED: &str = "RefundsParked";
    pub const ORDERS_RATE_LIMITED: &str = "OrdersRateLimited";
}

/// The `Kind` of an [`names::UNRESOLVED_DEAD_LETTERS`] level.
pub mod kinds {
    pub const DEAD_LETTER: &str = "DeadLetter";
    pub const MANUAL_ACTION: &str = "ManualAction";
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
                names::COLD_STARTS,
                names::PROVIDER_HEDGES,
                names::BREAKER_OPENED,
                names::CALLS_SHORT_CIRCUITED,
                names::PAYMENTS_PARKED,
                names::REFUNDS_PARKED,
                names::ORDERS_RATE_LIMITED,
            ] {
                metrics::describe_counter!(name, Unit::Count, "");
            }
            metrics::describe_histogram!(names::SAGA_DURATION, Unit::Milliseconds, "");
            metrics::describe_histogram!(names::STEP_LATENCY, Unit::Milliseconds, "");
            metrics::describe_histogram!(names::PROVIDER_LATENCY, Unit::Milliseconds, "");
            metrics::describe_histogram!(names::UNRESOLVED_DEAD_LETTERS, Unit::Count, "");
            // `init` runs in the init phase, once per instance: that is the cold start.
            cold_start();
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

static COLD_START_COUNTED: AtomicBool = AtomicBool::new(false);

/// This instance's cold start: counted once per process (by [`init`], in the init phase), never
/// again however often it is called. Returns whether this call counted it.
pub fn cold_start() -> bool {
    if COLD_START_COUNTED.swap(true, Ordering::SeqCst) {
        return false;
    }
    metrics::counter!(names::COLD_STARTS).increment(1);
    flush();
    true
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

/// A compensation step had its effect (`ReleaseInventory`, `RefundPayment`, `CancelShipment`):
/// counted by the step when it appended its event, not on a redelivered command's replay.
pub fn compensation_run(step: &str) {
    metrics::counter!(names::COMPENSATIONS_RUN, "Step" => step.to_owned()).increment(1);
    flush();
}

/// How long one step command took to process (its logic, not the callback).
pub fn step_latency(step: &str, took: Duration) {
    metrics::histogram!(names::STEP_LATENCY, "Step" => step.to_owned()).record(millis(took));
    flush();
}

/// How long one call to an external provider took, answered or not (`Operation`: `charge`,
/// `refund`, `createShipment`, `cancelShipment`, `notify`).
pub fn provider_latency(operation: &'static str, took: Duration) {
    metrics::histogram!(names::PROVIDER_LATENCY, "Operation" => operation).record(millis(took));
    flush();
}

/// A hedge: a second request sent for a provider call that was slow to answer (`Operation`, as
/// in [`provider_latency`]).
pub fn provider_hedge(operation: &'static str) {
    metrics::counter!(names::PROVIDER_HEDGES, "Operation" => operation).increment(1);
    flush();
}

/// A circuit breaker moved to `to` (`open`, `halfOpen`, `closed`): counted when it opens
/// (again, after a failed probe, too), by `Breaker` (the provider).
pub fn breaker_transition(breaker: &str, to: &str) {
    if to == "open" {
        metrics::counter!(names::BREAKER_OPENED, "Breaker" => breaker.to_owned()).increment(1);
        flush();
    }
}

/// A call not made because the provider's breaker is open.
pub fn call_short_circuited(breaker: &str) {
    metrics::counter!(names::CALLS_SHORT_CIRCUITED, "Breaker" => breaker.to_owned()).increment(1);
    flush();
}

/// An order refused with `429`: its customer is over the per-customer rate limit.
pub fn order_rate_limited() {
    metrics::counter!(names::ORDERS_RATE_LIMITED).increment(1);
    flush();
}

/// An order's payment parked for the first time while the gateway is unavailable.
pub fn payment_parked() {
    metrics::counter!(names::PAYMENTS_PARKED).increment(1);
    flush();
}

/// An order's refund parked for the first time while the gateway is unavailable.
pub fn refund_parked() {
    metrics::counter!(names::REFUNDS_PARKED).increment(1);
    flush();
}

/// What the dead-letter handler did with one message: `Recorded`, `Redriven`, `Replayed`,
/// `Parked`, `Resolved`.
pub fn dead_letter(action: &'static str) {
    metrics::counter!(names::DEAD_LETTERS, "Action" => action).increment(1);
    flush();
}

/// How many dead letters (`Kind` [`kinds::DEAD_LETTER`]) or manual-action cases
/// ([`kinds::MANUAL_ACTION`]) wait for someone (pending or parked), as the dead letters view
/// counts them after a change. A level, reported on change: recorded as one sample (the
/// recorder's gauges are written again at every flush, so an instance would repeat a stale
/// level after another instance changed it), read with `Maximum`.
pub fn unresolved_dead_letters(kind: &'static str, level: i64) {
    metrics::histogram!(names::UNRESOLVED_DEAD_LETTERS, "Kind" => kind).record(level as f64);
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

/// A recorder for unit tests: every value recorded, by metric (`Name` or `Name{Label=value}`),
/// set as the thread's recorder with `metrics::set_default_local_recorder`.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex};

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

    #[derive(Default, Clone)]
    pub(crate) struct Recorded(Arc<Mutex<Vec<(String, f64)>>>);

    struct Handle {
        metric: String,
        log: Recorded,
    }

    impl Handle {
        fn push(&self, value: f64) {
            self.log.0.lock().expect("lock").push((self.metric.clone(), value));
        }
    }

    impl metrics::CounterFn for Handle {
        fn increment(&self, value: u64) {
            self.push(value as f64);
        }
        fn absolute(&self, value: u64) {
            self.push(value as f64);
        }
    }

    impl metrics::GaugeFn for Handle {
        fn increment(&self, value: f64) {
            self.push(value);
        }
        fn decrement(&self, value: f64) {
            self.push(-value);
        }
        fn set(&self, value: f64) {
            self.push(value);
        }
    }

    impl metrics::HistogramFn for Handle {
        fn record(&self, value: f64) {
            self.push(value);
        }
    }

    impl Recorded {
        fn handle(&self, key: &Key) -> Arc<Handle> {
            let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
            let metric = if labels.is_empty() {
                key.name().to_owned()
            } else {
                format!("{}{{{}}}", key.name(), labels.join(","))
            };
            Arc::new(Handle { metric, log: self.clone() })
        }

        /// The values recorded for `metric`, in order.
        pub(crate) fn values(&self, metric: &str) -> Vec<f64> {
            self.0.lock().expect("lock").iter().filter(|(m, _)| m == metric).map(|(_, v)| *v).collect()
        }

        /// The sum of a counter's increments.
        pub(crate) fn total(&self, metric: &str) -> f64 {
            self.values(metric).iter().sum()
        }
    }

    impl Recorder for Recorded {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.handle(key))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(self.handle(key))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(self.handle(key))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Recorded;
    use super::*;

    #[test]
    fn a_cold_start_is_counted_once_per_process() {
        let recorded = Recorded::default();
        let _local = metrics::set_default_local_recorder(&recorded);
        // (No other test calls it: the first call of the process is this one.)
        assert!(cold_start(), "the first call counts the cold start");
        assert!(!cold_start(), "a second call (a warm invocation) does not");
        assert!(!cold_start());
        assert_eq!(recorded.values(names::COLD_STARTS), [1.0]);
    }

    #[test]
    fn an_unresolved_level_is_one_sample_per_change_by_kind() {
        let recorded = Recorded::default();
        let _local = metrics::set_default_local_recorder(&recorded);
        unresolved_dead_letters(kinds::DEAD_LETTER, 2);
        unresolved_dead_letters(kinds::MANUAL_ACTION, 1);
        unresolved_dead_letters(kinds::DEAD_LETTER, 0);
        assert_eq!(recorded.values("UnresolvedDeadLetters{Kind=DeadLetter}"), [2.0, 0.0]);
        assert_eq!(recorded.values("UnresolvedDeadLetters{Kind=ManualAction}"), [1.0]);
    }

    /// A compensation is counted when it ran, not when its redelivered command replays it.
    #[tokio::test]
    async fn a_compensation_is_counted_once_not_on_the_replay_of_a_redelivered_command() {
        use crate::aggregate::{CommandContext, Repository};
        use crate::domain::inventory::{Inventory, InventoryCommand};
        use crate::eventstore::InMemoryEventStore;
        use crate::saga::{Step, StepMessage};

        let recorded = Recorded::default();
        let _local = metrics::set_default_local_recorder(&recorded);
        // Given an order whose lines are reserved
        let sample: serde_json::Value =
            serde_json::from_str(include_str!("../../events/reserve-inventory/command.json")).expect("sample");
        let body = sample["Records"][0]["body"].as_str().expect("body");
        let mut msg: StepMessage = serde_json::from_str(body).expect("a step command");
        let repo = Repository::new(InMemoryEventStore::new());
        let ctx = CommandContext::default();
        for line in &msg.order.lines {
            let restock = InventoryCommand::Restock { sku: line.sku.clone(), quantity: 10 };
            repo.execute::<Inventory>(line.sku.as_str(), &restock, &ctx).await.expect("restock");
        }
        let reserved = crate::saga::steps::reserve_inventory(&repo, &msg).await.expect("reserve");
        assert!(reserved.is_ok(), "{reserved:?}");
        assert!(recorded.values("CompensationsRun{Step=ReleaseInventory}").is_empty());

        // When the release runs, and its command is delivered again
        msg.step = Step::ReleaseInventory;
        let first = crate::saga::steps::release_inventory(&repo, &msg).await.expect("release");
        let again = crate::saga::steps::release_inventory(&repo, &msg).await.expect("replay");

        // Then both succeed, and the release is counted once
        assert!(first.is_ok() && again.is_ok(), "{first:?} {again:?}");
        assert_eq!(recorded.total("CompensationsRun{Step=ReleaseInventory}"), 1.0);
    }

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
