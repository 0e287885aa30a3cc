use super::*;
use crate::ratelimit::{FakeClock, InMemoryCounters};

fn policy() -> BreakerPolicy {
    BreakerPolicy {
        threshold: 3,
        window: Duration::from_secs(10),
        recovery: Duration::from_secs(5),
        cache: Duration::ZERO,
        probe_lease: Duration::from_secs(2),
    }
}

fn breaker(clock: &Arc<FakeClock>) -> CircuitBreaker<MemoryBreakerStore, InMemoryCounters> {
    CircuitBreaker::new("payment", policy(), MemoryBreakerStore::default(), InMemoryCounters::new())
        .with_clock(clock.clone())
}

async fn fail(breaker: &CircuitBreaker<MemoryBreakerStore, InMemoryCounters>) {
    let Admission::Call(permit) = breaker.admit().await else { panic!("refused while closed") };
    breaker.record(permit, Outcome::Failed).await;
}

#[test]
fn the_sliding_window_weighs_the_last_window_by_what_is_left_of_it() {
    let policy = policy();
    assert!(!policy.trips(0, 2, 0));
    assert!(policy.trips(0, 3, 9_999));
    // Half-way into this window, 4 of the last window's failures count as 2.
    assert!(policy.trips(4, 1, 5_000));
    assert!(!policy.trips(4, 0, 5_000));
    assert!(!policy.trips(10, 0, 10_000));
}

#[tokio::test]
async fn failures_at_the_threshold_open_the_breaker_and_calls_are_refused_until_recovery() {
    // Given a closed breaker
    let clock = FakeClock::at_ms(1_000_000);
    let breaker = breaker(&clock);
    // When three calls fail
    for _ in 0..3 {
        fail(&breaker).await;
    }
    // Then it is open, and the next call is refused with the time left until recovery
    assert_eq!(breaker.store().read("payment").await.unwrap().state, State::Open);
    assert_eq!(breaker.admit().await, Admission::Refuse { retry_after: Duration::from_secs(5) });
    clock.advance(Duration::from_secs(4));
    assert!(matches!(breaker.admit().await, Admission::Refuse { .. }));
}

#[tokio::test]
async fn answers_do_not_count_as_failures() {
    let clock = FakeClock::at_ms(1_000_000);
    let breaker = breaker(&clock);
    for _ in 0..10 {
        let Admission::Call(permit) = breaker.admit().await else { panic!("refused") };
        breaker.record(permit, Outcome::Answered).await;
    }
    fail(&breaker).await;
    fail(&breaker).await;
    assert_eq!(breaker.store().read("payment").await.unwrap().state, State::Closed);
}

#[tokio::test]
async fn after_recovery_one_probe_goes_through_and_its_answer_closes_the_breaker() {
    // Given an open breaker whose recovery time has passed
    let clock = FakeClock::at_ms(1_000_000);
    let breaker = breaker(&clock);
    for _ in 0..3 {
        fail(&breaker).await;
    }
    clock.advance(Duration::from_secs(5));
    // When two callers arrive: the first is the probe, the second is refused
    let Admission::Call(probe) = breaker.admit().await else { panic!("no probe") };
    assert!(probe.is_probe());
    assert!(matches!(breaker.admit().await, Admission::Refuse { .. }));
    // And the probe is answered
    breaker.record(probe, Outcome::Answered).await;
    // Then the breaker is closed, calls go through, and the old failures no longer count
    assert!(matches!(breaker.admit().await, Admission::Call(p) if !p.is_probe()));
    fail(&breaker).await;
    fail(&breaker).await;
    assert_eq!(breaker.store().read("payment").await.unwrap().state, State::Closed);
    let history: Vec<_> = breaker.history(10).await.unwrap().into_iter().map(|t| (t.from, t.to)).collect();
    assert_eq!(
        history,
        [(State::Closed, State::Open), (State::Open, State::HalfOpen), (State::HalfOpen, State::Closed)]
    );
}

#[tokio::test]
async fn a_failed_probe_opens_the_breaker_for_another_recovery_time() {
    let clock = FakeClock::at_ms(1_000_000);
    let breaker = breaker(&clock);
    for _ in 0..3 {
        fail(&breaker).await;
    }
    clock.advance(Duration::from_secs(6));
    let Admission::Call(probe) = breaker.admit().await else { panic!("no probe") };
    breaker.record(probe, Outcome::Failed).await;
    let state = breaker.store().read("payment").await.unwrap();
    assert_eq!((state.state, state.version), (State::Open, 3));
    assert_eq!(breaker.admit().await, Admission::Refuse { retry_after: Duration::from_secs(5) });
}

#[tokio::test]
async fn a_probe_that_never_reports_is_taken_over_after_its_lease() {
    let clock = FakeClock::at_ms(1_000_000);
    let breaker = breaker(&clock);
    for _ in 0..3 {
        fail(&breaker).await;
    }
    clock.advance(Duration::from_secs(5));
    let Admission::Call(lost) = breaker.admit().await else { panic!("no probe") };
    assert!(lost.is_probe());
    // Its instance died: after the lease, the next caller probes instead.
    clock.advance(Duration::from_secs(2));
    let Admission::Call(probe) = breaker.admit().await else { panic!("the stale probe was not taken over") };
    assert!(probe.is_probe());
    breaker.record(probe, Outcome::Answered).await;
    assert_eq!(breaker.store().read("payment").await.unwrap().state, State::Closed);
}

#[tokio::test]
async fn an_unreadable_failure_count_lets_calls_through() {
    let clock = FakeClock::at_ms(1_000_000);
    let breaker = breaker(&clock);
    breaker.failures.fail(true);
    for _ in 0..5 {
        fail(&breaker).await;
    }
    assert_eq!(breaker.store().read("payment").await.unwrap().state, State::Closed);
}

#[test]
fn the_policy_comes_from_the_environment_and_a_zero_threshold_turns_it_off() {
    let vars = |name: &str| match name {
        "BREAKER_FAILURE_THRESHOLD" => Some("4".to_owned()),
        "BREAKER_RECOVERY_SECONDS" => Some("7".to_owned()),
        _ => None,
    };
    let policy = BreakerPolicy::from_vars(&vars).unwrap().expect("a breaker");
    assert_eq!(
        (policy.threshold, policy.recovery, policy.window),
        (4, Duration::from_secs(7), Duration::from_secs(60))
    );
    let off = |name: &str| (name == "BREAKER_FAILURE_THRESHOLD").then(|| "0".to_owned());
    assert_eq!(BreakerPolicy::from_vars(&off).unwrap(), None);
    let bad = |name: &str| (name == "BREAKER_WINDOW_SECONDS").then(|| "soon".to_owned());
    assert!(BreakerPolicy::from_vars(&bad).is_err());
}
