//! Resilience against a failing payment provider, measured: the outage scenario twice in one run,
//! with the patterns on and with them off, side by side; then a slow and a flaky gateway with
//! the patterns on.
//!
//! Each side is the whole system on a fresh stack of its own (`SagaEnv::start_with_parameters`:
//! its own tables, state machine and provider simulator), so one side's breaker, parked orders
//! and ledger cannot touch the other's:
//!
//! - patterns on: `local_env::scenario::PATTERNS_ON`, the chaos test's (breaker opening after
//!   3 failures in 10 s, probing after 4 s; parked payments, retried every 2 s, for up to 10
//!   minutes; hedged requests);
//! - patterns off: `BreakerFailureThreshold=0`, `PaymentParkingLimitSeconds=0`,
//!   `ProviderHedging=off` (timeouts and the state machine's retries stay).
//!
//! The scenario (`local_env::scenario`, which `local-env run --scenario outage` replays too): a
//! burst of happy-path orders placed as the payment gateway goes down (503s) for a window. The
//! figures: orders completed, cancelled, flagged for manual action, not terminal; orders charged
//! twice and refunds made, from the simulator's ledger; when each order ended, measured from the
//! outage's end; provider calls per operation (the ledger's `calls`); breaker transitions.
//! Then the slow gateway (charges with a p50 300 ms / p99 2.5 s tail) and the flaky one (30% of
//! charges fail), patterns on: outcomes and placed → finished p50/p99.
//!
//!     scripts/env.sh up && cargo bench -p system-tests --bench resilience [-- --orders 40 --outage-seconds 30]
//!
//! The functions run as the dev binaries `cargo test` builds (`--release`: release ones): what is
//! measured is the patterns' effect (outcomes, calls, waiting for the breaker and the parked
//! orders' retries), which binary speed barely moves.
//!
//! Under `cargo test` (no `--bench` argument) it runs at smoke size (6 orders, a 10 s outage;
//! 4 orders each for the slow and flaky gateways, the stacks started side by side) and checks
//! that with the patterns on every order completes, charged once, the breaker having opened
//! and closed; with them off, that no order is charged twice or left unfinished.

use std::time::Instant;

use local_env::scenario::{self, PATTERNS_OFF, PATTERNS_ON, Report, Scenario};
use system_tests::saga::SagaEnv;
use system_tests::workspace_root;

fn target(env: &SagaEnv) -> scenario::Target<'_> {
    scenario::Target {
        stack: &env.stack,
        api: Some(env.demo_api()),
        dynamodb: env.aws.dynamodb(),
        sfn: env.sfn.clone(),
        simulator: env.providers.as_ref().expect("the stack's provider simulator").addr(),
        samples: workspace_root().join("events/place-order"),
    }
}

/// Starts a fresh stack with `parameters`, plays `scenarios` on it one after the other, stops it.
async fn side(parameters: &[(&str, &str)], label: &str, scenarios: &[Scenario]) -> Vec<Report> {
    let env = SagaEnv::start_with_parameters(parameters).await;
    let mut reports = Vec::new();
    for s in scenarios {
        let report = scenario::run(&target(&env), s, label).await.expect("the scenario runs");
        reports.push(report);
    }
    env.stop().await;
    reports
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|a| a == "--bench");
    if args.iter().any(|a| a == "--release") {
        system_tests::use_release_binaries();
    }
    let orders = arg(&args, "--orders").unwrap_or(if benching { 40 } else { 6 });
    let outage_seconds = arg(&args, "--outage-seconds").unwrap_or(if benching { 30.0 } else { 10.0 });
    let others = if benching { orders / 2 } else { 4 };
    let outage = Scenario::outage(orders, outage_seconds);
    let (slow, flaky) = (Scenario::slow(others), Scenario::flaky(others));
    let started = Instant::now();

    // Given the system twice, patterns on and off, each on its own stack: measuring, one after
    // the other (neither slows the other); as a smoke test, side by side (CI's time budget).
    let (on_scenarios, off_scenarios) = ([outage, slow, flaky], [outage]);
    let (on, off) = if benching {
        let on = side(PATTERNS_ON, "patterns on", &on_scenarios).await;
        let off = side(PATTERNS_OFF, "patterns off", &off_scenarios).await;
        (on, off)
    } else {
        tokio::join!(
            side(PATTERNS_ON, "patterns on", &on_scenarios),
            side(PATTERNS_OFF, "patterns off", &off_scenarios)
        )
    };
    let (outage_on, outage_off) = (&on[0], &off[0]);
    let (slow_on, flaky_on) = (&on[1], &on[2]);

    // Then the figures, side by side
    let title = format!("\nPayment gateway outage: {} ({:.0?} in all)", outage.describe(), started.elapsed());
    println!("{}", scenario::table(&title, &[outage_on, outage_off]));
    let mut slow_col = slow_on.clone();
    slow_col.label = "slow, on".into();
    let mut flaky_col = flaky_on.clone();
    flaky_col.label = "flaky, on".into();
    let title = format!("\nSlow gateway ({}) and flaky gateway ({})", slow.describe(), flaky.describe());
    println!("{}", scenario::table(&title, &[&slow_col, &flaky_col]));
    for report in [outage_on, slow_on, flaky_on, outage_off] {
        for problem in report.problems() {
            println!("  {} {}: {problem}", report.label, report.scenario.name());
        }
    }

    // And with the patterns on no order is lost, charged twice, cancelled or flagged, the breaker
    // having opened and closed; with them off, no order is charged twice or left unfinished.
    assert!(outage_on.ok(), "patterns on, outage: {:?}", outage_on.problems());
    assert!(outage_on.breaker_opened_and_closed(), "patterns on: breaker {:?}", outage_on.breaker);
    for report in [slow_on, flaky_on] {
        assert!(report.ok(), "patterns on, {}: {:?}", report.scenario.name(), report.problems());
    }
    assert_eq!(outage_off.charged_twice(), 0, "patterns off: {:?}", outage_off.problems());
    assert_eq!(outage_off.not_terminal(), 0, "patterns off: {:?}", outage_off.problems());
}
