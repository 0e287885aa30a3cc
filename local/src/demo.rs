//! The local run: sample orders from `events/place-order/` through the whole system (place
//! order → event store → stream → saga starter → state machine → step Lambdas), every function
//! its own binary in the local Lambda service; then each order's outcome, events and saga steps,
//! with throughput and p50/p99 latency, and each function's figures from its REPORT lines.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use aws_lambda_events::apigw::ApiGatewayV2httpRequest;
use serde_json::{Value, json};
use shared::adapters::dynamodb::{DynamoEventStore, EventStoreConfig};
use shared::aggregate::{CommandContext, Repository};
use shared::domain::Sku;
use shared::domain::inventory::{Inventory, InventoryCommand};
use shared::domain::order::{Order, OrderStatus};
use shared::eventstore::{EventStore, StreamId};

use crate::issuer::Issuer;
use crate::lambda::FunctionStats;
use crate::observe::{self, history, quantile, saga_steps, wait_for_saga};
use crate::{Stack, http_client};

/// Each sample and the outcome it must reach: the demo fails loudly when the system drifts.
pub const SAMPLES: &[(&str, OrderStatus)] = &[
    ("happy-path", OrderStatus::Completed),
    ("out-of-stock", OrderStatus::Cancelled),
    ("payment-declined", OrderStatus::Cancelled),
    ("shipment-failed", OrderStatus::Cancelled),
    ("notification-failed", OrderStatus::Cancelled),
    ("needs-manual-action", OrderStatus::NeedsManualAction),
];

/// The SKU the out-of-stock sample asks too many of.
pub const SCARCE_SKU: &str = "SKU-RARE-VASE";

/// Stock the samples expect: plenty of the common SKUs, too little of the rare one.
pub const STOCK: &[(&str, u32)] = &[("SKU-RED-MUG", 10_000), ("SKU-BLUE-PLATE", 10_000), ("SKU-RARE-VASE", 2)];

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Loads a sample order (the body of a sample `POST /orders` event) and gives it a run-unique
/// id, so every run places new orders.
pub fn sample_order(dir: &Path, name: &str, suffix: &str) -> anyhow::Result<Value> {
    let path = dir.join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let event: ApiGatewayV2httpRequest =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let body = event.body.with_context(|| format!("{}: an event without a body", path.display()))?;
    let mut order: Value =
        serde_json::from_str(&body).with_context(|| format!("parsing the body of {}", path.display()))?;
    let id = order["orderId"].as_str().context("sample without orderId")?.to_owned();
    order["orderId"] = json!(format!("{id}-{suffix}"));
    Ok(order)
}

pub async fn restock(repo: &Repository<DynamoEventStore>, stock: &[(&str, u32)]) -> anyhow::Result<()> {
    for (sku, quantity) in stock {
        let cmd = InventoryCommand::Restock { sku: Sku::parse(sku)?, quantity: *quantity };
        repo.execute::<Inventory>(sku, &cmd, &CommandContext::default()).await?;
    }
    Ok(())
}

/// The HTTP API the demo calls, and the issuer its tokens come from.
#[derive(Clone, Copy)]
pub struct Api<'a> {
    pub addr: SocketAddr,
    pub issuer: &'a Issuer,
}

impl Api<'_> {
    /// `GET target` with `Authorization: bearer` (none: no header); the status and the JSON body.
    async fn get(&self, target: &str, bearer: Option<&str>) -> anyhow::Result<(u16, Option<String>, Value)> {
        let request = http_client().get(format!("http://{}{target}", self.addr));
        let answer = bearer.into_iter().fold(request, |r, bearer| r.header("authorization", bearer)).send().await?;
        let link = answer.headers().get("link").and_then(|l| l.to_str().ok()).map(str::to_owned);
        Ok((answer.status().as_u16(), link, answer.json().await?))
    }

    /// Places `order` as a client does: `POST /orders` with its customer's token.
    pub async fn place(&self, order: &Value) -> anyhow::Result<()> {
        let customer = order["customerId"].as_str().unwrap_or_default();
        let request = http_client().post(format!("http://{}/orders", self.addr)).json(order);
        let answer = request.header("authorization", self.issuer.customer_bearer(customer)).send().await?;
        let status = answer.status();
        let body = answer.text().await?;
        if !status.is_success() {
            bail!("POST /orders of {} as {customer} answered {status}: {body}", order["orderId"]);
        }
        Ok(())
    }
}

struct Placed {
    sample: String,
    order_id: String,
    expected: OrderStatus,
    placed_at: f64,
}

/// What a demo run found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Every order reached its expected outcome (and the read side caught up).
    pub ok: bool,
    pub orders: usize,
    /// State transitions of the orders' sagas.
    pub transitions: u64,
}

/// Places the samples plus `extra` happy-path orders through the HTTP API (`POST /orders`, each as
/// its customer), waits for every saga, prints the report.
pub async fn run(
    stack: &Stack,
    dynamodb: &aws_sdk_dynamodb::Client,
    sfn: &aws_sdk_sfn::Client,
    samples: &Path,
    extra: usize,
    api: Option<Api<'_>>,
) -> anyhow::Result<Outcome> {
    let api = api.context("the demo places its orders through the local HTTP API, with tokens of the local issuer")?;
    let env = stack.environment.clone();
    let config = EventStoreConfig::from_vars(&|n: &str| env.get(n).cloned())?;
    let store = DynamoEventStore::new(dynamodb.clone(), config);
    let repo = Repository::new(store.clone());
    let state_machine = stack.outputs.get("OrderSagaArn").context("the stack has no OrderSagaArn output")?.clone();
    let run_id = format!("{:x}", fastrand::u32(..));
    // The scarce SKU is the run's own: stock left by earlier runs on the same tables must not
    // turn the out-of-stock sample into a sale.
    let scarce = format!("{SCARCE_SKU}-{}", run_id.to_uppercase());
    let stock: Vec<(&str, u32)> =
        STOCK.iter().map(|&(sku, n)| if sku == SCARCE_SKU { (scarce.as_str(), n) } else { (sku, n) }).collect();
    restock(&repo, &stock).await?;

    let mut orders: Vec<(String, OrderStatus)> = SAMPLES.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect();
    orders.extend((0..extra).map(|i| (format!("happy-path#{i}"), OrderStatus::Completed)));
    let mut placed = Vec::new();
    let started = now();
    for (sample, expected) in orders {
        let file = sample.split('#').next().unwrap_or(&sample);
        let suffix = sample.split_once('#').map_or(run_id.clone(), |(_, i)| format!("{run_id}-{i}"));
        let mut order = sample_order(samples, file, &suffix)?;
        // The extra orders come from a shop's many customers, not one (whom the per-customer
        // rate limit at POST /orders would turn away after a few dozen).
        if let Some((_, i)) = sample.split_once('#') {
            order["customerId"] = json!(format!("cust-{run_id}-{i}"));
        }
        for line in order["lines"].as_array_mut().into_iter().flatten().filter(|l| l["sku"] == SCARCE_SKU) {
            line["sku"] = json!(scarce);
        }
        let order_id = order["orderId"].as_str().unwrap_or_default().to_owned();
        let placed_at = now();
        // Each as its customer's client places it: POST /orders with their token.
        api.place(&order).await?;
        placed.push(Placed { sample, order_id, expected, placed_at });
    }
    println!("Placed {} orders (run {run_id}); waiting for their sagas…\n", placed.len());

    let mut latencies = Vec::new();
    let mut transitions = 0;
    let mut all_ok = true;
    let mut last_stop = started;
    for p in &placed {
        let finished = wait_for_saga(sfn, &state_machine, &p.order_id, Duration::from_secs(180)).await?;
        latencies.push(finished.stopped_at - p.placed_at);
        last_stop = last_stop.max(finished.stopped_at);
        let history = history(sfn, &finished.execution_arn).await?;
        transitions += observe::transitions(&history);
        let order = repo.load::<Order>(&p.order_id).await?.state;
        let ok = order.status == p.expected;
        all_ok &= ok;
        if p.sample.contains('#') {
            if !ok {
                println!("✗ {} ended {:?}, expected {:?}", p.order_id, order.status, p.expected);
            }
            continue;
        }
        let mark = if ok { "✓" } else { "✗" };
        println!("{mark} {:<20} {:<28} {:?} (saga {})", p.sample, p.order_id, order.status, finished.status);
        if let Some(reason) = &order.cancellation_reason {
            println!("    reason: {reason}");
        }
        if let Some(error) = &finished.error {
            println!("    execution error: {error}");
        }
        println!("    saga steps: {}", saga_steps(&history).join(" → "));
        for category in ["Order", "Payment", "Shipment"] {
            let stream = StreamId::new(category, &p.order_id)?;
            let types: Vec<String> = store.load(&stream, 0).await?.into_iter().map(|e| e.event_type).collect();
            if !types.is_empty() {
                println!("    {category:<8} events: {}", types.join(", "));
            }
        }
    }
    let elapsed = (last_stop - started).max(0.001);
    println!(
        "\n{} orders in {elapsed:.1} s: {:.1} orders/s; placed → saga finished: p50 {:.0} ms, p99 {:.0} ms",
        placed.len(),
        placed.len() as f64 / elapsed,
        quantile(&latencies, 0.5) * 1000.0,
        quantile(&latencies, 0.99) * 1000.0,
    );
    println!(
        "{}",
        if all_ok {
            "Every order reached its expected outcome."
        } else {
            "SOME ORDERS DID NOT REACH THEIR EXPECTED OUTCOME."
        }
    );
    if let Some(happy) = placed.iter().find(|p| p.sample == "happy-path") {
        let ids: Vec<&str> = placed.iter().map(|p| p.order_id.as_str()).collect();
        all_ok &= show_read_side(api, &happy.order_id, &ids).await?;
    }
    Ok(Outcome { ok: all_ok, orders: placed.len(), transitions })
}

/// The query side, read through the HTTP API: once the projections have caught up with the
/// order's streams, its order view and its customer's latest orders.
async fn show_read_side(api: Api<'_>, order_id: &str, all: &[&str]) -> anyhow::Result<bool> {
    println!("\nRead side (through the query API at http://{}, tokens from {}):", api.addr, api.issuer.url());
    let operator = api.issuer.operator_bearer();
    // The projections trail the sagas by the outbox relay's backlog; a minute of no progress at
    // all means they are stuck.
    let began = std::time::Instant::now();
    let mut deadline = began + Duration::from_secs(60);
    let streams = ["Payment", "Shipment"]
        .iter()
        .map(|c| format!("{c}-{order_id}"))
        .chain(all.iter().map(|id| format!("Order-{id}")));
    for stream in streams {
        let mut least_behind = u64::MAX;
        loop {
            let (status, _, body) = api.get(&format!("/streams/{stream}/lag"), Some(&operator)).await?;
            let behind: u64 = body["behind"].as_object().map_or(1, |b| b.values().filter_map(Value::as_u64).sum());
            if status == 200 && behind == 0 {
                break;
            }
            if behind < least_behind {
                least_behind = behind;
                deadline = std::time::Instant::now() + Duration::from_secs(60);
            }
            if std::time::Instant::now() > deadline {
                println!("✗ the read models are still behind for {stream}: {body}");
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!("(caught up with every order {:.1} s after the last saga ended)", began.elapsed().as_secs_f64());
    let (_, _, v) = api.get(&format!("/orders/{order_id}"), Some(&operator)).await?;
    let customer = v["customerId"].as_str().unwrap_or_default().to_owned();
    // Read again as its customer would; another customer finds nothing there.
    let bearer = api.issuer.customer_bearer(&customer);
    let (view, _, v) = api.get(&format!("/orders/{order_id}"), Some(&bearer)).await?;
    println!("GET /orders/{order_id} as {customer} → {view}");
    println!(
        "    status {}, total {} {}, payment {}, shipment {}",
        v["status"], v["totalMinor"], v["currency"], v["paymentId"], v["shipmentId"]
    );
    let timeline: Vec<&str> =
        v["timeline"].as_array().map(|t| t.iter().filter_map(|e| e["event"].as_str()).collect()).unwrap_or_default();
    println!("    timeline: {}", timeline.join(" → "));
    let someone_else = api.issuer.customer_bearer("someone-else");
    let (stranger, _, body) = api.get(&format!("/orders/{order_id}"), Some(&someone_else)).await?;
    println!("GET /orders/{order_id} as someone-else → {stranger} {body}");
    let (anonymous, _, body) = api.get(&format!("/orders/{order_id}"), None).await?;
    println!("GET /orders/{order_id} without a token → {anonymous} {body}");
    let (listing, link, items) = api.get(&format!("/customers/{customer}/orders?limit=5"), Some(&bearer)).await?;
    println!("GET /customers/{customer}/orders?limit=5 as {customer} → {listing}");
    for item in items["items"].as_array().into_iter().flatten() {
        let field = |k: &str| item[k].as_str().unwrap_or_default().to_owned();
        println!("    {} {:<18} {:>6} {}", field("placedAt"), field("status"), item["totalMinor"], field("orderId"));
    }
    if let Some(link) = link {
        println!("    Link: {link}");
    }
    Ok(view == 200 && v["status"] == "Completed" && listing == 200 && stranger == 404 && anonymous == 401)
}

/// Per function, from its invocations' REPORT figures: invocations, cold starts, init p50,
/// duration p50 and p99, the largest max memory used, errors and timeouts.
pub fn function_report(stats: &[FunctionStats]) -> String {
    let mut lines = vec![format!(
        "{:<34} {:>6} {:>5} {:>9} {:>9} {:>9} {:>7} {:>6}",
        "Function (REPORT figures)", "calls", "cold", "init p50", "dur p50", "dur p99", "max MB", "errors"
    )];
    let mut stats: Vec<&FunctionStats> = stats.iter().filter(|s| s.invocations > 0).collect();
    stats.sort_by(|a, b| a.logical_id.cmp(&b.logical_id));
    for s in stats {
        let errors =
            if s.timeouts > 0 { format!("{} ({} timed out)", s.errors, s.timeouts) } else { s.errors.to_string() };
        lines.push(format!(
            "{:<34} {:>6} {:>5} {:>6.1} ms {:>6.1} ms {:>6.1} ms {:>7} {:>6}",
            s.logical_id,
            s.invocations,
            s.cold_starts,
            quantile(&s.init_ms, 0.5),
            quantile(&s.duration_ms, 0.5),
            quantile(&s.duration_ms, 0.99),
            s.max_memory_used_mb,
            errors
        ));
    }
    lines.join("\n")
}
