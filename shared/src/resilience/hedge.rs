//! Hedged requests: when a request is slower than nearly every recent one, a second, identical
//! request is sent, and the first answer wins; the other request is dropped (cancelled: its
//! connection closed). Only for calls that are safe to repeat: every provider call carries its
//! idempotency key, so the provider acts once whichever request it sees first (the ledger of
//! the provider simulator shows it).
//!
//! The hedge is sent after the operation's recent p95 ([`Hedging::delay`]), at least
//! [`MIN_DELAY`], and only once there are enough latencies to trust a p95 (so at most about one
//! call in twenty is hedged while the provider behaves as it did). `PROVIDER_HEDGING=off` turns
//! it off (read once per instance), for comparing with and without.

use std::future::Future;
use std::time::Duration;

use futures::future::{Either, select};

use super::timeout::Recent;

/// The shortest wait before a hedge, however fast the provider has been: below it, a hedge
/// would double the load for little gain.
pub const MIN_DELAY: Duration = Duration::from_millis(50);

/// Whether, and after how long, a call is hedged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hedging {
    pub enabled: bool,
    pub min_delay: Duration,
}

impl Hedging {
    pub fn new(enabled: bool) -> Self {
        Self { enabled, min_delay: MIN_DELAY }
    }

    /// After how long a hedge is sent: the recent p95, at least `min_delay`; `None` (never)
    /// when off or without a trusted p95.
    pub fn delay(&self, recent: &Recent) -> Option<Duration> {
        self.enabled.then_some(recent.p95?.max(self.min_delay))
    }
}

/// The answer of a hedged call, and whether a second request was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hedged<R> {
    pub answer: R,
    pub hedged: bool,
}

/// Sends `request()`; if it has not answered after `delay` and `hedge()` admits a second request
/// (a permit it holds while that request runs; `None`: not sent), sends `request()` again. The
/// first success wins and the other request is dropped. A failure waits for the other request:
/// its answer, success or failure, is the call's (the later failure is the more recent news).
/// Bound the whole call with a timeout: it has none of its own.
pub async fn hedged<T, E, Fut, P>(
    delay: Option<Duration>,
    mut request: impl FnMut() -> Fut,
    hedge: impl FnOnce() -> Option<P>,
) -> Hedged<Result<T, E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let first = request();
    let Some(delay) = delay else { return Hedged { answer: first.await, hedged: false } };
    let mut first = std::pin::pin!(first);
    if let Ok(answer) = tokio::time::timeout(delay, &mut first).await {
        return Hedged { answer, hedged: false };
    }
    let Some(permit) = hedge() else { return Hedged { answer: first.await, hedged: false } };
    let second = request();
    let second = std::pin::pin!(async move {
        let answer = second.await;
        drop(permit);
        answer
    });
    let answer = match select(first, second).await {
        Either::Left((Ok(done), _)) | Either::Right((Ok(done), _)) => Ok(done),
        Either::Left((Err(_), other)) => other.await,
        Either::Right((Err(_), other)) => other.await,
    };
    Hedged { answer, hedged: true }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::time::Instant;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Requests that answer after the given latencies in turn, with their number (1, 2), or
    /// fail with it when the latency is odd; each counts as cancelled if dropped unfinished.
    struct Requests {
        latencies: Mutex<Vec<Duration>>,
        sent: AtomicUsize,
        cancelled: AtomicUsize,
    }

    struct Unfinished<'a>(&'a AtomicUsize, bool);

    impl Drop for Unfinished<'_> {
        fn drop(&mut self) {
            if !self.1 {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    impl Requests {
        fn new(latencies_ms: &[u64]) -> Self {
            let latencies = latencies_ms.iter().rev().map(|ms| Duration::from_millis(*ms)).collect();
            Self { latencies: Mutex::new(latencies), sent: AtomicUsize::new(0), cancelled: AtomicUsize::new(0) }
        }

        fn request(&self) -> impl Future<Output = Result<usize, usize>> + '_ {
            let n = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
            let latency = self.latencies.lock().expect("lock").pop().expect("a latency");
            async move {
                let mut unfinished = Unfinished(&self.cancelled, false);
                tokio::time::sleep(latency).await;
                unfinished.1 = true;
                if latency.as_millis() % 2 == 1 { Err(n) } else { Ok(n) }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_before_the_delay_is_not_hedged() {
        let requests = Requests::new(&[40]);
        let began = Instant::now();
        let call = hedged(Some(100 * MS), || requests.request(), || Some(())).await;
        assert_eq!(call, Hedged { answer: Ok(1), hedged: false });
        assert_eq!((began.elapsed(), requests.sent.load(Ordering::SeqCst)), (40 * MS, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_request_is_hedged_and_the_first_answer_wins() {
        // The first request would take 800 ms; the hedge, sent at 100 ms, answers in 20
        let requests = Requests::new(&[800, 20]);
        let began = Instant::now();
        let call = hedged(Some(100 * MS), || requests.request(), || Some(())).await;
        assert_eq!(call, Hedged { answer: Ok(2), hedged: true });
        assert_eq!(began.elapsed(), 120 * MS);
        // and the slow one was cancelled
        assert_eq!((requests.sent.load(Ordering::SeqCst), requests.cancelled.load(Ordering::SeqCst)), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn when_the_first_request_answers_first_the_hedge_is_cancelled() {
        let requests = Requests::new(&[150, 400]);
        let call = hedged(Some(100 * MS), || requests.request(), || Some(())).await;
        assert_eq!(call, Hedged { answer: Ok(1), hedged: true });
        assert_eq!(requests.cancelled.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_waits_for_the_other_request() {
        // The first fails at 151 ms, after the hedge was sent; the hedge answers at 300 ms
        let requests = Requests::new(&[151, 200]);
        let began = Instant::now();
        let call = hedged(Some(100 * MS), || requests.request(), || Some(())).await;
        assert_eq!((call.answer, began.elapsed()), (Ok(2), 300 * MS));
        // Both fail: the later failure is the answer
        let requests = Requests::new(&[151, 201]);
        assert_eq!(hedged(Some(100 * MS), || requests.request(), || Some(())).await.answer, Err(2));
        // A failure before the delay is the answer at once: no hedge
        let requests = Requests::new(&[51]);
        assert_eq!(
            hedged(Some(100 * MS), || requests.request(), || Some(())).await,
            Hedged { answer: Err(1), hedged: false }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_delay_or_a_permit_no_hedge_is_sent() {
        let requests = Requests::new(&[800]);
        assert_eq!(hedged(None, || requests.request(), || Some(())).await, Hedged { answer: Ok(1), hedged: false });
        let requests = Requests::new(&[800]);
        let asked = AtomicUsize::new(0);
        let no_permit = || {
            asked.fetch_add(1, Ordering::SeqCst);
            None::<()>
        };
        let began = Instant::now();
        let call = hedged(Some(100 * MS), || requests.request(), no_permit).await;
        assert_eq!((call, began.elapsed()), (Hedged { answer: Ok(1), hedged: false }, 800 * MS));
        assert_eq!((asked.load(Ordering::SeqCst), requests.sent.load(Ordering::SeqCst)), (1, 1));
    }

    #[test]
    fn the_delay_is_the_recent_p95_bounded_below_and_only_when_trusted() {
        let recent = |p95_ms: Option<u64>| Recent { samples: 100, p95: p95_ms.map(Duration::from_millis), p99: None };
        let on = Hedging::new(true);
        assert_eq!(on.delay(&recent(Some(180))), Some(180 * MS));
        assert_eq!(on.delay(&recent(Some(12))), Some(MIN_DELAY));
        assert_eq!(on.delay(&recent(None)), None);
        assert_eq!(Hedging::new(false).delay(&recent(Some(180))), None);
    }
}
