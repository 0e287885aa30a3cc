//! Rate limiting per key (place-order: per customer) over a sliding window.
//!
//! # Algorithm: a sliding window counter
//!
//! Time is cut into fixed windows of `W` (a minute). Each key has one counter per window. A
//! request at `elapsed` into the current window is admitted when
//!
//! ```text
//! previous × (W − elapsed) / W + current ≤ max
//! ```
//!
//! where `previous` is the last window's count and `current` this window's, this request
//! included: the last window's requests are assumed spread evenly and only the part of it still
//! inside the trailing `W` counts. Two small counters per key instead of a log of timestamps, and
//! the counters are atomic increments: no read-modify-write, no contention retries however many
//! Lambda instances serve one customer.
//!
//! # What concurrency can and cannot do
//!
//! Every request increments the current window first (an atomic `ADD`, whose answer is the count
//! *after* it) and decides on that answer. Two concurrent requests never see the same count, so
//! however many instances race, the admitted requests of a window are at most what the formula
//! allows: concurrency adds **no** overshoot within a window. A refused request gives its
//! increment back; until it has, it makes others stricter, never looser (and if the give-back is
//! lost, the window stays one stricter until it ends).
//!
//! The previous window's count is read (strongly consistent) alongside the increment. It is
//! final once no request stamped with that window is still in flight: the bound on overshoot is
//! the number of the key's requests that read the clock before the boundary and increment after
//! our read (each ≤ 1, weighted by `(W − elapsed)/W`): the key's requests in flight across a
//! window boundary, a few milliseconds wide plus the instances' clock skew (NTP: milliseconds).
//!
//! The algorithm itself is an approximation of a true sliding window: within any one fixed
//! window at most `max` are admitted, but if the last window's requests all came at its very
//! end, a trailing span of `W` straddling the boundary can hold up to `2 × max − 1`. For traffic
//! spread over the window the estimate is close; this is the usual trade of the sliding window
//! counter for O(1) state and contention-free writes.
//!
//! # Storage
//!
//! [`WindowCounters`] is the port; [`crate::adapters::dynamodb::DynamoCounters`] keeps each counter as an item
//! `RATE#<key>#<window start>` in the commands table (see its docs for why that table), with a TTL;
//! [`InMemoryCounters`] is for tests. The arithmetic ([`Limit::admits`], [`Limit::retry_after`])
//! is pure and clock-free; [`RateLimiter`] takes the time from a [`Clock`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{ConfigError, Vars};

/// How many requests a key may make per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    max: u64,
    window_ms: u64,
}

impl Limit {
    /// At most `max` per `window` (whole seconds, at least one). `None` for `max == 0`: no limit.
    pub fn new(max: u64, window: Duration) -> Option<Self> {
        let window_ms = window.as_secs().max(1).saturating_mul(1000);
        (max > 0).then_some(Self { max, window_ms })
    }

    pub fn per_minute(max: u64) -> Option<Self> {
        Self::new(max, Duration::from_secs(60))
    }

    /// A per-minute limit from the variable `name`: unset or `0` is no limit, anything but a
    /// whole number is a configuration error.
    pub fn per_minute_from_vars(vars: Vars<'_>, name: &'static str) -> Result<Option<Self>, ConfigError> {
        match vars(name) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map(Self::per_minute)
                .map_err(|_| ConfigError::Invalid { name, reason: format!("expected a whole number, got {v:?}") }),
        }
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// The fixed window `now_ms` (since the epoch) falls in: its start in whole seconds since
    /// the epoch, and how many milliseconds into it `now_ms` is.
    pub fn window_at(&self, now_ms: u64) -> (u64, u64) {
        let elapsed = now_ms % self.window_ms;
        ((now_ms - elapsed) / 1000, elapsed)
    }

    /// Whether a request is admitted whose increment made the current window's count `current`
    /// (itself included), `elapsed_ms` into the window, after `previous` in the last window:
    /// `previous × (W − elapsed) / W + current ≤ max`, in integers (exact, no rounding).
    pub fn admits(&self, previous: u64, current: u64, elapsed_ms: u64) -> bool {
        let w = u128::from(self.window_ms);
        let remaining = w - u128::from(elapsed_ms).min(w);
        u128::from(previous) * remaining + u128::from(current) * w <= u128::from(self.max) * w
    }

    /// How long until one more request would be admitted, if no other came meanwhile, with
    /// `admitted` counted in the current window (this request not included), `elapsed_ms` into
    /// it and `previous` in the last window. At least a second: it is a `Retry-After`.
    pub fn retry_after(&self, previous: u64, admitted: u64, elapsed_ms: u64) -> Duration {
        let w = u128::from(self.window_ms);
        let elapsed = u128::from(elapsed_ms).min(w);
        let max = u128::from(self.max);
        // The first point `e` in a window (ms into it) from which one more fits after `before`
        // weighted and `now` counted: before × (W − e) ≤ (max − now − 1) × W. None: not in it.
        let fits_from = |before: u64, now: u64| -> Option<u128> {
            let room = max.checked_sub(u128::from(now) + 1)? * w;
            let from = match u128::from(before) {
                0 => 0,
                before => w - (room / before).min(w),
            };
            (from < w).then_some(from)
        };
        let wait = match fits_from(previous, admitted) {
            Some(from) => from.saturating_sub(elapsed),
            // Not in this window: in the next, this window's count is the one weighted (and it
            // always fits by the next one's end, where that count no longer weighs).
            None => (w - elapsed) + fits_from(admitted, 0).unwrap_or(w),
        };
        let seconds = wait.div_ceil(1000).max(1);
        Duration::from_secs(u64::try_from(seconds).unwrap_or(u64::MAX))
    }
}

/// Where the limiter reads the time.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("rate limit counters: {0}")]
pub struct CounterError(pub String);

/// One counter per key and fixed window.
pub trait WindowCounters: Send + Sync {
    /// Adds `delta` to the window's counter (a missing counter is 0) and returns its new value,
    /// atomically. `expires_at` (seconds since the epoch) is when the counter may be dropped.
    fn add(
        &self,
        key: &str,
        window_start: u64,
        delta: i64,
        expires_at: u64,
    ) -> impl Future<Output = Result<i64, CounterError>> + Send;

    /// The window's counter, 0 if there is none.
    fn get(&self, key: &str, window_start: u64) -> impl Future<Output = Result<i64, CounterError>> + Send;
}

/// What the limiter decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Counted: hand the slot back with [`RateLimiter::release`] if the request turns out to
    /// have done nothing (a repeat), so only real work counts.
    Admitted(Slot),
    Refused {
        retry_after: Duration,
    },
}

/// An admitted request's place in its window's counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    key: String,
    window_start: u64,
    expires_at: u64,
}

/// A sliding-window limit per key over a [`WindowCounters`] store.
pub struct RateLimiter<C> {
    counters: C,
    limit: Limit,
    clock: Arc<dyn Clock>,
    timeout: Duration,
}

impl<C> std::fmt::Debug for RateLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").field("limit", &self.limit).field("timeout", &self.timeout).finish()
    }
}

impl<C: WindowCounters> RateLimiter<C> {
    /// How long the counters may take before the limiter gives up (and its caller decides).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

    pub fn new(counters: C, limit: Limit) -> Self {
        Self { counters, limit, clock: Arc::new(SystemClock), timeout: Self::DEFAULT_TIMEOUT }
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn limit(&self) -> Limit {
        self.limit
    }

    pub fn counters(&self) -> &C {
        &self.counters
    }

    /// Counts a request of `key` and decides. An error means the counters could not be reached
    /// (or took longer than the timeout): the caller chooses to fail open or closed.
    pub async fn acquire(&self, key: &str) -> Result<Admission, CounterError> {
        let (window_start, elapsed) = self.limit.window_at(self.clock.now_ms());
        let window_s = self.limit.window_ms / 1000;
        // Read as "the previous window" until two windows on; a window more for clock skew.
        let expires_at = window_start + 3 * window_s;
        let counted = async {
            // Both at once: one round trip. The increment decides; the read weighs.
            let (current, previous) = futures::future::join(
                self.counters.add(key, window_start, 1, expires_at),
                self.counters.get(key, window_start.saturating_sub(window_s)),
            )
            .await;
            Ok::<_, CounterError>((current?, previous?))
        };
        let (current, previous) = tokio::time::timeout(self.timeout, counted)
            .await
            .map_err(|_| CounterError(format!("no answer within {:?}", self.timeout)))??;
        // Counters only go below zero if a give-back outlived its item; read them as empty.
        let current = u64::try_from(current).unwrap_or(0);
        let previous = u64::try_from(previous).unwrap_or(0);
        if self.limit.admits(previous, current, elapsed) {
            return Ok(Admission::Admitted(Slot { key: key.to_owned(), window_start, expires_at }));
        }
        let retry_after = self.limit.retry_after(previous, current.saturating_sub(1), elapsed);
        // A refused request does not use the window up: its increment is given back.
        if let Err(e) = self.counters.add(key, window_start, -1, expires_at).await {
            tracing::warn!(error = %e, "a refused request's count was not given back: its window stays stricter");
        }
        Ok(Admission::Refused { retry_after })
    }

    /// Gives an admitted request's count back (it did nothing new). Best effort: if it fails,
    /// the window stays one stricter until it ends.
    pub async fn release(&self, slot: Slot) {
        let given_back = self.counters.add(&slot.key, slot.window_start, -1, slot.expires_at);
        match tokio::time::timeout(self.timeout, given_back).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "an admitted request's count was not given back"),
            Err(_) => tracing::warn!("an admitted request's count was not given back in time"),
        }
    }
}

/// Counters in memory, for tests; [`Self::fail`] makes every call fail (an unreachable store).
#[derive(Debug, Default)]
pub struct InMemoryCounters {
    counters: Mutex<HashMap<(String, u64), i64>>,
    failing: AtomicBool,
}

impl InMemoryCounters {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// A window's counter as stored (0 if none).
    pub fn value(&self, key: &str, window_start: u64) -> i64 {
        let counters = self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        counters.get(&(key.to_owned(), window_start)).copied().unwrap_or(0)
    }

    fn check(&self) -> Result<(), CounterError> {
        match self.failing.load(Ordering::SeqCst) {
            true => Err(CounterError("the counters are unreachable".into())),
            false => Ok(()),
        }
    }
}

impl WindowCounters for InMemoryCounters {
    async fn add(&self, key: &str, window_start: u64, delta: i64, _expires_at: u64) -> Result<i64, CounterError> {
        self.check()?;
        let mut counters = self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let counter = counters.entry((key.to_owned(), window_start)).or_insert(0);
        *counter += delta;
        Ok(*counter)
    }

    async fn get(&self, key: &str, window_start: u64) -> Result<i64, CounterError> {
        self.check()?;
        Ok(self.value(key, window_start))
    }
}

/// A clock that stands still until moved: for tests.
#[derive(Debug, Default)]
pub struct FakeClock(std::sync::atomic::AtomicU64);

impl FakeClock {
    pub fn at_ms(now_ms: u64) -> Arc<Self> {
        Arc::new(Self(now_ms.into()))
    }

    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests;
