//! A circuit breaker shared by every instance of every function that calls one provider (charge
//! and refund share the payment gateway's), so that once a provider is known to be down, nobody
//! waits on it: calls fail at once with [`Why::CircuitOpen`] and the caller falls back (the
//! charge step parks the order).
//!
//! # States and transitions
//!
//! ```text
//! Closed ──(threshold failures in the trailing window)──▶ Open
//! Open ──(recovery time elapsed; the first caller claims the probe)──▶ HalfOpen
//! HalfOpen ──(the probe succeeds)──▶ Closed
//! HalfOpen ──(the probe fails)──▶ Open (for another recovery time)
//! ```
//!
//! The state is one item of the commands table, `BREAKER#<provider>`, with a `version` bumped
//! by every transition. A transition is a conditional write on that version (so of many
//! instances racing to open, or to probe, exactly one wins), in one transaction with an item of
//! its history, `BREAKER#<provider>#<version>` (from, to, when, why; kept a week by the TTL).
//! In half-open, only the caller that won the transition to it calls the provider: one probe at
//! a time. A probe that never reports (its instance died) is given up after a lease, and the
//! next caller claims it.
//!
//! Failures are counted over a sliding window with the rate limiter's window counters (one
//! atomic `ADD` per failure, see [`crate::ratelimit`]), keyed by the breaker's version, so a
//! breaker that closes starts counting afresh. What counts as a failure: an error answer, no
//! connection, a timeout (never a business answer such as a declined card). A success while
//! closed writes nothing.
//!
//! # Cost
//!
//! The state is read through a per-instance cache (`BREAKER_CACHE_MS`, a second by default): a
//! call costs no read, and an instance sees another's transition within that time. When the
//! store cannot be reached the breaker lets the call through (it fails open): it protects the
//! provider and our latency, it must not become an outage of its own.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::config::{ConfigError, Vars};
use crate::ratelimit::{Clock, CounterError, Limit, SystemClock, WindowCounters};

/// When the breaker opens and for how long: `BREAKER_FAILURE_THRESHOLD` failures (0: no breaker)
/// within `BREAKER_WINDOW_SECONDS`; open for `BREAKER_RECOVERY_SECONDS` before a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    pub threshold: u64,
    pub window: Duration,
    pub recovery: Duration,
    /// How long an instance trusts what it last read of the state.
    pub cache: Duration,
    /// How long a probe may take before another caller may probe instead.
    pub probe_lease: Duration,
}

impl Default for BreakerPolicy {
    /// The source material's payment breaker: 10 failures, 30 s to recover.
    fn default() -> Self {
        Self {
            threshold: 10,
            window: Duration::from_secs(60),
            recovery: Duration::from_secs(30),
            cache: Duration::from_millis(1_000),
            probe_lease: Duration::from_secs(10),
        }
    }
}

impl BreakerPolicy {
    /// From the environment; unset variables take the defaults. `None`: the threshold is 0, no
    /// breaker (every call goes to the provider).
    pub fn from_vars(vars: Vars<'_>) -> Result<Option<Self>, ConfigError> {
        let number = |name: &'static str, default: u64| -> Result<u64, ConfigError> {
            match vars(name) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| ConfigError::Invalid { name, reason: format!("expected a whole number, got {v:?}") }),
            }
        };
        let d = Self::default();
        let policy = Self {
            threshold: number("BREAKER_FAILURE_THRESHOLD", d.threshold)?,
            window: Duration::from_secs(number("BREAKER_WINDOW_SECONDS", d.window.as_secs())?.max(1)),
            recovery: Duration::from_secs(number("BREAKER_RECOVERY_SECONDS", d.recovery.as_secs())?.max(1)),
            cache: Duration::from_millis(number("BREAKER_CACHE_MS", d.cache.as_millis() as u64)?),
            probe_lease: d.probe_lease,
        };
        Ok((policy.threshold > 0).then_some(policy))
    }

    /// Whether `previous` failures in the last window and `current` in this one, `elapsed_ms`
    /// into it, reach the threshold: `previous × (W − elapsed) / W + current ≥ threshold`.
    pub fn trips(&self, previous: u64, current: u64, elapsed_ms: u64) -> bool {
        let w = self.window.as_millis();
        let remaining = w - u128::from(elapsed_ms).min(w);
        u128::from(previous) * remaining + u128::from(current) * w >= u128::from(self.threshold) * w
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum State {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "halfOpen",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        [State::Closed, State::Open, State::HalfOpen].into_iter().find(|state| state.as_str() == s)
    }
}

/// The shared state as stored. A breaker never written is closed at version 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub state: State,
    pub version: u64,
    /// Open: when a probe may be tried (ms since the epoch).
    pub open_until_ms: u64,
    /// Half-open: until when the probe is someone's (ms since the epoch).
    pub probe_until_ms: u64,
}

/// One transition, as kept in the breaker's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    pub version: u64,
    pub from: State,
    pub to: State,
    pub at_ms: u64,
    pub reason: String,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("circuit breaker state: {0}")]
pub struct StoreError(pub String);

impl From<CounterError> for StoreError {
    fn from(e: CounterError) -> Self {
        StoreError(e.0)
    }
}

/// Where the shared state lives.
pub trait BreakerStore: Send + Sync {
    fn read(&self, name: &str) -> impl Future<Output = Result<Snapshot, StoreError>> + Send;

    /// `from` → `to` (whose version is `from`'s plus one) if the stored state is still `from`'s
    /// version, with its history item. `Ok(false)`: someone else moved it first.
    fn transition(
        &self,
        name: &str,
        from: &Snapshot,
        to: &Snapshot,
        at_ms: u64,
        reason: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// A half-open breaker whose probe lease ran out: `until_ms` is the new probe's lease, if
    /// the state is still `from`. Not a transition: no history.
    fn claim_probe(
        &self,
        name: &str,
        from: &Snapshot,
        until_ms: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The last `count` transitions, oldest first.
    fn history(&self, name: &str, count: u64) -> impl Future<Output = Result<Vec<Transition>, StoreError>> + Send;
}

/// What [`CircuitBreaker::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Call the provider, then [`CircuitBreaker::record`] how it went.
    Call(Permit),
    /// Do not call: the breaker is open (or another caller is probing). Worth trying again
    /// after `retry_after`.
    Refuse { retry_after: Duration },
}

/// A call let through: a normal one, or the half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    version: u64,
    probe: bool,
}

impl Permit {
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

/// How a call let through went, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer, a business "no" included.
    Answered,
    /// No usable answer: an error status, no connection, a timeout.
    Failed,
}

/// One provider's breaker, as seen by one instance.
pub struct CircuitBreaker<S, C> {
    name: String,
    policy: BreakerPolicy,
    store: S,
    failures: C,
    clock: Arc<dyn Clock>,
    /// What this instance last read or wrote, and when (ms since the epoch).
    cached: Mutex<Option<(Snapshot, u64)>>,
}

impl<S, C> std::fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker").field("name", &self.name).field("policy", &self.policy).finish()
    }
}

impl<S: BreakerStore, C: WindowCounters> CircuitBreaker<S, C> {
    pub fn new(name: impl Into<String>, policy: BreakerPolicy, store: S, failures: C) -> Self {
        Self { name: name.into(), policy, store, failures, clock: Arc::new(SystemClock), cached: Mutex::new(None) }
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn policy(&self) -> &BreakerPolicy {
        &self.policy
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    fn remember(&self, snapshot: Snapshot, now_ms: u64) {
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((snapshot, now_ms));
    }

    fn forget(&self) {
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The state, from the cache while it is fresh. `None`: the store could not be read.
    async fn snapshot(&self, now_ms: u64) -> Option<Snapshot> {
        let cached = *self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((snapshot, at)) = cached
            && now_ms.saturating_sub(at) < self.policy.cache.as_millis() as u64
        {
            return Some(snapshot);
        }
        match self.store.read(&self.name).await {
            Ok(snapshot) => {
                self.remember(snapshot, now_ms);
                Some(snapshot)
            }
            Err(e) => {
                tracing::warn!(breaker = %self.name, error = %e, "breaker state unreadable: the call goes through");
                None
            }
        }
    }

    /// Whether a call may go to the provider now.
    pub async fn admit(&self) -> Admission {
        let now = self.clock.now_ms();
        let Some(snapshot) = self.snapshot(now).await else {
            return Admission::Call(Permit { version: 0, probe: false });
        };
        let wait = |until: u64| Duration::from_millis(until.saturating_sub(now).max(1_000));
        match snapshot.state {
            State::Closed => Admission::Call(Permit { version: snapshot.version, probe: false }),
            State::Open if now < snapshot.open_until_ms => {
                Admission::Refuse { retry_after: wait(snapshot.open_until_ms) }
            }
            State::Open => {
                let lease = now + self.policy.probe_lease.as_millis() as u64;
                let probing = Snapshot {
                    state: State::HalfOpen,
                    version: snapshot.version + 1,
                    open_until_ms: snapshot.open_until_ms,
                    probe_until_ms: lease,
                };
                let reason = "recovery time elapsed: one probe call";
                self.move_to(snapshot, probing, now, reason).await.unwrap_or(Admission::Refuse { retry_after: wait(0) })
            }
            State::HalfOpen if now >= snapshot.probe_until_ms => {
                let lease = now + self.policy.probe_lease.as_millis() as u64;
                match self.store.claim_probe(&self.name, &snapshot, lease).await {
                    Ok(true) => {
                        self.remember(Snapshot { probe_until_ms: lease, ..snapshot }, now);
                        Admission::Call(Permit { version: snapshot.version, probe: true })
                    }
                    Ok(false) => {
                        self.forget();
                        Admission::Refuse { retry_after: wait(0) }
                    }
                    Err(e) => {
                        tracing::warn!(breaker = %self.name, error = %e, "probe not claimed");
                        Admission::Refuse { retry_after: wait(0) }
                    }
                }
            }
            State::HalfOpen => Admission::Refuse { retry_after: wait(snapshot.probe_until_ms) },
        }
    }

    /// A transition; the winner of a transition to half-open is the probe. `None`: lost the
    /// race or could not write (the cache is dropped, so the next call reads what won).
    async fn move_to(&self, from: Snapshot, to: Snapshot, now: u64, reason: &str) -> Option<Admission> {
        match self.store.transition(&self.name, &from, &to, now, reason).await {
            Ok(true) => {
                tracing::warn!(
                    breaker = %self.name, from = from.state.as_str(), to = to.state.as_str(), version = to.version, reason,
                    "circuit breaker transition"
                );
                crate::metrics::breaker_transition(&self.name, to.state.as_str());
                self.remember(to, now);
                Some(Admission::Call(Permit { version: to.version, probe: to.state == State::HalfOpen }))
            }
            Ok(false) => {
                self.forget();
                None
            }
            Err(e) => {
                tracing::warn!(breaker = %self.name, error = %e, "breaker transition not written");
                self.forget();
                None
            }
        }
    }

    /// How a let-through call went: a probe's outcome closes or reopens the breaker; a normal
    /// call's failure is counted, and opens the breaker at the threshold.
    pub async fn record(&self, permit: Permit, outcome: Outcome) {
        let now = self.clock.now_ms();
        let half_open = Snapshot { state: State::HalfOpen, version: permit.version, ..Snapshot::default() };
        let open = |version: u64| Snapshot {
            state: State::Open,
            version,
            open_until_ms: now + self.policy.recovery.as_millis() as u64,
            probe_until_ms: 0,
        };
        match (permit.probe, outcome) {
            (true, Outcome::Answered) => {
                let closed = Snapshot { state: State::Closed, version: permit.version + 1, ..Snapshot::default() };
                self.move_to(half_open, closed, now, "the probe call was answered").await;
            }
            (true, Outcome::Failed) => {
                self.move_to(half_open, open(permit.version + 1), now, "the probe call failed").await;
            }
            (false, Outcome::Answered) => {}
            (false, Outcome::Failed) => {
                let counted = match self.count_failure(permit.version, now).await {
                    Ok(counted) => counted,
                    Err(e) => {
                        tracing::warn!(breaker = %self.name, error = %e, "failure not counted");
                        return;
                    }
                };
                if let Some((previous, current, elapsed)) = counted
                    && self.policy.trips(previous, current, elapsed)
                {
                    let closed = Snapshot { state: State::Closed, version: permit.version, ..Snapshot::default() };
                    let reason = format!(
                        "{} failures within {} s (threshold {})",
                        previous + current,
                        2 * self.policy.window.as_secs(),
                        self.policy.threshold
                    );
                    self.move_to(closed, open(permit.version + 1), now, &reason).await;
                }
            }
        }
    }

    /// Counts one failure of the state at `version`: the last window's count, this one's after
    /// the increment, and how far into this window we are.
    async fn count_failure(&self, version: u64, now: u64) -> Result<Option<(u64, u64, u64)>, StoreError> {
        let Some(limit) = Limit::new(self.policy.threshold, self.policy.window) else { return Ok(None) };
        let (window_start, elapsed) = limit.window_at(now);
        let window_s = limit.window().as_secs();
        let key = format!("breaker:{}:v{version}", self.name);
        let (current, previous) = futures::future::join(
            self.failures.add(&key, window_start, 1, window_start + 3 * window_s),
            self.failures.get(&key, window_start.saturating_sub(window_s)),
        )
        .await;
        let as_count = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(Some((as_count(previous?), as_count(current?), elapsed)))
    }

    /// The breaker's last transitions, oldest first.
    pub async fn history(&self, count: u64) -> Result<Vec<Transition>, StoreError> {
        self.store.history(&self.name, count).await
    }
}

/// The state in memory: for unit tests of the breaker's logic.
#[derive(Debug, Default)]
pub struct MemoryBreakerStore {
    inner: Mutex<(Snapshot, Vec<Transition>)>,
}

impl BreakerStore for MemoryBreakerStore {
    async fn read(&self, _name: &str) -> Result<Snapshot, StoreError> {
        Ok(self.inner.lock().unwrap_or_else(|p| p.into_inner()).0)
    }

    async fn transition(
        &self,
        _name: &str,
        from: &Snapshot,
        to: &Snapshot,
        at_ms: u64,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.0.version != from.version || inner.0.state != from.state {
            return Ok(false);
        }
        inner.0 = *to;
        let transition =
            Transition { version: to.version, from: from.state, to: to.state, at_ms, reason: reason.to_owned() };
        inner.1.push(transition);
        Ok(true)
    }

    async fn claim_probe(&self, _name: &str, from: &Snapshot, until_ms: u64) -> Result<bool, StoreError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.0.version != from.version || inner.0.probe_until_ms != from.probe_until_ms {
            return Ok(false);
        }
        inner.0.probe_until_ms = until_ms;
        Ok(true)
    }

    async fn history(&self, _name: &str, count: u64) -> Result<Vec<Transition>, StoreError> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let skip = inner.1.len().saturating_sub(count as usize);
        Ok(inner.1[skip..].to_vec())
    }
}

#[cfg(test)]
mod tests;
