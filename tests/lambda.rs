//! The local Lambda service with the project's own binaries: instances, environment, logs and
//! REPORT lines, crashes and throttling, and Lambda's Invoke API as the AWS SDK's own Lambda
//! client calls it. Each test has its own stack; nothing runs the event sources here, so the
//! only invocations are the test's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::{InvocationType, LogType};
use base64::Engine;
use local_env::lambda::invoke_api::{self, InvokeApi};
use local_env::lambda::{Faults, FunctionStats, LambdaService};
use serde_json::{Value, json};
use system_tests::saga::SagaEnv;
use system_tests::{unique, workspace_root};

const QUERY_API: &str = "QueryApiFunction";

/// The Invoke API on a free port, and the SDK's Lambda client pointed at it (no retries, so a
/// throttle is seen as it is).
async fn invoke_api(env: &SagaEnv) -> (InvokeApi, aws_sdk_lambda::Client) {
    let api = invoke_api::serve(env.service.clone(), ([127, 0, 0, 1], 0).into()).await.expect("Invoke API");
    let config = aws_sdk_lambda::config::Builder::from(env.aws.sdk_config())
        .endpoint_url(api.url())
        .retry_config(aws_sdk_lambda::config::retry::RetryConfig::disabled())
        .build();
    (api, aws_sdk_lambda::Client::from_conf(config))
}

fn stats(service: &LambdaService, function: &str) -> FunctionStats {
    service.stats().into_iter().find(|s| s.logical_id == function).expect("stats")
}

/// A query API request for an order that does not exist: a cheap invocation (404).
fn get_missing_order() -> Value {
    let id = unique("ord-none-");
    json!({ "version": "2.0", "routeKey": "GET /orders/{id}", "rawPath": format!("/orders/{id}"),
            "rawQueryString": "", "pathParameters": { "id": id },
            "requestContext": { "http": { "method": "GET", "path": format!("/orders/{id}") },
                                "authorizer": { "jwt": { "claims": { "sub": "cust-1" }, "scopes": null } } } })
}

/// Every message of a function's log group in CloudWatch Logs.
async fn log_events(env: &SagaEnv, function_name: &str) -> Vec<String> {
    system_tests::log_messages(&env.aws.logs(), function_name).await
}

/// The query API invoked through the Invoke API with [`get_missing_order`].
async fn get_order(
    lambda: &aws_sdk_lambda::Client,
) -> Result<
    aws_sdk_lambda::operation::invoke::InvokeOutput,
    aws_sdk_lambda::error::SdkError<aws_sdk_lambda::operation::invoke::InvokeError>,
> {
    lambda.invoke().function_name(QUERY_API).payload(Blob::new(get_missing_order().to_string())).send().await
}

fn sorted(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut paths: Vec<_> = std::fs::read_dir(dir).expect("listing").map(|e| e.expect("entry").path()).collect();
    paths.sort();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_sample_event_is_answered_by_its_binary_through_the_invoke_api() {
    // Given the system's functions, invoked only through the Invoke API, by crate name (as
    // `cargo lambda invoke <crate> --data-file events/<crate>/<sample>.json` names them)
    let env = SagaEnv::start_idle().await;
    let (api, lambda) = invoke_api(&env).await;
    let mut dirs = sorted(&workspace_root().join("events"));
    // The saga-starter sample really starts a saga for the samples' order: run it last, so that
    // no execution of this stack is in flight while the step samples answer their fake token.
    dirs.sort_by_key(|d| d.ends_with("saga-starter"));
    let mut checked = 0;
    for dir in dirs {
        let function = dir.file_name().and_then(|n| n.to_str()).expect("name").to_owned();
        for path in sorted(&dir) {
            let mut sample: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
            let what = path.display().to_string();
            // Orders get a fresh id, so that each run places a new one
            if function == "place-order" {
                let body = sample["body"].as_str().expect("a POST /orders event");
                let mut order: Value = serde_json::from_str(body).expect("order");
                order["orderId"] = json!(unique("ord-http-"));
                sample["body"] = json!(order.to_string());
            }
            // When it is invoked
            let out = lambda
                .invoke()
                .function_name(&function)
                .payload(Blob::new(sample.to_string()))
                .log_type(LogType::Tail)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{what}: {}", aws_sdk_lambda::error::DisplayErrorContext(&e)));

            // Then its binary answered without error, in the shape its trigger expects
            let payload = out.payload().map(|p| p.as_ref().to_vec()).unwrap_or_default();
            let answer: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
            assert_eq!(out.status_code(), 200, "{what}");
            assert_eq!(out.function_error(), None, "{what}: {answer}");
            assert_eq!(out.executed_version(), Some("$LATEST"), "{what}");
            let log =
                base64::engine::general_purpose::STANDARD.decode(out.log_result().unwrap_or_default()).expect("base64");
            let log = String::from_utf8_lossy(&log);
            assert!(log.starts_with("START RequestId: ") && log.contains("\nREPORT RequestId: "), "{what}: {log}");
            match function.as_str() {
                "place-order" => assert_eq!(answer["statusCode"], 201, "{what}: {answer}"),
                "query-api" => {
                    let status = answer["statusCode"].as_u64().expect("statusCode");
                    assert!(status == 200 || status == 404, "{what}: {answer}");
                    let body: Value = serde_json::from_str(answer["body"].as_str().expect("body")).expect("JSON body");
                    assert!(body.is_object(), "{what}: {body}");
                }
                // SQS and stream functions report per-record failures: none
                _ => assert_eq!(answer["batchItemFailures"], json!([]), "{what}: {answer}"),
            }
            checked += 1;
        }
    }
    assert!(checked >= 26, "only {checked} samples checked");
    // And each function ran as its own process: one cold start per function invoked
    let invoked: Vec<FunctionStats> = env.service.stats().into_iter().filter(|s| s.invocations > 0).collect();
    assert_eq!(invoked.len(), 18, "every function was invoked: {invoked:?}");
    assert!(invoked.iter().all(|s| s.cold_starts >= 1 && s.errors == 0), "{invoked:?}");
    api.stop();
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_are_reused_added_when_busy_and_report_as_lambda_does() {
    let env = SagaEnv::start_idle().await;
    let service = &env.service;
    let spec = service.spec(QUERY_API).expect("spec").clone();

    // When the query API is invoked three times in a row
    for _ in 0..3 {
        service.invoke_json(QUERY_API, &get_missing_order()).await.expect("answers");
    }
    // Then one instance served them all: one cold start
    let after_serial = stats(service, QUERY_API);
    assert_eq!((after_serial.invocations, after_serial.cold_starts), (3, 1), "{after_serial:?}");
    assert_eq!(after_serial.init_ms.len(), 1);

    // And the instance's process has exactly the environment Lambda would give it
    let pids = service.idle_pids(QUERY_API);
    assert_eq!(pids.len(), 1, "one warm instance");
    let environ = std::fs::read(format!("/proc/{}/environ", pids[0])).expect("environ");
    let vars: HashMap<String, String> = environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    assert_eq!(vars["AWS_LAMBDA_FUNCTION_NAME"], spec.name);
    assert_eq!(vars["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"], "256");
    assert_eq!(vars["AWS_LAMBDA_FUNCTION_VERSION"], "$LATEST");
    assert_eq!(vars["AWS_LAMBDA_LOG_GROUP_NAME"], format!("/aws/lambda/{}", spec.name));
    assert!(vars["AWS_LAMBDA_LOG_STREAM_NAME"].contains("/[$LATEST]"), "{vars:?}");
    assert!(vars["AWS_LAMBDA_RUNTIME_API"].starts_with("127.0.0.1:"), "{vars:?}");
    assert_eq!(vars["AWS_REGION"], env.aws.var("AWS_REGION"));
    assert_eq!(vars["READ_MODEL_TABLE"], env.stack.environment["READ_MODEL_TABLE"], "Globals");
    assert_eq!(vars["RUST_LOG"], "info", "Globals");
    assert!(vars.contains_key("AWS_ENDPOINT_URL_DYNAMODB") || vars.contains_key("AWS_ENDPOINT_URL"), "{vars:?}");
    for leaked in ["CARGO_MANIFEST_DIR", "HOME", "RUST_TEST_THREADS"] {
        assert!(!vars.contains_key(leaked), "{leaked} leaked from the caller: {vars:?}");
    }

    // When three invocations arrive together, each held for a second
    let slow = Faults { delay: Some(Duration::from_millis(1000)), ..Faults::default() };
    service.set_faults(QUERY_API, slow).expect("faults");
    let requests: Vec<Value> = (0..3).map(|_| get_missing_order()).collect();
    let calls = requests.iter().map(|request| service.invoke_json(QUERY_API, request));
    for answer in futures::future::join_all(calls).await {
        answer.expect("answers");
    }
    service.set_faults(QUERY_API, Faults::default()).expect("faults cleared");
    // Then the warm instance took one and two more were started
    let after_burst = stats(service, QUERY_API);
    assert_eq!((after_burst.invocations, after_burst.cold_starts), (6, 3), "{after_burst:?}");
    assert_eq!(service.idle_pids(QUERY_API).len(), 3);

    // And every invocation has START, END and a REPORT line like Lambda's, in the function's
    // log file and in its CloudWatch Logs group
    service.flush_logs().await;
    let file = std::fs::read_to_string(service.log_file(QUERY_API).expect("log file")).expect("log file");
    let reports: Vec<&str> = file.lines().filter_map(|l| l.split_once(" REPORT ").map(|(_, r)| r)).collect();
    assert_eq!(reports.len(), 6, "{file}");
    assert_eq!(file.matches(" START RequestId: ").count(), 6);
    assert_eq!(file.matches(" END RequestId: ").count(), 6);
    for report in &reports {
        for field in
            ["RequestId: ", "\tDuration: ", " ms\tBilled Duration: ", "\tMemory Size: 256 MB\tMax Memory Used: "]
        {
            assert!(report.contains(field), "{field:?} in {report}");
        }
    }
    assert_eq!(reports.iter().filter(|r| r.contains("\tInit Duration: ")).count(), 3, "one per cold start");
    let held: Vec<f64> = after_burst.duration_ms[3..].to_vec();
    assert!(held.iter().all(|d| *d >= 1000.0), "held answers count in the duration: {held:?}");
    assert!(after_burst.max_memory_used_mb > 0, "peak RSS read from the process");
    let shipped = log_events(&env, &spec.name).await;
    assert_eq!(shipped.iter().filter(|m| m.starts_with("REPORT RequestId: ")).count(), 6, "{shipped:?}");
    assert_eq!(shipped.iter().filter(|m| m.starts_with("INIT_START ")).count(), 3, "{shipped:?}");

    // And what a function writes itself (place-order logs each order as a JSON line) is there too
    let order_id = env.place(env.sample("happy-path")).await;
    service.flush_logs().await;
    let place_order = service.spec("PlaceOrderFunction").expect("spec").name.clone();
    let lines = log_events(&env, &place_order).await;
    let logged =
        lines.iter().filter_map(|m| serde_json::from_str::<Value>(m).ok()).find(|l| l["orderId"] == order_id.as_str());
    assert!(logged.is_some_and(|l| l["message"] == "order placed"), "{lines:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_instance_fails_its_invocation_and_is_replaced() {
    let env = SagaEnv::start_idle().await;
    let (api, lambda) = invoke_api(&env).await;
    get_order(&lambda).await.expect("a first, warm-up invocation");

    // Given the next invocation's instance killed 100 ms in, while its answer is held back for
    // a second (set through the Invoke API's fault route, as a tool outside this process would)
    let faults = r#"{"killAfter":100,"delay":1000,"times":1}"#;
    let url = format!("/_local/functions/{QUERY_API}/faults");
    let set = system_tests::http::request(api.addr(), "PUT", &url, Some(faults)).await;
    assert_eq!(set.status, 200, "{}", set.body);

    // When it is invoked
    let crashed = get_order(&lambda).await.expect("an answer");
    // Then the invocation failed as Lambda reports a crash
    assert_eq!(crashed.function_error(), Some("Unhandled"));
    let error: Value = serde_json::from_slice(crashed.payload().expect("payload").as_ref()).expect("json");
    assert_eq!(error["errorType"], "Runtime.ExitError", "{error}");
    assert!(error["errorMessage"].as_str().unwrap_or_default().contains("signal: killed"), "{error}");

    // And the next invocation runs on a new instance
    let next = get_order(&lambda).await.expect("an answer");
    assert_eq!(next.function_error(), None);
    let s = stats(&env.service, QUERY_API);
    assert_eq!((s.invocations, s.errors, s.cold_starts), (3, 1, 2), "{s:?}");

    // And with every invocation told to cold-start, each gets a fresh instance, kept by none
    let cold = Faults { cold_start: true, times: Some(2), ..Faults::default() };
    env.service.set_faults(QUERY_API, cold).expect("faults");
    for _ in 0..2 {
        env.service.invoke_json(QUERY_API, &get_missing_order()).await.expect("answers");
    }
    let s = stats(&env.service, QUERY_API);
    assert_eq!((s.invocations, s.cold_starts), (5, 4), "{s:?}");
    assert_eq!(env.service.idle_pids(QUERY_API).len(), 1, "only the instance from before stays warm");

    // And unknown functions are Lambda's 404
    let missing = lambda.invoke().function_name("no-such-function").send().await.expect_err("404");
    assert!(missing.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()), "{missing:?}");
    api.stop();
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invocations_beyond_the_concurrency_limit_are_throttled() {
    // Given every instance the query API may have busy (each invocation held for 2 s)
    let env = SagaEnv::start_idle().await;
    let (api, lambda) = invoke_api(&env).await;
    let limit = env.service.spec(QUERY_API).expect("spec").concurrency;
    let slow = Faults { delay: Some(Duration::from_secs(2)), ..Faults::default() };
    env.service.set_faults(QUERY_API, slow).expect("faults");
    let lambda = Arc::new(lambda);
    let calls: Vec<_> = (0..limit + 2)
        .map(|_| {
            let lambda = lambda.clone();
            tokio::spawn(async move {
                lambda
                    .invoke()
                    .function_name(QUERY_API)
                    .payload(Blob::new(get_missing_order().to_string()))
                    .send()
                    .await
            })
        })
        .collect();
    let mut answered = 0;
    let mut throttled = 0;
    for call in calls {
        match call.await.expect("task") {
            Ok(out) if out.function_error().is_none() => answered += 1,
            Ok(out) => panic!("function error: {:?}", out.payload()),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_too_many_requests_exception()) => throttled += 1,
            Err(e) => panic!("{}", aws_sdk_lambda::error::DisplayErrorContext(&e)),
        }
    }
    // Then exactly the limit ran and the rest got Lambda's 429
    assert_eq!((answered, throttled), (limit, 2));
    // And an asynchronous invocation is accepted at once and runs in the background
    env.service.set_faults(QUERY_API, Faults::default()).expect("faults cleared");
    let queued = lambda
        .invoke()
        .function_name(QUERY_API)
        .invocation_type(InvocationType::Event)
        .payload(Blob::new(get_missing_order().to_string()))
        .send()
        .await
        .expect("accepted");
    assert_eq!(queued.status_code(), 202);
    let mut ran = false;
    for _ in 0..50 {
        if stats(&env.service, QUERY_API).invocations == (limit + 1) as u64 {
            ran = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ran, "{:?}", stats(&env.service, QUERY_API));
    api.stop();
    env.stop().await;
}
