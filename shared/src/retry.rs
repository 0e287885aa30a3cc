//! Bounded retry with exponential backoff and full jitter.
//!
//! Full jitter (a delay drawn uniformly from `0..=min(cap, base * 2^attempt)`) spreads competing
//! writers apart better than equal or decorrelated jitter for optimistic-concurrency conflicts:
//! see the AWS Architecture Blog, "Exponential Backoff And Jitter".

use std::time::Duration;

use crate::deadline::Deadline;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts including the first; 1 means no retry.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 10, base_delay: Duration::from_millis(10), max_delay: Duration::from_millis(1_000) }
    }
}

impl RetryPolicy {
    pub fn no_retry() -> Self {
        Self { max_attempts: 1, ..Self::default() }
    }

    /// Upper bound of the delay before retry number `retry` (0 for the first retry).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// A fully jittered delay before retry number `retry`.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry).as_micros().min(u64::MAX as u128) as u64;
        Duration::from_micros(fastrand::u64(0..=ceiling))
    }

    /// Whether another attempt is allowed after `attempts_made` attempts.
    pub fn allows_another(&self, attempts_made: u32) -> bool {
        attempts_made < self.max_attempts
    }

    /// The attempts of one operation under this policy, until `deadline`: the one retry loop's
    /// bookkeeping (see [`Attempts::again`]).
    pub fn attempts(&self, deadline: Deadline) -> Attempts<'_> {
        Attempts { policy: self, deadline, made: 0 }
    }
}

/// Counts the attempts of one operation and sleeps between them.
///
/// ```ignore
/// let mut attempts = policy.attempts(deadline);
/// loop {
///     match try_once().await {
///         Lost => if !attempts.again().await { return Err(GaveUp(attempts.made())) },
///         done => return done,
///     }
/// }
/// ```
#[derive(Debug)]
pub struct Attempts<'a> {
    policy: &'a RetryPolicy,
    deadline: Deadline,
    made: u32,
}

impl Attempts<'_> {
    /// Records an attempt that fell short and sleeps a fully jittered delay before the next;
    /// `false` (at once) when the attempts are spent or the pause would not fit before the
    /// deadline.
    pub async fn again(&mut self) -> bool {
        self.made += 1;
        let pause = self.policy.delay(self.made - 1);
        if !self.policy.allows_another(self.made) || !self.deadline.allows(pause) {
            return false;
        }
        tracing::debug!(attempt = self.made, ?pause, "retrying");
        tokio::time::sleep(pause).await;
        true
    }

    /// The attempts that fell short so far.
    pub fn made(&self) -> u32 {
        self.made
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        };
        assert_eq!(p.ceiling(0), Duration::from_millis(10));
        assert_eq!(p.ceiling(1), Duration::from_millis(20));
        assert_eq!(p.ceiling(2), Duration::from_millis(40));
        assert_eq!(p.ceiling(3), Duration::from_millis(50));
        assert_eq!(p.ceiling(40), Duration::from_millis(50), "large exponents saturate, not overflow");
    }

    #[test]
    fn jittered_delay_stays_within_ceiling_and_varies() {
        let p = RetryPolicy::default();
        let delays: Vec<_> = (0..200).map(|_| p.delay(3)).collect();
        assert!(delays.iter().all(|d| *d <= p.ceiling(3)));
        let first = delays[0];
        assert!(delays.iter().any(|d| *d != first), "full jitter must not be a constant");
    }

    fn fast(max_attempts: u32) -> RetryPolicy {
        RetryPolicy { max_attempts, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(2) }
    }

    #[tokio::test]
    async fn attempts_sleep_between_tries_until_the_policy_is_spent() {
        // Given a policy of three attempts
        let policy = fast(3);
        let mut attempts = policy.attempts(Deadline::never());
        // When every try falls short: two more are allowed, then none
        assert!(attempts.again().await);
        assert!(attempts.again().await);
        assert!(!attempts.again().await);
        // Then the three that fell short are counted
        assert_eq!(attempts.made(), 3);
    }

    #[tokio::test]
    async fn attempts_do_not_pause_past_the_deadline() {
        // Given a policy whose first pause is up to a second, and a deadline already past
        let slow =
            RetryPolicy { max_attempts: 10, base_delay: Duration::from_secs(1), max_delay: Duration::from_secs(1) };
        let deadline = Deadline::after(Duration::ZERO);
        // When the first try falls short, no pause fits
        let started = tokio::time::Instant::now();
        assert!(!slow.attempts(deadline).again().await);
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn attempts_are_bounded() {
        let p = RetryPolicy { max_attempts: 3, ..RetryPolicy::default() };
        assert!(p.allows_another(2));
        assert!(!p.allows_another(3));
        assert!(!RetryPolicy::no_retry().allows_another(1));
    }
}
