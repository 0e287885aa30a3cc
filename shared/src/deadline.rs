//! The invocation's deadline, for handlers that work through a batch: they stop starting work
//! in time to answer before Lambda kills the instance, and report what they did not finish, so
//! a batch that cannot fit in one invocation makes progress instead of timing out whole and
//! being retried whole (a livelock).

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Kept back from the Lambda deadline for answering: serializing the response and the Runtime
/// API round trip.
pub const ANSWER_RESERVE: Duration = Duration::from_millis(1_000);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Option<Instant>,
}

impl Deadline {
    /// From Lambda's deadline (`Context::deadline`, milliseconds since the Unix epoch), less
    /// [`ANSWER_RESERVE`].
    pub fn from_epoch_millis(deadline_ms: u64) -> Self {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms)).saturating_sub(ANSWER_RESERVE);
        Self::after(left)
    }

    /// `left` from now.
    pub fn after(left: Duration) -> Self {
        Self { at: Some(Instant::now() + left) }
    }

    /// No deadline (tests and tools).
    pub fn never() -> Self {
        Self { at: None }
    }

    /// Time left; `None` when there is no deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.at.map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Whether waiting `pause` still leaves time before the deadline.
    pub fn allows(&self, pause: Duration) -> bool {
        self.remaining().is_none_or(|left| left > pause)
    }

    /// `work`, or `None` if the deadline comes first (the work is dropped, so cancelled).
    pub async fn run<F: Future>(&self, work: F) -> Option<F::Output> {
        match self.at {
            None => Some(work.await),
            Some(at) => tokio::time::timeout_at(at, work).await.ok(),
        }
    }

    /// `work` with this deadline as its [`current`](Self::current) one: what it calls deep down
    /// (a provider's HTTP client) bounds itself by the invocation's deadline without every
    /// signature in between carrying it. Set for as long as `work` is polled, in the task that
    /// polls it (a task spawned from `work` does not inherit it).
    pub async fn scope<F: Future>(self, work: F) -> F::Output {
        CURRENT.scope(self, work).await
    }

    /// The deadline of the work being polled, set by [`scope`](Self::scope); [`never`](Self::never)
    /// outside one (tests and tools).
    pub fn current() -> Self {
        CURRENT.try_with(|deadline| *deadline).unwrap_or_else(|_| Self::never())
    }
}

tokio::task_local! {
    /// The invocation's deadline, for the work of one command (see [`Deadline::scope`]).
    static CURRENT: Deadline;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_past_the_deadline_is_cut_off() {
        let deadline = Deadline::after(Duration::from_millis(100));
        assert_eq!(deadline.run(async { 7 }).await, Some(7));
        assert!(deadline.allows(Duration::from_millis(50)));
        assert!(!deadline.allows(Duration::from_millis(150)));
        let slow = deadline.run(tokio::time::sleep(Duration::from_secs(5))).await;
        assert_eq!(slow, None);
        assert_eq!(deadline.remaining(), Some(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn the_current_deadline_is_the_scope_s_while_its_work_is_polled() {
        assert_eq!(Deadline::current(), Deadline::never());
        let deadline = Deadline::after(Duration::from_millis(300));
        let seen = deadline
            .scope(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Deadline::current().remaining()
            })
            .await;
        assert_eq!(seen, Some(Duration::from_millis(200)));
        assert_eq!(Deadline::current(), Deadline::never(), "only inside the scope");
    }

    #[test]
    fn the_lambda_deadline_keeps_a_reserve_for_answering() {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64;
        let left = Deadline::from_epoch_millis(now_ms + 10_000).remaining().expect("a deadline");
        assert!(left <= Duration::from_millis(9_000) && left > Duration::from_millis(8_000), "{left:?}");
        assert_eq!(Deadline::from_epoch_millis(now_ms - 5).remaining(), Some(Duration::ZERO));
        assert_eq!(Deadline::never().remaining(), None);
    }
}
