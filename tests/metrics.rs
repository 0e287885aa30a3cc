//! Business and saga metrics: the functions write them as CloudWatch Embedded Metric Format
//! lines (`shared::metrics`), the local Lambda service extracts them from the function logs
//! into CloudWatch metrics on LocalStack, as CloudWatch does on AWS, and they read back with
//! `GetMetricStatistics`. Each test's stack has its own function names, so its `Service`
//! dimension is its own: another test's orders cannot make this one pass.

use std::time::Duration;

use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, Statistic};
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
    let started = std::time::Instant::now();
    loop {
        env.service.flush_logs().await;
        let seen = statistics(client, metric, dimensions).await;
        if seen.1 >= want || started.elapsed() > Duration::from_secs(30) {
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
    env.stop().await;
}
