use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::adapters::dynamodb::DynamoCounters;

const MINUTE_MS: u64 = 60_000;
/// 2024-01-01T00:00:00Z: a window boundary for any window dividing a day.
const T0: u64 = 1_704_067_200_000;

fn three_a_minute() -> Limit {
    Limit::per_minute(3).expect("a limit")
}

#[test]
fn zero_means_no_limit_and_a_window_is_whole_seconds() {
    assert_eq!(Limit::per_minute(0), None);
    let limit = Limit::new(5, Duration::from_millis(10)).expect("a limit");
    assert_eq!(limit.window(), Duration::from_secs(1));
    assert_eq!(limit.max(), 5);
}

#[test]
fn the_limit_is_read_from_the_environment() {
    let vars = |value: Option<&'static str>| move |_: &str| value.map(str::to_owned);
    let name = "ORDERS_PER_CUSTOMER_PER_MINUTE";
    assert_eq!(Limit::per_minute_from_vars(&vars(None), name).expect("unset"), None);
    assert_eq!(Limit::per_minute_from_vars(&vars(Some("0")), name).expect("zero"), None);
    assert_eq!(Limit::per_minute_from_vars(&vars(Some(" 30 ")), name).expect("30"), Limit::per_minute(30));
    for bad in ["-1", "abc", "1.5", "99999999999999999999999"] {
        let err = Limit::per_minute_from_vars(&vars(Some(bad)), name).expect_err(bad);
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn a_time_falls_in_one_fixed_window() {
    let limit = three_a_minute();
    assert_eq!(limit.window_at(T0), (T0 / 1000, 0));
    assert_eq!(limit.window_at(T0 + 61_500), (T0 / 1000 + 60, 1_500));
    assert_eq!(limit.window_at(T0 + MINUTE_MS - 1), (T0 / 1000, MINUTE_MS - 1));
}

#[test]
fn the_last_window_weighs_by_how_much_of_it_is_still_inside_the_sliding_window() {
    let limit = three_a_minute();
    // Given nothing in the last window: this window's own count decides
    assert!(limit.admits(0, 3, 0));
    assert!(!limit.admits(0, 4, 59_999));
    // Given 3 in the last window: at the boundary they all weigh, so nothing more fits
    assert!(!limit.admits(3, 1, 0));
    // a third of the way in, two thirds of them weigh: 2 + 1 = 3 fits, exactly at 20 s
    assert!(!limit.admits(3, 1, 19_999));
    assert!(limit.admits(3, 1, 20_000));
    // and at the window's end they no longer weigh at all
    assert!(limit.admits(3, 3, MINUTE_MS));
    assert!(limit.admits(u64::MAX, 3, MINUTE_MS), "no overflow");
    assert!(!limit.admits(u64::MAX, 1, 0), "no overflow");
}

#[test]
fn retry_after_is_when_one_more_fits() {
    let limit = three_a_minute();
    // This window is full: the next one, once this window's 3 weigh only 2
    assert_eq!(limit.retry_after(0, 3, 10_000), Duration::from_secs(50 + 20));
    // The last window's 3 weigh too much now; 2 fit from 20 s in
    assert_eq!(limit.retry_after(3, 0, 5_000), Duration::from_secs(15));
    // Rounded up to whole seconds
    assert_eq!(limit.retry_after(3, 0, 5_500), Duration::from_secs(15));
    assert_eq!(limit.retry_after(3, 0, 5_001), Duration::from_secs(15));
    // One a minute, used: the whole next window must pass
    let one = Limit::per_minute(1).expect("a limit");
    assert_eq!(one.retry_after(0, 1, 0), Duration::from_secs(120));
    // Never less than a second, even when a request already fits
    assert_eq!(limit.retry_after(0, 0, 0), Duration::from_secs(1));
}

/// Whether one more request fits `wait_ms` from now, nothing else arriving meanwhile.
fn fits_after(limit: &Limit, previous: u64, admitted: u64, elapsed: u64, wait_ms: u64) -> bool {
    let window = limit.window_ms;
    let at = elapsed + wait_ms;
    if at < window {
        limit.admits(previous, admitted + 1, at)
    } else if at < 2 * window {
        limit.admits(admitted, 1, at - window)
    } else {
        true
    }
}

#[test]
fn retry_after_is_the_first_whole_second_from_which_a_request_fits() {
    for max in 1..=5 {
        let limit = Limit::per_minute(max).expect("a limit");
        for previous in 0..=max + 1 {
            for admitted in 0..=max + 1 {
                for elapsed in (0..MINUTE_MS).step_by(3_700) {
                    let wait = limit.retry_after(previous, admitted, elapsed);
                    let wait_ms = u64::try_from(wait.as_millis()).expect("ms");
                    let case = format!("max {max}, previous {previous}, admitted {admitted}, at {elapsed} ms");
                    assert!(fits_after(&limit, previous, admitted, elapsed, wait_ms), "{case}: {wait:?} too soon");
                    if wait_ms > 1_000 {
                        let sooner = wait_ms - 1_000;
                        assert!(!fits_after(&limit, previous, admitted, elapsed, sooner), "{case}: {wait:?} too late");
                    }
                }
            }
        }
    }
}

fn limiter(clock: &Arc<FakeClock>) -> RateLimiter<InMemoryCounters> {
    RateLimiter::new(InMemoryCounters::new(), three_a_minute()).with_clock(clock.clone())
}

fn refused_for(admission: Admission) -> Duration {
    match admission {
        Admission::Refused { retry_after } => retry_after,
        Admission::Admitted(slot) => panic!("admitted: {slot:?}"),
    }
}

#[tokio::test]
async fn a_key_over_its_limit_is_refused_until_its_window_slides_on() {
    // Given a limit of 3 a minute, 10 s into a window
    let clock = FakeClock::at_ms(T0 + 10_000);
    let limiter = limiter(&clock);

    // When a customer makes 3 requests, then a fourth
    for _ in 0..3 {
        assert!(matches!(limiter.acquire("c-1").await, Ok(Admission::Admitted(_))));
    }
    let retry_after = refused_for(limiter.acquire("c-1").await.expect("counted"));

    // Then the fourth is refused until 20 s into the next window, and its count was given back
    assert_eq!(retry_after, Duration::from_secs(70));
    assert_eq!(limiter.counters().value("c-1", T0 / 1000), 3);
    // And another customer is not affected
    assert!(matches!(limiter.acquire("c-2").await, Ok(Admission::Admitted(_))));

    // When the time it was told has passed (just before it, still refused)
    clock.advance(Duration::from_secs(69));
    refused_for(limiter.acquire("c-1").await.expect("counted"));
    clock.advance(Duration::from_secs(1));
    // Then one more is admitted, in the next window
    assert!(matches!(limiter.acquire("c-1").await, Ok(Admission::Admitted(_))));
    assert_eq!(limiter.counters().value("c-1", T0 / 1000 + 60), 1);
}

#[tokio::test]
async fn a_released_slot_is_free_again() {
    // Given a customer at their limit
    let clock = FakeClock::at_ms(T0);
    let limiter = limiter(&clock);
    let mut slots = Vec::new();
    for _ in 0..3 {
        match limiter.acquire("c-1").await.expect("counted") {
            Admission::Admitted(slot) => slots.push(slot),
            refused => panic!("{refused:?}"),
        }
    }
    refused_for(limiter.acquire("c-1").await.expect("counted"));

    // When one admitted request turns out to have done nothing, and gives its slot back
    limiter.release(slots.remove(0)).await;

    // Then the next request fits
    assert!(matches!(limiter.acquire("c-1").await, Ok(Admission::Admitted(_))));
}

#[tokio::test]
async fn concurrent_requests_never_get_past_the_limit() {
    // Given a limit of 3 a minute
    let clock = FakeClock::at_ms(T0 + 30_000);
    let limiter = limiter(&clock);

    // When 50 requests of one customer arrive at once
    let all = futures::future::join_all((0..50).map(|_| limiter.acquire("c-1"))).await;

    // Then exactly 3 are admitted, and the counter holds only those
    let admitted = all.iter().filter(|a| matches!(a, Ok(Admission::Admitted(_)))).count();
    assert_eq!(admitted, 3);
    assert_eq!(limiter.counters().value("c-1", T0 / 1000), 3);
}

#[tokio::test]
async fn unreachable_counters_are_an_error_for_the_caller_to_judge() {
    // Given counters that cannot be reached
    let clock = FakeClock::at_ms(T0);
    let limiter = limiter(&clock);
    limiter.counters().fail(true);

    // When a request is counted, then the limiter says so rather than deciding
    let err = limiter.acquire("c-1").await.expect_err("unreachable");
    assert!(err.to_string().contains("unreachable"), "{err}");
}

#[test]
fn a_counter_item_is_keyed_by_customer_and_window() {
    assert_eq!(DynamoCounters::item_key("c-1", 1_704_067_200), "RATE#c-1#1704067200");
}
