//! The run's bill: every request the functions and the event source pollers make goes through a
//! metering proxy ([`crate::lambda::intercept`]) that counts it per operation, with DynamoDB's
//! consumed capacity (asked for with `ReturnConsumedCapacity: TOTAL` on the way, read from the
//! answer), EventBridge entries, messages SQS delivered for the first time (sent by Step
//! Functions or EventBridge, inside the emulator) and log bytes. [`Bill`] adds the Lambda
//! service's figures and the state machine's transitions and prices it all at AWS list prices,
//! so a change that makes the saga dearer shows up in the run's report.
//!
//! Not counted: DynamoDB Streams reads by Lambda triggers (free on AWS), X-Ray traces, storage
//! (tables, queues' retained messages, log retention), data transfer.

use std::collections::BTreeMap;
use std::sync::Mutex;

use hyper::StatusCode;
use hyper::body::Bytes;
use serde_json::Value;

use crate::lambda::FunctionStats;
use crate::lambda::intercept::Tap;

/// AWS list prices, us-east-1, in US dollars (on-demand; as published in 2025).
pub mod price {
    /// Per request.
    pub const LAMBDA_REQUEST: f64 = 0.20 / 1e6;
    /// Per GB-second, arm64 (the template's architecture).
    pub const LAMBDA_GB_SECOND_ARM64: f64 = 0.000_013_333_4;
    /// Per state transition, Standard workflows.
    pub const SFN_TRANSITION: f64 = 0.025 / 1e3;
    /// Per request (each 64 KB of payload is a request), standard queues.
    pub const SQS_REQUEST: f64 = 0.40 / 1e6;
    /// Per custom event (each 64 KB is an event).
    pub const EVENTBRIDGE_EVENT: f64 = 1.00 / 1e6;
    /// Per write request unit, on-demand.
    pub const DYNAMODB_WRU: f64 = 0.625 / 1e6;
    /// Per read request unit, on-demand.
    pub const DYNAMODB_RRU: f64 = 0.125 / 1e6;
    /// Per GB ingested.
    pub const LOGS_GB: f64 = 0.50;
}

const CHUNK: usize = 64 * 1024;
/// CloudWatch Logs bills 26 bytes per event on top of its message.
const LOG_EVENT_OVERHEAD: u64 = 26;

/// What one operation cost over the run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub requests: u64,
    /// Billing units the requests carried: 64 KB chunks for SQS and EventBridge.
    pub chunks: u64,
    pub read_units: f64,
    pub write_units: f64,
    /// SQS: messages received for the first time (`ApproximateReceiveCount` 1).
    pub first_receives: u64,
    /// CloudWatch Logs: bytes ingested, with the per-event overhead.
    pub log_bytes: u64,
}

/// Counts per operation (`X-Amz-Target`, say `DynamoDB_20120810.TransactWriteItems`).
#[derive(Debug, Default)]
pub struct Meter {
    usage: Mutex<BTreeMap<String, Usage>>,
}

/// DynamoDB operations that report consumed capacity when asked.
const CAPACITY_OPERATIONS: [&str; 10] = [
    "GetItem",
    "PutItem",
    "UpdateItem",
    "DeleteItem",
    "Query",
    "Scan",
    "BatchGetItem",
    "BatchWriteItem",
    "TransactGetItems",
    "TransactWriteItems",
];

fn split(operation: &str) -> (&str, &str) {
    operation.split_once('.').unwrap_or(("", operation))
}

fn chunks(len: usize) -> u64 {
    len.div_ceil(CHUNK).max(1) as u64
}

impl Meter {
    pub fn usage(&self) -> BTreeMap<String, Usage> {
        self.usage.lock().map(|u| u.clone()).unwrap_or_default()
    }

    fn add(&self, operation: &str, f: impl FnOnce(&mut Usage)) {
        if let Ok(mut usage) = self.usage.lock() {
            f(usage.entry(operation.to_owned()).or_default());
        }
    }
}

impl Tap for Meter {
    async fn request(&self, operation: &str, body: &mut Bytes) -> bool {
        let (service, name) = split(operation);
        let capacity = service.starts_with("DynamoDB_") && CAPACITY_OPERATIONS.contains(&name);
        let logs = service.starts_with("Logs_") && name == "PutLogEvents";
        // Parsed once, and only for the operations whose body is read.
        let wants_json =
            capacity || logs || matches!((service, name), ("AWSEvents", "PutEvents") | ("AmazonSQS", "SendMessage"));
        let mut json = if wants_json { serde_json::from_slice(body).unwrap_or(Value::Null) } else { Value::Null };
        let units = match (service, name) {
            ("AWSEvents", "PutEvents") => json["Entries"]
                .as_array()
                .map_or(1, |entries| entries.iter().map(|e| chunks(e.to_string().len())).sum()),
            ("AmazonSQS", "SendMessage") => chunks(json["MessageBody"].as_str().map_or(0, str::len)),
            ("AmazonSQS", _) => chunks(body.len()),
            _ => 1,
        };
        let log_bytes = if logs {
            json["logEvents"].as_array().map_or(0, |events| {
                events.iter().map(|e| e["message"].as_str().map_or(0, str::len) as u64 + LOG_EVENT_OVERHEAD).sum()
            })
        } else {
            0
        };
        if capacity && let Some(fields) = json.as_object_mut().filter(|f| !f.contains_key("ReturnConsumedCapacity")) {
            fields.insert("ReturnConsumedCapacity".into(), "TOTAL".into());
            if let Ok(rewritten) = serde_json::to_vec(&json) {
                *body = Bytes::from(rewritten);
            }
        }
        self.add(operation, |u| {
            u.requests += 1;
            u.chunks += units;
            u.log_bytes += log_bytes;
        });
        true
    }

    fn response(&self, operation: &str, status: StatusCode, body: &Bytes) {
        let (service, name) = split(operation);
        if !status.is_success()
            || !(service.starts_with("DynamoDB_") || (service, name) == ("AmazonSQS", "ReceiveMessage"))
        {
            return;
        }
        let Ok(answer) = serde_json::from_slice::<Value>(body) else { return };
        if service == "AmazonSQS" {
            let first = answer["Messages"]
                .as_array()
                .map_or(0, |m| m.iter().filter(|m| m["Attributes"]["ApproximateReceiveCount"] == "1").count());
            self.add(operation, |u| u.first_receives += first as u64);
            return;
        }
        let units: f64 = match &answer["ConsumedCapacity"] {
            Value::Array(tables) => tables.iter().filter_map(|c| c["CapacityUnits"].as_f64()).sum(),
            one => one["CapacityUnits"].as_f64().unwrap_or(0.0),
        };
        // DynamoDB Local reports a transaction at the plain rate; AWS bills transactional reads
        // and writes at twice it.
        let units = if name.starts_with("Transact") { units * 2.0 } else { units };
        let reads = matches!(name, "GetItem" | "Query" | "Scan" | "BatchGetItem" | "TransactGetItems");
        self.add(operation, |u| if reads { u.read_units += units } else { u.write_units += units });
    }
}

/// One line of the bill.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub item: &'static str,
    pub quantity: f64,
    pub unit_price: f64,
}

/// The run's cost, from the meter, the Lambda service's figures and the saga's transitions.
#[derive(Debug, Clone, PartialEq)]
pub struct Bill {
    pub orders: usize,
    pub lines: Vec<Line>,
    /// Requests per operation, for the detail.
    pub requests: BTreeMap<String, u64>,
}

impl Bill {
    pub fn new(orders: usize, usage: &BTreeMap<String, Usage>, functions: &[FunctionStats], transitions: u64) -> Self {
        let sum = |service: &str, f: &dyn Fn(&Usage) -> f64| -> f64 {
            usage.iter().filter(|(op, _)| split(op).0.starts_with(service)).map(|(_, u)| f(u)).sum()
        };
        let gb_seconds: f64 =
            functions.iter().map(|f| f.billed_ms as f64 / 1000.0 * f.memory_size_mb as f64 / 1024.0).sum();
        // SQS messages sent inside the emulator (Step Functions tasks, EventBridge targets) are
        // not seen as requests; each first delivery stands for its send.
        let sqs = sum("AmazonSQS", &|u| u.chunks as f64 + u.first_receives as f64);
        let lines = vec![
            Line {
                item: "Lambda invocations",
                quantity: functions.iter().map(|f| f.invocations as f64).sum(),
                unit_price: price::LAMBDA_REQUEST,
            },
            Line { item: "Lambda GB-seconds", quantity: gb_seconds, unit_price: price::LAMBDA_GB_SECOND_ARM64 },
            Line {
                item: "Step Functions transitions",
                quantity: transitions as f64,
                unit_price: price::SFN_TRANSITION,
            },
            Line { item: "SQS requests", quantity: sqs, unit_price: price::SQS_REQUEST },
            Line {
                item: "EventBridge events",
                quantity: sum("AWSEvents", &|u| u.chunks as f64),
                unit_price: price::EVENTBRIDGE_EVENT,
            },
            Line {
                item: "DynamoDB write units",
                quantity: sum("DynamoDB_", &|u| u.write_units),
                unit_price: price::DYNAMODB_WRU,
            },
            Line {
                item: "DynamoDB read units",
                quantity: sum("DynamoDB_", &|u| u.read_units),
                unit_price: price::DYNAMODB_RRU,
            },
            Line {
                item: "CloudWatch Logs GB",
                quantity: sum("Logs_", &|u| u.log_bytes as f64) / 1e9,
                unit_price: price::LOGS_GB,
            },
        ];
        let requests = usage.iter().map(|(op, u)| (op.clone(), u.requests)).collect();
        Self { orders, lines, requests }
    }

    /// US dollars per million orders.
    pub fn per_million_orders(&self) -> f64 {
        self.lines.iter().map(|l| l.quantity * l.unit_price).sum::<f64>() / self.orders.max(1) as f64 * 1e6
    }

    pub fn report(&self) -> String {
        let n = self.orders.max(1) as f64;
        let mut out = vec![
            format!("Cost per order at AWS list prices (us-east-1, on-demand), over the run's {} orders:", self.orders),
            format!("  {:<28} {:>12} {:>22}", "", "per order", "$ per million orders"),
        ];
        for line in &self.lines {
            let per_order = line.quantity / n;
            let quantity = if per_order >= 0.01 { format!("{per_order:.2}") } else { format!("{per_order:.2e}") };
            out.push(format!("  {:<28} {:>12} {:>22.2}", line.item, quantity, per_order * line.unit_price * 1e6));
        }
        out.push(format!("  {:<28} {:>12} {:>22.2}", "Total", "", self.per_million_orders()));
        let mut by_service: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (op, count) in &self.requests {
            let (service, name) = split(op);
            by_service.entry(service).or_default().push(format!("{name} {:.2}", *count as f64 / n));
        }
        out.push("  Requests per order:".into());
        for (service, ops) in by_service {
            out.push(format!("    {service}: {}", ops.join(", ")));
        }
        out.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dynamodb_requests_ask_for_capacity_and_transactions_cost_double() {
        // Given the meter
        let meter = Meter::default();

        // When a TransactWriteItems goes through and DynamoDB Local answers 3 units
        let mut body = Bytes::from_static(br#"{"TransactItems":[]}"#);
        assert!(meter.request("DynamoDB_20120810.TransactWriteItems", &mut body).await);
        let sent: Value = serde_json::from_slice(&body).expect("json");
        meter.response(
            "DynamoDB_20120810.TransactWriteItems",
            StatusCode::OK,
            &Bytes::from_static(br#"{"ConsumedCapacity":[{"TableName":"t","CapacityUnits":3.0}]}"#),
        );
        let mut query = Bytes::from_static(br#"{"TableName":"t"}"#);
        meter.request("DynamoDB_20120810.Query", &mut query).await;
        meter.response(
            "DynamoDB_20120810.Query",
            StatusCode::OK,
            &Bytes::from_static(br#"{"ConsumedCapacity":{"TableName":"t","CapacityUnits":0.5}}"#),
        );

        // Then the request asked for capacity, and AWS's transactional rate is applied
        assert_eq!(sent["ReturnConsumedCapacity"], "TOTAL");
        let usage = meter.usage();
        assert_eq!(usage["DynamoDB_20120810.TransactWriteItems"].write_units, 6.0);
        assert_eq!(usage["DynamoDB_20120810.Query"].read_units, 0.5);
        assert_eq!(usage["DynamoDB_20120810.Query"].requests, 1);
    }

    #[tokio::test]
    async fn the_bill_prices_each_line_per_order() {
        // Given 2 orders' worth of metered requests
        let meter = Meter::default();
        let mut events =
            Bytes::from(serde_json::json!({ "Entries": [{ "Detail": "{}" }, { "Detail": "{}" }] }).to_string());
        meter.request("AWSEvents.PutEvents", &mut events).await;
        let mut receive = Bytes::from_static(b"{}");
        meter.request("AmazonSQS.ReceiveMessage", &mut receive).await;
        meter.response(
            "AmazonSQS.ReceiveMessage",
            StatusCode::OK,
            &Bytes::from_static(br#"{"Messages":[{"Attributes":{"ApproximateReceiveCount":"1"}},{"Attributes":{"ApproximateReceiveCount":"2"}}]}"#),
        );
        let function =
            FunctionStats { invocations: 4, billed_ms: 2_000, memory_size_mb: 512, ..FunctionStats::default() };

        // When the bill is made with 20 transitions
        let bill = Bill::new(2, &meter.usage(), &[function], 20);

        // Then: per order 2 invocations, 0.5 GB-s, 10 transitions, 1 SQS request + 0.5 sends, 1 event
        let quantity = |item: &str| bill.lines.iter().find(|l| l.item == item).map(|l| l.quantity / 2.0);
        assert_eq!(quantity("Lambda invocations"), Some(2.0));
        assert_eq!(quantity("Lambda GB-seconds"), Some(0.5));
        assert_eq!(quantity("Step Functions transitions"), Some(10.0));
        assert_eq!(quantity("SQS requests"), Some(1.0));
        assert_eq!(quantity("EventBridge events"), Some(1.0));
        let expected = (2.0 * price::LAMBDA_REQUEST
            + 0.5 * price::LAMBDA_GB_SECOND_ARM64
            + 10.0 * price::SFN_TRANSITION
            + price::SQS_REQUEST
            + price::EVENTBRIDGE_EVENT)
            * 1e6;
        assert!((bill.per_million_orders() - expected).abs() < 1e-6, "{} vs {expected}", bill.per_million_orders());
        assert!(bill.report().contains("Step Functions transitions"));
    }
}
