//! Adaptive timeouts: each provider call waits as long as the provider's recent latency says an
//! answer may still come, and never past the invocation's deadline.
//!
//! Per instance and per operation, a rolling window of the latest [`WINDOW`] request latencies
//! ([`Latencies`]); the timeout is `clamp(k × p99, floor, ceiling)` ([`AdaptiveTimeout`]), `k` =
//! [`P99_FACTOR`], floor [`FLOOR`], ceiling `PROVIDER_TIMEOUT_MS`, and at most the time left to the
//! invocation's deadline less [`OUTCOME_RESERVE`]. With fewer than [`MIN_SAMPLES`] latencies (a
//! cold instance) it is the ceiling.
//!
//! What goes into the window: the time to an answer's headers (any status); for a request that
//! was given up (timed out, or the losing request of a hedge), the time it had waited so far: a
//! lower bound of its latency, so a slowing provider raises the p99 and the timeout follows it up
//! (a window of answers alone would keep the timeout short while every call times out). A request
//! that failed without an answer (no connection) tells nothing about latency and is left out.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Latencies kept per operation: the most recent ones.
pub const WINDOW: usize = 200;
/// Below this many latencies, the percentiles are not trusted: the timeout is the ceiling, and
/// no request is hedged.
pub const MIN_SAMPLES: usize = 20;
/// `k`: the timeout is `k × p99`, so a request slower than nearly every recent one still gets
/// its answer, and only a provider that stalls is cut off.
pub const P99_FACTOR: f64 = 3.0;
/// The shortest timeout, however fast the provider has been: room for a new connection.
pub const FLOOR: Duration = Duration::from_millis(250);
/// Left after a provider call, before the invocation's deadline, to record its outcome.
pub const OUTCOME_RESERVE: Duration = Duration::from_millis(250);

/// The latest latencies of one operation, oldest first.
#[derive(Debug, Clone)]
pub struct LatencyWindow {
    samples: VecDeque<Duration>,
    capacity: usize,
}

impl LatencyWindow {
    pub fn new(capacity: usize) -> Self {
        Self { samples: VecDeque::with_capacity(capacity), capacity: capacity.max(1) }
    }

    /// Adds one, forgetting the oldest when full.
    pub fn record(&mut self, latency: Duration) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(latency);
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The `q` quantile (nearest rank: the smallest latency with at least `q` of them at or below
    /// it); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut sorted: Vec<Duration> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
        sorted.get(rank.saturating_sub(1)).copied()
    }

    /// What the timeout and the hedge read: the percentiles, once there are enough latencies.
    pub fn recent(&self) -> Recent {
        if self.len() < MIN_SAMPLES {
            return Recent { samples: self.len(), p95: None, p99: None };
        }
        Recent { samples: self.len(), p95: self.quantile(0.95), p99: self.quantile(0.99) }
    }
}

/// An operation's recent latency, as a call starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recent {
    pub samples: usize,
    /// `None` until there are [`MIN_SAMPLES`].
    pub p95: Option<Duration>,
    /// `None` until there are [`MIN_SAMPLES`].
    pub p99: Option<Duration>,
}

/// One instance's latency windows, by operation (`charge`, `refund`, …).
#[derive(Debug, Default)]
pub struct Latencies(Mutex<HashMap<&'static str, LatencyWindow>>);

impl Latencies {
    pub fn record(&self, operation: &'static str, latency: Duration) {
        self.lock().entry(operation).or_insert_with(|| LatencyWindow::new(WINDOW)).record(latency);
    }

    pub fn recent(&self, operation: &'static str) -> Recent {
        self.lock().get(operation).map(LatencyWindow::recent).unwrap_or_default()
    }

    /// Times one request from now: recorded when it [`answered`](Sample::answered), or when it
    /// is dropped unfinished (given up: its wait so far), not when it [`failed`](Sample::failed).
    pub fn sample(&self, operation: &'static str) -> Sample<'_> {
        Sample { latencies: self, operation, started: Instant::now(), done: false }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, LatencyWindow>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One request being timed (see [`Latencies::sample`]).
#[derive(Debug)]
pub struct Sample<'a> {
    latencies: &'a Latencies,
    operation: &'static str,
    started: Instant,
    done: bool,
}

impl Sample<'_> {
    /// An answer came: its latency is recorded.
    pub fn answered(mut self) {
        self.done = true;
        self.latencies.record(self.operation, self.started.elapsed());
    }

    /// No answer, for a reason other than time (no connection): nothing is recorded.
    pub fn failed(mut self) {
        self.done = true;
    }
}

impl Drop for Sample<'_> {
    fn drop(&mut self) {
        // Given up (timed out, or lost a hedge): it took at least this long.
        if !self.done {
            self.latencies.record(self.operation, self.started.elapsed());
        }
    }
}

/// The timeout rule: `clamp(factor × p99, floor, ceiling)`, within the deadline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveTimeout {
    pub factor: f64,
    pub floor: Duration,
    /// `PROVIDER_TIMEOUT_MS`: also the timeout until the window has [`MIN_SAMPLES`].
    pub ceiling: Duration,
}

impl AdaptiveTimeout {
    /// [`P99_FACTOR`] and [`FLOOR`] under `ceiling` (a ceiling below the floor wins).
    pub fn new(ceiling: Duration) -> Self {
        Self { factor: P99_FACTOR, floor: FLOOR, ceiling }
    }

    /// The timeout of a call starting now, with `remaining` to the invocation's deadline (`None`:
    /// no deadline). `None` when no time is left for a call and its outcome.
    pub fn timeout(&self, recent: &Recent, remaining: Option<Duration>) -> Option<Duration> {
        let adapted = match recent.p99 {
            Some(p99) => p99.mul_f64(self.factor).max(self.floor).min(self.ceiling),
            None => self.ceiling,
        };
        let timeout = match remaining {
            Some(left) => adapted.min(left.saturating_sub(OUTCOME_RESERVE)),
            None => adapted,
        };
        (!timeout.is_zero()).then_some(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn window(latencies_ms: impl IntoIterator<Item = u64>) -> LatencyWindow {
        let mut window = LatencyWindow::new(WINDOW);
        latencies_ms.into_iter().for_each(|ms| window.record(Duration::from_millis(ms)));
        window
    }

    #[test]
    fn percentiles_by_nearest_rank_over_the_latest_latencies() {
        // 1..=100 ms: p95 is the 95th, p99 the 99th
        let w = window(1..=100);
        assert_eq!(
            (w.quantile(0.95), w.quantile(0.99), w.quantile(1.0)),
            (Some(95 * MS), Some(99 * MS), Some(100 * MS))
        );
        assert_eq!(w.quantile(0.0), Some(MS));
        // The window rolls: after 200 more at 10 ms, the old tail is gone
        let mut w = w;
        (0..WINDOW).for_each(|_| w.record(10 * MS));
        assert_eq!((w.len(), w.quantile(0.99)), (WINDOW, Some(10 * MS)));
        assert_eq!(LatencyWindow::new(5).quantile(0.5), None);
    }

    #[test]
    fn too_few_latencies_give_no_percentiles() {
        assert_eq!(window(1..MIN_SAMPLES as u64).recent(), Recent { samples: MIN_SAMPLES - 1, p95: None, p99: None });
        let enough = window(1..=MIN_SAMPLES as u64).recent();
        assert_eq!((enough.p95, enough.p99), (Some(19 * MS), Some(20 * MS)));
    }

    #[test]
    fn the_timeout_is_k_times_p99_between_floor_and_ceiling() {
        let rule = AdaptiveTimeout::new(Duration::from_secs(3));
        let with_p99 = |ms: u64| Recent { samples: 100, p95: None, p99: Some(Duration::from_millis(ms)) };
        // 3 × 400 ms
        assert_eq!(rule.timeout(&with_p99(400), None), Some(1_200 * MS));
        // a fast provider: the floor
        assert_eq!(rule.timeout(&with_p99(20), None), Some(FLOOR));
        // a slow one: the ceiling
        assert_eq!(rule.timeout(&with_p99(2_000), None), Some(Duration::from_secs(3)));
        // a cold instance (no percentiles): the ceiling
        assert_eq!(rule.timeout(&Recent::default(), None), Some(Duration::from_secs(3)));
        // a ceiling under the floor wins
        assert_eq!(AdaptiveTimeout::new(100 * MS).timeout(&with_p99(20), None), Some(100 * MS));
    }

    #[test]
    fn the_timeout_never_passes_the_deadline() {
        let rule = AdaptiveTimeout::new(Duration::from_secs(3));
        let recent = Recent { samples: 100, p95: None, p99: Some(400 * MS) };
        // 1.2 s adapted, but 1 s left: 750 ms, leaving the reserve for the outcome
        assert_eq!(rule.timeout(&recent, Some(Duration::from_secs(1))), Some(1_000 * MS - OUTCOME_RESERVE));
        assert_eq!(rule.timeout(&recent, Some(Duration::from_secs(9))), Some(1_200 * MS));
        // no time for a call and its outcome: none
        assert_eq!(rule.timeout(&recent, Some(OUTCOME_RESERVE)), None);
        assert_eq!(rule.timeout(&recent, Some(Duration::ZERO)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_and_given_up_requests_are_recorded_failures_are_not() {
        let latencies = Latencies::default();
        // An answer after 30 ms
        let sample = latencies.sample("charge");
        tokio::time::sleep(30 * MS).await;
        sample.answered();
        // A connection refused after 5 ms: nothing
        let sample = latencies.sample("charge");
        tokio::time::sleep(5 * MS).await;
        sample.failed();
        // A request given up after 700 ms (dropped): at least 700 ms
        let given_up = async {
            let _sample = latencies.sample("charge");
            tokio::time::sleep(Duration::from_secs(10)).await;
        };
        assert!(tokio::time::timeout(700 * MS, given_up).await.is_err());

        let window = latencies.0.lock().expect("lock")["charge"].clone();
        assert_eq!(window.samples, [30 * MS, 700 * MS]);
        assert_eq!(latencies.recent("refund"), Recent::default());
    }
}
