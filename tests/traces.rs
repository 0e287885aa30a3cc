//! Correlation and traces: an order placed over the HTTP API with a correlation id and an X-Ray
//! trace header keeps both through its whole saga: on every event it causes (DynamoDB Streams
//! carry no trace context, so the events do), in the execution's input, on every command the
//! state machine sends, and on every line the functions log about it, in CloudWatch Logs.

use serde_json::Value;
use shared::telemetry::trace_root;
use system_tests::saga::SagaEnv;
use system_tests::unique;

/// The JSON lines a function wrote itself: not the platform's (`START`, `REPORT`…), not EMF.
fn app_lines(messages: &[String]) -> Vec<Value> {
    messages
        .iter()
        .filter_map(|m| serde_json::from_str::<Value>(m).ok())
        .filter(|line| line.get("_aws").is_none())
        .collect()
}

/// Whether a line is about the order, in its flow: order, correlation id and trace root.
fn in_flow(line: &Value, order_id: &str, correlation_id: &str, root: &str) -> bool {
    line["orderId"] == order_id
        && line["correlationId"] == correlation_id
        && line["xrayTraceId"].as_str().and_then(trace_root) == Some(root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_placed_over_http_is_correlated_and_traced_through_its_saga() {
    // Given the system running, with a line for every record a step or projection works on,
    // and its HTTP API served as API Gateway would
    let env = SagaEnv::start_with_parameters(&[("LogLevel", "info,shared=debug")]).await;

    // When a client places an order with its own correlation id, inside an X-Ray trace
    let order = env.sample("happy-path");
    let id = order["orderId"].as_str().expect("orderId").to_owned();
    let correlation_id = unique("corr-");
    let epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let random = uuid::Uuid::new_v4().simple().to_string();
    let root = format!("1-{epoch:08x}-{}", &random[..24]);
    let trace = format!("Root={root};Parent={};Sampled=1", &random[16..]);
    let bearer = env.customer_bearer(order["customerId"].as_str().expect("customerId"));
    let headers = [
        ("X-Correlation-Id", correlation_id.as_str()),
        ("X-Amzn-Trace-Id", trace.as_str()),
        ("Authorization", bearer.as_str()),
    ];
    let body = order.to_string();
    let response = system_tests::http::request_with_headers(env.api(), "POST", "/orders", &headers, Some(&body)).await;

    // Then the answer repeats the correlation id, and the saga completes
    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(response.header("x-correlation-id"), Some(correlation_id.as_str()));
    let finished = env.finished(&id).await;
    assert_eq!(finished.status, "SUCCEEDED");

    // And every event of the order's streams, and the stock it moved, carries the correlation
    // id and the request's trace
    let mut events = Vec::new();
    for category in ["Order", "Payment", "Shipment"] {
        events.extend(env.events(category, &id).await);
    }
    for line in order["lines"].as_array().expect("lines") {
        let sku = line["sku"].as_str().expect("sku");
        let stock = env.events("Inventory", sku).await;
        events.extend(stock.into_iter().filter(|e| e.payload["orderId"] == id.as_str()));
    }
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    for expected in ["OrderPlaced", "InventoryReserved", "PaymentCharged", "ShipmentCreated", "OrderCompleted"] {
        assert!(types.contains(&expected), "{expected} in {types:?}");
    }
    for event in &events {
        assert_eq!(event.correlation_id, correlation_id, "{} {}", event.stream_id, event.event_type);
        let carried = event.trace_header.as_deref().and_then(trace_root);
        assert_eq!(carried, Some(root.as_str()), "{} {}", event.stream_id, event.event_type);
    }

    // And the saga's execution was started with both, so its commands carry them
    let execution =
        env.sfn.describe_execution().execution_arn(&finished.execution_arn).send().await.expect("DescribeExecution");
    let input: Value = serde_json::from_str(execution.input().unwrap_or_default()).expect("input");
    assert_eq!(input["correlationId"], correlation_id.as_str());
    assert_eq!(input["traceHeader"].as_str().and_then(trace_root), Some(root.as_str()));

    // And every line the functions on the order's path wrote is about it, in its flow: the
    // order id, the correlation id and the trace, in CloudWatch Logs
    for function in [
        "PlaceOrderFunction",
        "SagaStarterFunction",
        "ReserveInventoryFunction",
        "ChargePaymentFunction",
        "CreateShipmentFunction",
        "SendNotificationFunction",
        "FinalizeOrderFunction",
    ] {
        let lines = app_lines(&env.log_messages(function).await);
        assert!(!lines.is_empty(), "{function} logged nothing");
        for line in &lines {
            assert!(in_flow(line, &id, &correlation_id, &root), "{function}: {line}");
        }
    }
    // And the projections' lines about the order carry its flow as well (they also see the
    // stock's own events, which belong to no order)
    for function in ["OrderViewProjectionFunction", "CustomerOrdersProjectionFunction"] {
        let lines = app_lines(&env.log_messages(function).await);
        let about: Vec<&Value> = lines.iter().filter(|l| l["orderId"] == id.as_str()).collect();
        assert!(!about.is_empty(), "{function} logged nothing about {id}: {lines:?}");
        for line in about {
            assert!(in_flow(line, &id, &correlation_id, &root), "{function}: {line}");
        }
    }
    env.stop().await;
}
