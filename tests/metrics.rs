//! Business and saga metrics: the functions write them as CloudWatch Embedded Metric Format
//! lines (`shared::metrics`), the local Lambda service extracts them from the function logs
//! into CloudWatch metrics on LocalStack, as CloudWatch does on AWS, and they read back with
//! `GetMetricStatistics`. Each test's stack has its own function names, so its `Service`
//! dimension is its own: another test's orders cannot make this one pass.

use std::time::Duration;

use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, Statistic};
use shared::domain::dead_letter::Status;
use shared::metrics::{NAMESPACE, names};
use system_tests::saga::SagaEnv;

/// Sum and sample count of a metric over the last hour, for these dimensions.
async fn statistics(client: &aws_sdk_cloudwatch::Client, metric: &str, dimensions: &[(&str, &str)]) -> (f64, f64) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let mut request = client
        .get_metric_statistics()
        .namespace(NAMESPACE)
        .metric_name(metric)
        .start_time(DateTime::from_secs(now - 3_600))
        .end_time(DateTime::from_secs(now + 600))
        .period(60)
        .statistics(Statistic::Sum)
        .statistics(Statistic::SampleCount);
    for (name, value) in dimensions {
        request = request.dimensions(Dimension::builder().name(*name).value(*value).build());
    }
    let answer = request.send().await.expect("GetMetricStatistics");
    answer.datapoints().iter().fold((0.0, 0.0), |(sum, count), point| {
        (sum + point.sum().unwrap_or_default(), count + point.sample_count().unwrap_or_default())
    })
}

/// Asks until the metric has at least `want` samples (the logs are shipped, and their metrics
/// put, about a second after they are written), or 30 s pass.
async fn read_back(
    env: &SagaEnv,
    client: &aws_sdk_cloudwatch::Client,
    metric: &str,
    dimensions: &[(&str, &str)],
    want: f64,
) -> (f64, f64) {
    poll(env, || statistics(client, metric, dimensions), |seen| seen.1 >= want).await
}

/// Reads with `read` until `done` holds for what it read, or 30 s pass, shipping the functions'
/// logs first each time (their metrics are put about a second after they are written).
async fn poll<T: Copy, F: std::future::Future<Output = T>>(
    env: &SagaEnv,
    read: impl Fn() -> F,
    done: impl Fn(T) -> bool,
) -> T {
    let started = std::time::Instant::now();
    loop {
        env.service.flush_logs().await;
        let seen = read().await;
        if done(seen) || started.elapsed() > Duration::from_secs(30) {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_completed_order_reads_back_as_cloudwatch_metrics() {
    // Given the system running
    let env = SagaEnv::start().await;
    let function = |logical_id: &str| env.service.spec(logical_id).expect("function").name.clone();
    let (place, charge, finalize) =
        (function("PlaceOrderFunction"), function("ChargePaymentFunction"), function("FinalizeOrderFunction"));

    // When an order goes through the happy path
    let id = env.place(env.sample("happy-path")).await;
    assert_eq!(env.finished(&id).await.status, "SUCCEEDED");

    // Then its metrics are in CloudWatch under this stack's functions: placed, completed, how
    // long the saga took, and each step's latency
    // (With the local environment's fix for LocalStack's reading of CBOR timestamps.)
    let cloudwatch = local_env::lambda::emf::cloudwatch_client(env.aws.cloudwatch().config().to_builder());
    let (placed, _) = read_back(&env, &cloudwatch, names::ORDERS_PLACED, &[("Service", &place)], 1.0).await;
    assert!(placed >= 1.0, "{} OrdersPlaced for {place}", placed);
    let (completed, _) = read_back(&env, &cloudwatch, names::ORDERS_COMPLETED, &[("Service", &finalize)], 1.0).await;
    assert!(completed >= 1.0, "{completed} OrdersCompleted for {finalize}");
    let duration = [("Service", finalize.as_str()), ("Outcome", "Completed")];
    let (took, samples) = read_back(&env, &cloudwatch, names::SAGA_DURATION, &duration, 1.0).await;
    assert!(samples >= 1.0 && took > 0.0, "SagaDuration: {samples} samples, {took} ms");
    let latency = [("Service", charge.as_str()), ("Step", "ChargePayment")];
    let (_, samples) = read_back(&env, &cloudwatch, names::STEP_LATENCY, &latency, 1.0).await;
    assert!(samples >= 1.0, "StepLatency of ChargePayment: {samples} samples");
    // And the provider call's latency, by operation (the charge to the payment gateway)
    let provider = [("Service", charge.as_str()), ("Operation", "charge")];
    let (_, samples) = read_back(&env, &cloudwatch, names::PROVIDER_LATENCY, &provider, 1.0).await;
    assert!(samples >= 1.0, "ProviderLatency of charge: {samples} samples");
    // And the functions' cold starts: each instance counts its own once, at init, as many as the
    // local Lambda service started for place-order
    let stats = env.service.stats().into_iter().find(|s| s.logical_id == "PlaceOrderFunction").expect("stats");
    assert!(stats.cold_starts >= 1, "{stats:?}");
    let want = stats.cold_starts as f64;
    let (cold, _) = read_back(&env, &cloudwatch, names::COLD_STARTS, &[("Service", &place)], want).await;
    assert_eq!(cold, want, "ColdStarts for {place}: {stats:?}");
    env.stop().await;
}

/// Maximum, minimum and sample count of a level over the last hour, for these dimensions.
async fn levels(client: &aws_sdk_cloudwatch::Client, metric: &str, dimensions: &[(&str, &str)]) -> (f64, f64, f64) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let mut request = client
        .get_metric_statistics()
        .namespace(NAMESPACE)
        .metric_name(metric)
        .start_time(DateTime::from_secs(now - 3_600))
        .end_time(DateTime::from_secs(now + 600))
        .period(60)
        .statistics(Statistic::Maximum)
        .statistics(Statistic::Minimum)
        .statistics(Statistic::SampleCount);
    for (name, value) in dimensions {
        request = request.dimensions(Dimension::builder().name(*name).value(*value).build());
    }
    let answer = request.send().await.expect("GetMetricStatistics");
    answer.datapoints().iter().fold((f64::MIN, f64::MAX, 0.0), |(max, min, count), point| {
        (
            max.max(point.maximum().unwrap_or(f64::MIN)),
            min.min(point.minimum().unwrap_or(f64::MAX)),
            count + point.sample_count().unwrap_or_default(),
        )
    })
}

/// Asks until `done` holds for the level's (maximum, minimum, samples), or 30 s pass.
async fn level_until(
    env: &SagaEnv,
    client: &aws_sdk_cloudwatch::Client,
    dimensions: &[(&str, &str)],
    done: impl Fn((f64, f64, f64)) -> bool,
) -> (f64, f64, f64) {
    poll(env, || levels(client, names::UNRESOLVED_DEAD_LETTERS, dimensions), done).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unresolved_dead_letters_and_manual_actions_read_back_as_levels_and_a_resolution_counts_once() {
    // Given the system running
    let env = SagaEnv::start().await;
    let function = |logical_id: &str| env.service.spec(logical_id).expect("function").name.clone();
    let (projection, order_view) = (function("DeadLettersProjectionFunction"), function("OrderViewProjectionFunction"));
    let cloudwatch = local_env::lambda::emf::cloudwatch_client(env.aws.cloudwatch().config().to_builder());
    let dead_letters = [("Service", projection.as_str()), ("Kind", "DeadLetter")];
    let manual_actions = [("Service", projection.as_str()), ("Kind", "ManualAction")];

    // When a message that is not JSON reaches a step's queue, and an order's refund keeps failing
    let queue = env.queue_url("ReserveInventoryQueue");
    env.aws.sqs().send_message().queue_url(&queue).message_body("{not json").send().await.expect("send");
    let id = env.place(env.sample("needs-manual-action")).await;

    // Then the message is parked as a dead letter, and the level of unresolved ones is reported
    let parked = env.dead_letters("ReserveInventoryDlq", 1, Status::Parked, 30).await;
    let poison =
        parked.iter().find(|d| d.status == Status::Parked).expect("a parked dead letter").dead_letter_id.clone();
    let (most, _, samples) = level_until(&env, &cloudwatch, &dead_letters, |(max, _, _)| max >= 1.0).await;
    assert!(most >= 1.0, "UnresolvedDeadLetters (DeadLetter): max {most}, {samples} samples");
    // And the order is flagged, its case parked, counted apart as a manual action
    assert_eq!(env.finished(&id).await.error.as_deref(), Some("NeedsManualAction"));
    let case = handle_dead_letters::manual_action_case(&id);
    let cases = env.dead_letters("ManualActionQueue", 1, Status::Parked, 30).await;
    assert!(cases.iter().any(|d| d.dead_letter_id == case && d.status == Status::Parked), "{cases:?}");
    let (most_cases, _, case_samples) = level_until(&env, &cloudwatch, &manual_actions, |(max, _, _)| max >= 1.0).await;
    assert!(most_cases >= 1.0, "UnresolvedDeadLetters (ManualAction): max {most_cases}, {case_samples} samples");

    // When an operator discards the dead letter and resolves the order by hand
    let operator = env.operator();
    operator.settle_by_operator(&poison, "ana", true, "a test's poison message").await.expect("discard");
    operator.resolve_order(&id, "ana", "refunded by bank transfer").await.expect("resolve");

    // Then both levels are reported again, at 0
    let back_to_zero = |before: f64| move |(_, min, n): (f64, f64, f64)| n > before && min == 0.0;
    let (_, least, after) = level_until(&env, &cloudwatch, &dead_letters, back_to_zero(samples)).await;
    assert!(after > samples && least == 0.0, "DeadLetter: {after} samples (from {samples}), min {least}");
    let (_, least, after) = level_until(&env, &cloudwatch, &manual_actions, back_to_zero(case_samples)).await;
    assert!(after > case_samples && least == 0.0, "ManualAction: {after} samples (from {case_samples}), min {least}");
    // And the order view projection counted the manual resolution, once
    let resolved = [("Service", order_view.as_str())];
    let (count, _) = read_back(&env, &cloudwatch, names::ORDERS_MANUALLY_RESOLVED, &resolved, 1.0).await;
    assert_eq!(count, 1.0, "OrdersManuallyResolved for {order_view}");
    env.stop().await;
}
