//! The bulkhead: at most `PROVIDER_MAX_CONCURRENCY` requests to one provider in flight per
//! instance (hedges included), so a provider that slows down holds a bounded share of the
//! instance, and the calls beyond fail at once as unavailable, never sent, instead of queueing
//! behind it. Across instances, each provider's step functions have their own event source
//! mapping `MaximumConcurrency` (`PaymentMaximumConcurrency`, `CarrierMaximumConcurrency`,
//! `NotifierMaximumConcurrency` in `template.yaml`): a slow carrier cannot take payments' share.

use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

/// Requests in flight per provider and instance unless `PROVIDER_MAX_CONCURRENCY` says otherwise.
pub const DEFAULT_MAX_CONCURRENCY: usize = 16;
/// How long a call waits for a permit before it fails: short, a queue would only add latency.
pub const WAIT: Duration = Duration::from_millis(20);

#[derive(Debug)]
pub struct Bulkhead {
    permits: Semaphore,
    size: usize,
    wait: Duration,
}

impl Bulkhead {
    /// `size` requests at once (at least 1); a call waits at most `wait` for its turn.
    pub fn new(size: usize, wait: Duration) -> Self {
        let size = size.max(1);
        Self { permits: Semaphore::new(size), size, wait }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// A permit for one request, if one frees within the wait.
    pub async fn enter(&self) -> Option<SemaphorePermit<'_>> {
        if let Some(permit) = self.try_enter() {
            return Some(permit);
        }
        tokio::time::timeout(self.wait, self.permits.acquire()).await.ok()?.ok()
    }

    /// A permit for one request if one is free now (a hedge: never waited for).
    pub fn try_enter(&self) -> Option<SemaphorePermit<'_>> {
        self.permits.try_acquire().ok()
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.size - self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_bulkhead_refuses_after_a_short_wait() {
        let bulkhead = Bulkhead::new(2, WAIT);
        let (a, b) = (bulkhead.enter().await, bulkhead.enter().await);
        assert!(a.is_some() && b.is_some());
        assert_eq!(bulkhead.in_flight(), 2);
        // Full: refused after the wait, and a hedge is refused at once
        let began = Instant::now();
        assert!(bulkhead.enter().await.is_none());
        assert_eq!(began.elapsed(), WAIT);
        assert!(bulkhead.try_enter().is_none());
        // A permit freed: the next call gets it
        drop(a);
        assert!(bulkhead.try_enter().is_some());
        assert_eq!(bulkhead.in_flight(), 1, "the hedge's permit was given back when dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_permit_freed_within_the_wait_is_taken() {
        let bulkhead = Bulkhead::new(1, WAIT);
        let held = bulkhead.enter().await;
        let release = async {
            tokio::time::sleep(WAIT / 2).await;
            drop(held);
        };
        let (entered, ()) = tokio::join!(bulkhead.enter(), release);
        assert!(entered.is_some());
        assert_eq!(Bulkhead::new(0, WAIT).size(), 1);
    }
}
