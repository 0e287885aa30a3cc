//! Provider fault scenarios, replayed against a running system: a burst of happy-path orders
//! while the payment gateway is down for a window (`outage`), answers slowly with a long tail
//! (`slow`) or fails a share of its charges (`flaky`); then each order's outcome and what the
//! provider simulator's ledger says it did, as a table. The local run replays them
//! (`local-env run --demo --scenario outage`), and the resilience benchmark
//! (`tests/bench/resilience.rs`) runs the outage with the patterns on and off, side by side.
//!
//! The ledger is the ground truth: "charged twice" counts orders with more than one successful
//! charge on the provider's side, whatever our own events say.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use aws_sdk_sfn::types::HistoryEventType;
use futures::StreamExt;
use serde_json::{Value, json};
use shared::adapters::dynamodb::DynamoBreakerStore;
use shared::adapters::dynamodb::{DynamoEventStore, EventStoreConfig};
use shared::aggregate::Repository;
use shared::domain::order::{Order, OrderStatus};
use shared::resilience::breaker::BreakerStore;

use crate::Stack;
use crate::demo::{Api, STOCK, restock, sample_order};
use crate::observe::{self, history, quantile, wait_for_saga};

/// The breaker the charge and refund steps share (`shared::adapters::providers`).
pub const PAYMENT_BREAKER: &str = "payment-gateway";

/// The resilience patterns on, tuned for a short run (as `tests/resilience.rs`): the breaker
/// opens after 3 failures in 10 s and probes after 4 s; parked payments retry every 2 s when no
/// breaker says when, for up to 10 minutes; hedged requests.
pub const PATTERNS_ON: &[(&str, &str)] = &[
    ("BreakerFailureThreshold", "3"),
    ("BreakerWindowSeconds", "10"),
    ("BreakerRecoverySeconds", "4"),
    ("PaymentRetrySeconds", "2"),
    ("PaymentParkingLimitSeconds", "600"),
    ("ProviderHedging", "on"),
];

/// The patterns off: no breaker, no parking (the first unavailability fails the charge and the
/// order is compensated), no hedging. Timeouts and the state machine's retries stay.
pub const PATTERNS_OFF: &[(&str, &str)] =
    &[("BreakerFailureThreshold", "0"), ("PaymentParkingLimitSeconds", "0"), ("ProviderHedging", "off")];

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// The payment gateway (charges and refunds) answers 503 for `seconds`, then recovers.
    Outage { seconds: f64 },
    /// Charges answer after a log-normal latency with these percentiles (ms).
    Slow { p50_ms: f64, p99_ms: f64 },
    /// This share of charges fails (503).
    Flaky { error_rate: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scenario {
    pub fault: Fault,
    /// Happy-path orders placed at once, each for its own customer.
    pub orders: usize,
    /// How long every saga may take to end, counted from the outage's end (or the burst).
    pub settle: Duration,
}

impl Scenario {
    pub const NAMES: [&str; 3] = ["outage", "slow", "flaky"];

    pub fn outage(orders: usize, seconds: f64) -> Self {
        Self { fault: Fault::Outage { seconds }, orders, settle: Duration::from_secs(240) }
    }

    pub fn slow(orders: usize) -> Self {
        Self { fault: Fault::Slow { p50_ms: 300.0, p99_ms: 2500.0 }, orders, settle: Duration::from_secs(240) }
    }

    pub fn flaky(orders: usize) -> Self {
        Self { fault: Fault::Flaky { error_rate: 0.3 }, orders, settle: Duration::from_secs(240) }
    }

    /// `outage`, `slow` or `flaky`, with `orders` (or the scenario's default burst) and, for an
    /// outage, `seconds` of it (default 30).
    pub fn named(name: &str, orders: Option<usize>, seconds: Option<f64>) -> anyhow::Result<Self> {
        Ok(match name {
            "outage" => Self::outage(orders.unwrap_or(30), seconds.unwrap_or(30.0)),
            "slow" => Self::slow(orders.unwrap_or(20)),
            "flaky" => Self::flaky(orders.unwrap_or(20)),
            other => bail!("unknown scenario {other} (one of {})", Self::NAMES.join(", ")),
        })
    }

    pub fn name(&self) -> &'static str {
        match self.fault {
            Fault::Outage { .. } => "outage",
            Fault::Slow { .. } => "slow",
            Fault::Flaky { .. } => "flaky",
        }
    }

    /// What the fault is, in words.
    pub fn describe(&self) -> String {
        match self.fault {
            Fault::Outage { seconds } => {
                format!("{} orders placed as the payment gateway goes down (503s) for {seconds:.0} s", self.orders)
            }
            Fault::Slow { p50_ms, p99_ms } => {
                format!("{} orders; charges answer slowly: p50 {p50_ms:.0} ms, p99 {p99_ms:.0} ms", self.orders)
            }
            Fault::Flaky { error_rate } => {
                format!("{} orders; {:.0}% of charges fail (503)", self.orders, error_rate * 100.0)
            }
        }
    }

    /// The simulator behaviour (`PUT /control/behaviour`).
    pub fn behaviour(&self) -> Value {
        match self.fault {
            Fault::Outage { seconds } => {
                json!({ "service": "payments", "outage": { "seconds": seconds, "mode": "unavailable" } })
            }
            Fault::Slow { p50_ms, p99_ms } => {
                json!({ "service": "payments", "operation": "charge", "latencyMs": { "p50": p50_ms, "p99": p99_ms } })
            }
            Fault::Flaky { error_rate } => {
                json!({ "service": "payments", "operation": "charge", "errorRate": error_rate })
            }
        }
    }
}

/// The running system a scenario is played against.
pub struct Target<'a> {
    pub stack: &'a Stack,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub sfn: aws_sdk_sfn::Client,
    /// The provider simulator the stack's provider URLs point at.
    pub simulator: SocketAddr,
    /// The HTTP API the orders are placed through, and the issuer of their customers' tokens.
    pub api: Option<Api<'a>>,
    /// `events/place-order/`.
    pub samples: PathBuf,
}

/// One order's end.
#[derive(Debug, Clone)]
pub struct OrderRun {
    pub order_id: String,
    pub placed_at: f64,
    /// When its saga ended (seconds since the epoch), if it did.
    pub ended_at: Option<f64>,
    /// The order's status then (`None`: no order, or the saga did not end).
    pub status: Option<OrderStatus>,
    /// ChargePayment states the saga entered (more than one: it was parked, or retried).
    pub charge_steps: usize,
    /// Successful charges and refunds on the provider's side (its ledger).
    pub charges: usize,
    pub refunds: usize,
}

/// What a scenario run found.
#[derive(Debug, Clone)]
pub struct Report {
    /// A column's name: "patterns on", say.
    pub label: String,
    pub scenario: Scenario,
    /// The fault began (seconds since the epoch) and, for an outage, ended.
    pub fault_started: f64,
    pub outage_ended: Option<f64>,
    pub orders: Vec<OrderRun>,
    /// Calls the provider received, and answers it replayed for a repeated key, per operation.
    pub calls: BTreeMap<String, u64>,
    pub replayed: BTreeMap<String, u64>,
    /// The payment breaker's transitions during the run: from, to, seconds after the fault began.
    pub breaker: Vec<(String, String, f64)>,
    /// State transitions of the orders' sagas (Step Functions bills per transition).
    pub transitions: u64,
}

impl Report {
    fn count(&self, status: OrderStatus) -> usize {
        self.orders.iter().filter(|o| o.status == Some(status)).count()
    }

    pub fn completed(&self) -> usize {
        self.count(OrderStatus::Completed)
    }

    pub fn cancelled(&self) -> usize {
        self.count(OrderStatus::Cancelled)
    }

    pub fn flagged(&self) -> usize {
        self.count(OrderStatus::NeedsManualAction)
    }

    /// Orders whose saga did not end (or that were not placed): lost, as far as the shop knows.
    pub fn not_terminal(&self) -> usize {
        self.scenario.orders - self.completed() - self.cancelled() - self.flagged()
    }

    pub fn charged_twice(&self) -> usize {
        self.orders.iter().filter(|o| o.charges > 1).count()
    }

    pub fn refunds(&self) -> usize {
        self.orders.iter().map(|o| o.refunds).sum()
    }

    /// Each ended order's end, in seconds after the outage's end (negative: before it).
    pub fn after_recovery(&self) -> Vec<f64> {
        let Some(end) = self.outage_ended else { return Vec::new() };
        self.orders.iter().filter_map(|o| o.ended_at).map(|t| t - end).collect()
    }

    /// Each ended order's time from placed to saga ended, in seconds.
    pub fn placed_to_finished(&self) -> Vec<f64> {
        self.orders.iter().filter_map(|o| o.ended_at.map(|t| t - o.placed_at)).collect()
    }

    /// Every order completed, none charged twice: nothing was lost, double-charged, cancelled
    /// or flagged because of the fault.
    pub fn ok(&self) -> bool {
        self.completed() == self.scenario.orders && self.charged_twice() == 0
    }

    /// The breaker opened at least once and is closed again at the end.
    pub fn breaker_opened_and_closed(&self) -> bool {
        self.breaker.iter().any(|(_, to, _)| to == "open")
            && self.breaker.last().is_some_and(|(_, to, _)| to == "closed")
    }

    /// What went wrong, one line an order.
    pub fn problems(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for o in &self.orders {
            if o.charges > 1 {
                lines.push(format!("{}: charged {} times (ledger)", o.order_id, o.charges));
            }
            match o.status {
                Some(OrderStatus::Completed) => {}
                Some(status) if o.ended_at.is_some() => lines.push(format!("{}: ended {status:?}", o.order_id)),
                Some(status) => lines.push(format!("{}: saga did not end ({status:?})", o.order_id)),
                None => lines.push(format!("{}: lost (no order, or its saga did not end)", o.order_id)),
            }
        }
        lines
    }
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

async fn control(addr: SocketAddr, method: &str, target: &str, body: Option<&Value>) -> anyhow::Result<Value> {
    let method = reqwest::Method::from_bytes(method.as_bytes())?;
    let request = crate::http_client().request(method.clone(), format!("http://{addr}{target}"));
    let answer = match body {
        Some(body) => request.json(body),
        None => request,
    };
    let answer =
        answer.send().await.with_context(|| format!("{method} {target} on the provider simulator at {addr}"))?;
    let (status, text) = (answer.status(), answer.text().await?);
    if !status.is_success() {
        bail!("{method} {target}: {status} {text}");
    }
    if text.trim().is_empty() { Ok(Value::Null) } else { Ok(serde_json::from_str(&text)?) }
}

/// Plays `scenario` against `target`: sets the fault on the simulator, places the burst, waits
/// for every saga (or `scenario.settle` past the outage), puts the simulator back to normal, and
/// reads the outcome from the orders, the sagas, the ledger and the breaker's history.
pub async fn run(target: &Target<'_>, scenario: &Scenario, label: &str) -> anyhow::Result<Report> {
    let env = target.stack.environment.clone();
    let config = EventStoreConfig::from_vars(&|n: &str| env.get(n).cloned())?;
    let repo = Repository::new(DynamoEventStore::new(target.dynamodb.clone(), config));
    let state_machine = target.stack.outputs.get("OrderSagaArn").context("the stack has no OrderSagaArn output")?;
    let api = target.api.context("the scenarios place orders through the local HTTP API and its issuer")?;
    restock(&repo, STOCK).await?;
    // Every order id, so every idempotency key, carries the run's tag: the ledger's `contains`
    // filter gives this run's entries and calls, whatever else the simulator served.
    let tag = format!("{}{:08x}", scenario.name(), fastrand::u32(..));
    let mut orders = Vec::new();
    for i in 0..scenario.orders {
        let mut order = sample_order(&target.samples, "happy-path", &format!("{tag}-{i}"))?;
        // A shop's many customers: the per-customer rate limit is not what is exercised.
        order["customerId"] = json!(format!("cust-{tag}-{i}"));
        orders.push(order);
    }

    control(target.simulator, "PUT", "/control/behaviour", Some(&scenario.behaviour())).await?;
    let fault_started = now();
    let outage_ended = match scenario.fault {
        Fault::Outage { seconds } => Some(fault_started + seconds),
        _ => None,
    };
    // The burst: placed at once (a few at a time), as a peak's orders arrive.
    let placed: Vec<(String, f64, anyhow::Result<()>)> = futures::stream::iter(orders)
        .map(|order| async move {
            let id = order["orderId"].as_str().unwrap_or_default().to_owned();
            let placed_at = now();
            (id, placed_at, api.place(&order).await)
        })
        .buffered(8)
        .collect()
        .await;

    let deadline = outage_ended.unwrap_or_else(now).max(now()) + scenario.settle.as_secs_f64();
    let mut runs = Vec::new();
    let mut transitions = 0;
    for (order_id, placed_at, result) in placed {
        let mut run =
            OrderRun { order_id, placed_at, ended_at: None, status: None, charge_steps: 0, charges: 0, refunds: 0 };
        if let Err(e) = result {
            eprintln!("scenario {}: {e:#}", scenario.name());
            runs.push(run);
            continue;
        }
        let wait = Duration::from_secs_f64((deadline - now()).max(1.0));
        if let Ok(finished) = wait_for_saga(&target.sfn, state_machine, &run.order_id, wait).await {
            run.ended_at = Some(finished.stopped_at);
            let events = history(&target.sfn, &finished.execution_arn).await?;
            transitions += observe::transitions(&events);
            run.charge_steps = events
                .iter()
                .filter(|e| *e.r#type() == HistoryEventType::TaskStateEntered)
                .filter(|e| e.state_entered_event_details().is_some_and(|d| d.name() == "ChargePayment"))
                .count();
        }
        run.status = repo.load::<Order>(&run.order_id).await.ok().map(|o| o.state.status);
        runs.push(run);
    }
    control(target.simulator, "DELETE", "/control/behaviour", None).await?;

    // The provider's side: its effects per order, and the calls it received.
    let ledger = control(target.simulator, "GET", &format!("/control/ledger?contains={tag}"), None).await?;
    let succeeded =
        |e: &&Value, operation: &str| e["operation"] == operation && e["status"].as_u64().is_some_and(|s| s < 300);
    for entry in ledger["entries"].as_array().into_iter().flatten() {
        let key = entry["idempotencyKey"].as_str().unwrap_or_default();
        // The longest id the key contains (`…-1` is also in `…-12`).
        let Some(run) = runs.iter_mut().filter(|r| key.contains(&r.order_id)).max_by_key(|r| r.order_id.len()) else {
            continue;
        };
        if succeeded(&entry, "charge") {
            run.charges += 1;
        }
        if succeeded(&entry, "refund") {
            run.refunds += 1;
        }
    }
    let counts = |field: &str| -> BTreeMap<String, u64> {
        ledger[field].as_object().into_iter().flatten().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect()
    };

    // The payment breaker's transitions since the fault began (a provisioned stack keeps older ones).
    let mut breaker = Vec::new();
    if let Some(table) = target.stack.environment.get("COMMANDS_TABLE") {
        let store = DynamoBreakerStore::new(target.dynamodb.clone(), table.clone());
        let since_ms = ((fault_started - 1.0) * 1000.0) as u64;
        for t in store.history(PAYMENT_BREAKER, 500).await.map_err(|e| anyhow::anyhow!("{e}"))? {
            if t.at_ms >= since_ms {
                let at = t.at_ms as f64 / 1000.0 - fault_started;
                breaker.push((t.from.as_str().to_owned(), t.to.as_str().to_owned(), at));
            }
        }
    }
    Ok(Report {
        label: label.to_owned(),
        scenario: *scenario,
        fault_started,
        outage_ended,
        orders: runs,
        calls: counts("calls"),
        replayed: counts("duplicates"),
        breaker,
        transitions,
    })
}

fn seconds(values: &[f64], q: f64) -> Option<String> {
    (!values.is_empty()).then(|| format!("{:.1}", quantile(values, q)))
}

fn max(values: &[f64]) -> Option<String> {
    values.iter().copied().reduce(f64::max).map(|m| format!("{m:.1}"))
}

/// The reports side by side, one column each, under `title`; then each one's breaker
/// transitions. A row none of them has a figure for is left out.
pub fn table(title: &str, reports: &[&Report]) -> String {
    type Cell = fn(&Report) -> Option<String>;
    let some = |n: usize| Some(n.to_string());
    let mut rows: Vec<(String, Vec<Option<String>>)> = Vec::new();
    let mut row = |name: &str, cell: &dyn Fn(&Report) -> Option<String>| {
        rows.push((name.to_owned(), reports.iter().map(|r| cell(r)).collect()));
    };
    row("orders placed", &|r: &Report| some(r.scenario.orders));
    row("completed", &|r: &Report| some(r.completed()));
    row("cancelled", &|r: &Report| some(r.cancelled()));
    row("flagged (manual action)", &|r: &Report| some(r.flagged()));
    row("not terminal (lost)", &|r: &Report| some(r.not_terminal()));
    row("charged twice (ledger)", &|r: &Report| some(r.charged_twice()));
    row("refunds made (ledger)", &|r: &Report| some(r.refunds()));
    let after: [(&str, Cell); 3] = [
        ("ended after recovery p50 s", |r| seconds(&r.after_recovery(), 0.5)),
        ("ended after recovery p99 s", |r| seconds(&r.after_recovery(), 0.99)),
        ("ended after recovery max s", |r| max(&r.after_recovery())),
    ];
    for (name, cell) in after {
        row(name, &cell);
    }
    row("placed → finished p50 s", &|r: &Report| seconds(&r.placed_to_finished(), 0.5));
    row("placed → finished p99 s", &|r: &Report| seconds(&r.placed_to_finished(), 0.99));
    row("charge steps per order max", &|r: &Report| {
        r.orders.iter().map(|o| o.charge_steps).max().map(|m| m.to_string())
    });
    let operations: Vec<String> = {
        let mut names: Vec<String> = reports.iter().flat_map(|r| r.calls.keys().cloned()).collect();
        names.sort();
        names.dedup();
        names
    };
    for op in &operations {
        let op = op.clone();
        rows.push((
            format!("provider calls: {op}"),
            reports.iter().map(|r| r.calls.get(&op).map(u64::to_string)).collect(),
        ));
    }
    for op in &operations {
        let op = op.clone();
        let replayed: Vec<Option<String>> =
            reports.iter().map(|r| r.replayed.get(&op).filter(|n| **n > 0).map(u64::to_string)).collect();
        rows.push((format!("  answers replayed: {op}"), replayed));
    }
    rows.push(("breaker transitions".to_owned(), reports.iter().map(|r| some(r.breaker.len())).collect()));
    rows.retain(|(_, cells)| cells.iter().any(Option::is_some));

    let width = reports.iter().map(|r| r.label.chars().count()).max().unwrap_or(0).max(12);
    let mut out = String::new();
    let _ = writeln!(out, "{title}");
    let _ = write!(out, "{:<30}", "");
    for r in reports {
        let _ = write!(out, " {:>width$}", r.label);
    }
    out.push('\n');
    for (name, cells) in rows {
        let _ = write!(out, "{name:<30}");
        for cell in cells {
            let _ = write!(out, " {:>width$}", cell.as_deref().unwrap_or("–"));
        }
        out.push('\n');
    }
    for r in reports {
        let moves: Vec<String> = r.breaker.iter().map(|(from, to, at)| format!("{from}→{to} at {at:+.1} s")).collect();
        let moves = if moves.is_empty() { "none".to_owned() } else { moves.join(", ") };
        let _ = writeln!(out, "breaker ({}): {moves}", r.label);
    }
    out.truncate(out.trim_end().len());
    out
}
