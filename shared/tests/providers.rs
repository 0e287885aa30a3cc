//! The providers' HTTP clients against a real provider simulator (each test its own, on a free
//! port): hedged requests against a slow tail, the bulkhead against a slow provider, and the
//! timeout within the invocation's deadline; a rotated API key fetched again. The simulator's ledger is the ground truth: what
//! the provider received and what it did.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use provider_simulator::{Config, Simulator, serve};
use serde_json::{Value, json};
use shared::adapters::providers::{Credentials, HttpPaymentGateway, KeyFetch, Provider};
use shared::deadline::Deadline;
use shared::domain::money::{Currency, Money};
use shared::domain::services::{ChargeOutcome, PaymentGateway, Unavailable, Why};

async fn simulator() -> Simulator {
    serve(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), Config::default()).await.expect("the simulator starts")
}

/// A gateway at `sim`, configured by `vars` besides its URL.
fn gateway(sim: &Simulator, vars: &[(&str, &str)]) -> HttpPaymentGateway {
    let url = sim.url();
    let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let lookup = move |name: &str| match name {
        "PAYMENT_PROVIDER_URL" => Some(url.clone()),
        _ => vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
    };
    HttpPaymentGateway(Provider::from_vars("payment gateway", "PAYMENT_PROVIDER_URL", None, &lookup).expect("config"))
}

async fn behave(sim: &Simulator, behaviour: Value) {
    let response = reqwest::Client::new()
        .put(format!("{}/control/behaviour", sim.url()))
        .json(&behaviour)
        .send()
        .await
        .expect("control call");
    assert!(response.status().is_success(), "{}", response.text().await.unwrap_or_default());
}

async fn ledger(sim: &Simulator, contains: &str) -> Value {
    let url = format!("{}/control/ledger?contains={contains}", sim.url());
    reqwest::get(url).await.expect("ledger").json().await.expect("a ledger")
}

fn amount() -> Money {
    Money::new(4_499, Currency::EUR)
}

/// The value at `q` of sorted durations, in whole milliseconds.
fn percentile(sorted: &[Duration], q: f64) -> u128 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_millis()
}

struct Run {
    charged: usize,
    failed: Vec<Unavailable>,
    latencies: Vec<Duration>,
}

/// `n` charges with distinct keys `<prefix>-<i>`, `at_once` at a time.
async fn charges(gateway: &HttpPaymentGateway, prefix: &str, n: usize, at_once: usize) -> Run {
    let results: Vec<(Result<ChargeOutcome, Unavailable>, Duration)> = stream::iter(0..n)
        .map(|i| async move {
            let started = Instant::now();
            let result = gateway.charge(&format!("{prefix}-{i}"), amount(), "tok_visa").await;
            (result, started.elapsed())
        })
        .buffer_unordered(at_once)
        .collect()
        .await;
    let mut run = Run { charged: 0, failed: Vec::new(), latencies: Vec::new() };
    for (result, took) in results {
        match result {
            Ok(ChargeOutcome::Charged { .. }) => run.charged += 1,
            Ok(other) => panic!("unexpected answer {other:?}"),
            Err(e) => run.failed.push(e),
        }
        run.latencies.push(took);
    }
    run.latencies.sort();
    run
}

/// The ledger's charges for `prefix`: the calls the provider received, and its effects, each key
/// at most once.
async fn charged_keys(sim: &Simulator, prefix: &str) -> (u64, HashSet<String>) {
    let ledger = ledger(sim, &format!("{prefix}-")).await;
    let entries = ledger["entries"].as_array().expect("entries");
    let keys: HashSet<String> =
        entries.iter().map(|e| e["idempotencyKey"].as_str().expect("a key").to_owned()).collect();
    assert_eq!(keys.len(), entries.len(), "{prefix}: a key charged more than once");
    (ledger["calls"]["charge"].as_u64().expect("calls"), keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_charges_cut_a_slow_tail_and_charge_every_key_once() {
    // Given a gateway whose charges take 20 ms at the median and 800 ms at the 99th percentile
    let sim = simulator().await;
    behave(&sim, json!({"service": "payments", "operation": "charge", "latencyMs": {"p50": 20, "p99": 800}})).await;
    const N: usize = 300;

    // When 300 charges with distinct keys go through a hedging client, 8 at a time
    let hedging = gateway(&sim, &[]);
    let on = charges(&hedging, "hedged", N, 8).await;

    // Then every charge succeeded, the provider received more calls than charges (hedges),
    // and its ledger has every key charged exactly once
    assert!(on.failed.is_empty(), "{:?}", on.failed);
    assert_eq!(on.charged, N);
    let (calls, keys) = charged_keys(&sim, "hedged").await;
    assert_eq!(keys, (0..N).map(|i| format!("hedged-{i}")).collect::<HashSet<_>>());
    assert!(calls > N as u64, "no hedge was sent: {calls} calls for {N} charges");

    // And without hedging (PROVIDER_HEDGING=off), one call per charge: the figures side by side
    let plain = gateway(&sim, &[("PROVIDER_HEDGING", "off")]);
    let off = charges(&plain, "plain", N, 8).await;
    let (plain_calls, plain_keys) = charged_keys(&sim, "plain").await;
    assert_eq!(plain_calls, N as u64, "a call without hedging is one request");
    // (A call given up at its timeout may or may not have been charged: the ledger says.)
    assert!(plain_keys.len() >= off.charged, "every charge answered was charged once");
    for (name, run, calls) in [("hedging on ", &on, calls), ("hedging off", &off, plain_calls)] {
        println!(
            "{name}: {} charges, {calls} calls at the provider ({} hedges), {} failed; p50 {} ms, p95 {} ms, p99 {} ms, max {} ms",
            run.charged,
            calls.saturating_sub(N as u64),
            run.failed.len(),
            percentile(&run.latencies, 0.5),
            percentile(&run.latencies, 0.95),
            percentile(&run.latencies, 0.99),
            percentile(&run.latencies, 1.0),
        );
        for e in &run.failed {
            println!("  failed: {:?}: {}", e.why, e.message);
        }
    }
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_bulkhead_fail_fast_without_reaching_the_provider() {
    // Given a gateway that takes 500 ms per charge, and a client admitting 4 requests at once
    let sim = simulator().await;
    behave(&sim, json!({"service": "payments", "latencyMs": {"p50": 500, "p99": 500}})).await;
    let gateway = gateway(&sim, &[("PROVIDER_MAX_CONCURRENCY", "4")]);

    // When 12 charges are made at once
    let calls = (0..12).map(|i| {
        let gateway = &gateway;
        async move {
            let started = Instant::now();
            let result = gateway.charge(&format!("bulkhead-{i}"), amount(), "tok_visa").await;
            (result, started.elapsed())
        }
    });
    let results = futures::future::join_all(calls).await;

    // Then 4 were charged, after the provider's 500 ms
    let charged: Vec<_> = results.iter().filter(|(r, _)| matches!(r, Ok(ChargeOutcome::Charged { .. }))).collect();
    assert_eq!(charged.len(), 4, "{results:?}");
    assert!(charged.iter().all(|(_, took)| *took >= Duration::from_millis(490)), "{results:?}");
    // and the other 8 failed at once as BulkheadFull: not called, so safe to defer
    let refused: Vec<_> = results.iter().filter_map(|(r, took)| r.as_ref().err().map(|e| (e, took))).collect();
    assert_eq!(refused.len(), 8);
    for (e, took) in &refused {
        assert_eq!(e.why, Why::BulkheadFull, "{e}");
        assert!(e.not_called());
        assert!(**took < Duration::from_millis(200), "refused after {took:?}");
    }
    // and the provider received only the 4: never more than 4 in flight
    let (calls, keys) = charged_keys(&sim, "bulkhead").await;
    assert_eq!((calls, keys.len()), (4, 4));

    // And once those are done, the permits are free again
    let again = gateway.charge("bulkhead-again", amount(), "tok_visa").await;
    assert!(matches!(again, Ok(ChargeOutcome::Charged { .. })), "{again:?}");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_cannot_answer_before_the_invocation_s_deadline_times_out_before_it() {
    // Given a gateway that stalls, and a client whose ceiling is 3 s
    let sim = simulator().await;
    behave(&sim, json!({"service": "payments", "outage": {"seconds": 30, "mode": "timeout"}})).await;
    let gateway = gateway(&sim, &[("PROVIDER_TIMEOUT_MS", "3000")]);

    // When a charge is made with 1 s left to the invocation's deadline
    let started = Instant::now();
    let result = Deadline::after(Duration::from_secs(1)).scope(gateway.charge("late-1", amount(), "tok_visa")).await;
    let took = started.elapsed();

    // Then it timed out before the deadline, leaving time to record the outcome
    let e = result.expect_err("no answer");
    assert_eq!(e.why, Why::TimedOut, "{e}");
    assert!(took >= Duration::from_millis(700) && took < Duration::from_millis(950), "timed out after {took:?}");

    // And with no time left, it is not even sent
    let result =
        Deadline::after(Duration::from_millis(100)).scope(gateway.charge("late-2", amount(), "tok_visa")).await;
    assert_eq!(result.expect_err("no time").why, Why::NoTimeLeft);
    let (calls, _) = charged_keys(&sim, "late").await;
    assert_eq!(calls, 1);
    sim.stop().await;
}

#[tokio::test]
async fn a_rotated_api_key_is_fetched_again_on_a_401_and_the_refused_calls_made_once_more() {
    // Given a provider asking for key one, and a gateway holding key one, kept in a store
    let config = Config { api_key: Some("key-one".into()), ..Config::default() };
    let sim = serve(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await.expect("the simulator starts");
    let stored = Arc::new(Mutex::new("key-one".to_owned()));
    let fetches = Arc::new(AtomicUsize::new(0));
    let fetch: KeyFetch = {
        let (stored, fetches) = (stored.clone(), fetches.clone());
        Arc::new(move || {
            fetches.fetch_add(1, Ordering::SeqCst);
            let key = stored.lock().expect("store").clone();
            Box::pin(async move { Ok(Some(key)) })
        })
    };
    let HttpPaymentGateway(provider) = gateway(&sim, &[]);
    let gateway = HttpPaymentGateway(provider.with_credentials(Credentials::refetched(Some("key-one".into()), fetch)));
    assert!(matches!(gateway.charge("rot-0", amount(), "tok_visa").await, Ok(ChargeOutcome::Charged { .. })));

    // When the key is rotated, at the provider and in the store, and charges follow at once
    let rotate = |key: &str| {
        reqwest::Client::new().put(format!("{}/control/api-key", sim.url())).json(&json!({ "apiKey": key })).send()
    };
    assert!(rotate("key-two").await.expect("rotate").status().is_success());
    *stored.lock().expect("store") = "key-two".to_owned();
    let run = charges(&gateway, "rot-a", 5, 5).await;

    // Then every charge went through, the refused ones made once more, with one fetch between them
    assert_eq!((run.charged, run.failed.len()), (5, 0), "{:?}", run.failed);
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    let (calls, keys) = charged_keys(&sim, "rot-a").await;
    assert_eq!(keys.len(), 5);
    assert!((5..=10).contains(&calls), "{calls} calls");

    // And a key that stays wrong is a failure like any other, and is not fetched on every call
    // (at most once per KEY_REFETCH_INTERVAL)
    assert!(rotate("key-three").await.expect("rotate").status().is_success());
    for i in 0..3 {
        let failed = gateway.charge(&format!("rot-b-{i}"), amount(), "tok_visa").await.expect_err("refused");
        assert_eq!(failed.why, Why::Failed);
        assert!(failed.message.contains("401"), "{failed:?}");
    }
    assert!(fetches.load(Ordering::SeqCst) <= 2, "{fetches:?} fetches");
    sim.stop().await;
}

#[tokio::test]
async fn the_key_is_read_by_the_first_call_not_at_init_and_read_again_after_a_failed_read() {
    // Given a provider asking for a key, and a key store whose first read fails
    let config = Config { api_key: Some("the-key".into()), ..Config::default() };
    let sim = serve(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await.expect("the simulator starts");
    let reads = Arc::new(AtomicUsize::new(0));
    let fetch: KeyFetch = {
        let reads = reads.clone();
        Arc::new(move || {
            let n = reads.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 0 { Err(format!("read {n}: parameter store unreachable")) } else { Ok(Some("the-key".into())) }
            })
        })
    };

    // When the gateway is built (as in the init phase): nothing is read
    let HttpPaymentGateway(provider) = gateway(&sim, &[]);
    let gateway = HttpPaymentGateway(provider.with_credentials(Credentials::read_on_first_call(fetch)));
    assert_eq!(reads.load(Ordering::SeqCst), 0, "the init read the key");

    // Then the first charge reads it, the read fails: not sent, and not the provider's failure
    let failed = gateway.charge("pre-1", amount(), "tok_visa").await.expect_err("no key yet");
    assert_eq!(failed.why, Why::NoCredentials, "{failed:?}");
    assert!(failed.not_called() && failed.message.contains("read 0"), "{failed:?}");
    // And the next charge reads again and goes through with the key, and the one after reads nothing
    let charged = gateway.charge("pre-2", amount(), "tok_visa").await;
    assert!(matches!(charged, Ok(ChargeOutcome::Charged { .. })), "{charged:?}");
    assert!(matches!(gateway.charge("pre-3", amount(), "tok_visa").await, Ok(ChargeOutcome::Charged { .. })));
    assert_eq!(reads.load(Ordering::SeqCst), 2, "one read per call until one succeeded, then none");
    let (calls, _) = charged_keys(&sim, "pre").await;
    assert_eq!(calls, 2, "nothing sent without the key");
    sim.stop().await;
}
