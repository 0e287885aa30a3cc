//! The operations section at the end of the local run's report: the dead letters the run left
//! (by status, by source queue, the parked ones with the command to act on them) and the stack's
//! alarms (how many in each state; those in ALARM by name, with CloudWatch's reason).
//!
//! [`gather`] reads them while the system still runs (the dead letters view is eventually
//! consistent: it waits, bounded, until two reads agree); [`render`] turns plain data into text.
//! It reports only: parked dead letters do not fail the run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shared::adapters::dynamodb::readmodels::ReadModelStore;
use shared::domain::dead_letter::Status;
use shared::readmodel::dead_letters::DeadLetterView;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::Stack;

/// The operator's tool, as a command line to paste.
pub const OPS: &str = "cargo run -p ops -- --env-file .local/aws.env";
/// Parked dead letters listed one by one; the rest are counted.
pub const PARKED_LISTED: usize = 10;
/// How much of a reason is shown.
pub const REASON_CHARS: usize = 100;
/// How many dead letters are read at most.
pub const READ_LIMIT: usize = 1000;
/// How long [`gather`] waits for the dead letters view to settle, and how often it reads it.
pub const SETTLE: Duration = Duration::from_secs(6);
pub const SETTLE_POLL: Duration = Duration::from_millis(500);

/// One alarm of the stack and its state as CloudWatch has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmState {
    pub name: String,
    /// `OK`, `ALARM`, `INSUFFICIENT_DATA`; `NOT FOUND` when CloudWatch does not have it.
    pub state: String,
    pub reason: String,
}

/// What the section shows.
#[derive(Debug, Clone)]
pub struct Operations {
    pub stack_name: String,
    /// The dead letters this run recorded or acted on (or every one when the run's start is not
    /// known), or why they could not be read.
    pub dead_letters: Result<Vec<DeadLetterView>, String>,
    /// Dead letters from earlier runs still waiting (pending or parked).
    pub earlier_open: Vec<DeadLetterView>,
    /// The view stopped changing before the reads gave up waiting.
    pub settled: bool,
    pub alarms: Result<Vec<AlarmState>, String>,
    /// The stack's `OrderSaga` metrics over the run, or why they could not be read.
    pub metrics: Result<Vec<MetricValue>, String>,
}

/// One metric (name and dimensions other than `Service`) over the run.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricValue {
    pub name: String,
    /// `Step=ChargePayment`, say; empty for none.
    pub dimensions: String,
    pub sum: f64,
    pub samples: f64,
    pub maximum: f64,
}

/// A queue's name from its ARN (or URL), without the stack's prefix.
pub fn queue_name<'a>(arn: &'a str, stack_name: &str) -> &'a str {
    let name = arn.rsplit([':', '/']).next().unwrap_or(arn);
    let name = name.strip_prefix(stack_name).and_then(|n| n.strip_prefix('-')).unwrap_or(name);
    if name.is_empty() { "(unknown queue)" } else { name }
}

/// `text` on one line, at most `max` characters (an ellipsis marks a cut).
pub fn truncate(text: &str, max: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The dead letter was recorded, returned or acted on at or after `since`.
pub fn touched_since(view: &DeadLetterView, since: OffsetDateTime) -> bool {
    let after = |at: &str| OffsetDateTime::parse(at, &Rfc3339).map_or(true, |t| t >= since);
    after(&view.last_seen) || view.history.iter().any(|h| after(&h.at))
}

/// The lifecycle's order, for counts; a status not named here comes last.
const STATUS_ORDER: [Status; 5] =
    [Status::Pending, Status::Redriven, Status::Parked, Status::Discarded, Status::Resolved];

fn status_order(status: Status) -> usize {
    STATUS_ORDER.iter().position(|s| *s == status).unwrap_or(STATUS_ORDER.len())
}

/// "parked 2, resolved 1", in the lifecycle's order.
fn by_status<'a>(views: impl IntoIterator<Item = &'a DeadLetterView>) -> String {
    let mut counts: BTreeMap<(usize, &str), usize> = BTreeMap::new();
    for v in views {
        *counts.entry((status_order(v.status), v.status.as_str())).or_default() += 1;
    }
    counts.iter().map(|((_, s), n)| format!("{s} {n}")).collect::<Vec<_>>().join(", ")
}

fn failure(view: &DeadLetterView) -> String {
    view.failure
        .and_then(|f| serde_json::to_value(f).ok())
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// The section's text.
pub fn render(ops: &Operations) -> String {
    let mut lines = vec!["Operations:".to_owned()];
    let alarms_line = |alarms: &[AlarmState]| {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for a in alarms {
            *counts.entry(a.state.as_str()).or_default() += 1;
        }
        let order = |s: &str| match s {
            "OK" => 0,
            "ALARM" => 1,
            "INSUFFICIENT_DATA" => 2,
            _ => 3,
        };
        let mut counts: Vec<(&str, usize)> = counts.into_iter().collect();
        counts.sort_by_key(|(s, _)| order(s));
        counts.iter().map(|(s, n)| format!("{n} {s}")).collect::<Vec<_>>().join(", ")
    };
    let quiet_alarms = match &ops.alarms {
        Ok(alarms) if alarms.iter().all(|a| a.state == "OK") => Some(format!("all {} alarms OK", alarms.len())),
        Ok(alarms) if alarms.iter().all(|a| a.state == "OK" || a.state == "INSUFFICIENT_DATA") => {
            Some(format!("no alarm in ALARM ({})", alarms_line(alarms)))
        }
        _ => None,
    };
    let unsettled = "  (the dead letters view was still changing when the report was read)";

    match (&ops.dead_letters, &quiet_alarms) {
        (Ok(views), Some(alarms)) if views.is_empty() => {
            lines.push(format!("  no dead letters; {alarms}"));
            if !ops.settled {
                lines.push(unsettled.into());
            }
        }
        _ => {
            match &ops.dead_letters {
                Err(e) => lines.push(format!("  dead letters: could not read them: {e}")),
                Ok(views) if views.is_empty() => lines.push("  dead letters: none".into()),
                Ok(views) => {
                    lines.push(format!("  dead letters: {} ({})", views.len(), by_status(views)));
                    let mut queues: BTreeMap<&str, Vec<&DeadLetterView>> = BTreeMap::new();
                    for v in views {
                        queues.entry(queue_name(&v.dead_letter_queue, &ops.stack_name)).or_default().push(v);
                    }
                    let queues: Vec<String> = queues
                        .iter()
                        .map(|(q, vs)| format!("{q} {} ({})", vs.len(), by_status(vs.iter().copied())))
                        .collect();
                    lines.push(format!("    by queue: {}", queues.join(", ")));
                    let parked: Vec<&DeadLetterView> = views.iter().filter(|v| v.status == Status::Parked).collect();
                    if !parked.is_empty() {
                        lines.push("    parked (waiting for a person):".into());
                    }
                    for v in parked.iter().take(PARKED_LISTED) {
                        lines.push(format!(
                            "      {}  {}  {}: {}",
                            v.dead_letter_id,
                            queue_name(&v.dead_letter_queue, &ops.stack_name),
                            failure(v),
                            truncate(&v.reason, REASON_CHARS)
                        ));
                        lines.push(format!("        {OPS} dead-letters show {}", v.dead_letter_id));
                    }
                    if parked.len() > PARKED_LISTED {
                        lines.push(format!(
                            "      … and {} more: {OPS} dead-letters list --status parked",
                            parked.len() - PARKED_LISTED
                        ));
                    }
                }
            }
            if !ops.settled && ops.dead_letters.is_ok() {
                lines.push(unsettled.into());
            }
            match &ops.alarms {
                Err(e) => lines.push(format!("  alarms: could not read them: {e}")),
                Ok(alarms) if alarms.is_empty() => lines.push("  alarms: the stack has none".into()),
                Ok(alarms) => {
                    match &quiet_alarms {
                        Some(quiet) => lines.push(format!("  alarms: {quiet}")),
                        None => lines.push(format!("  alarms: {} ({})", alarms.len(), alarms_line(alarms))),
                    }
                    for a in alarms.iter().filter(|a| a.state == "ALARM") {
                        lines.push(format!("    ALARM {}: {}", a.name, truncate(&a.reason, 2 * REASON_CHARS)));
                    }
                    for a in alarms.iter().filter(|a| a.state == "NOT FOUND") {
                        lines.push(format!("    {} is not on CloudWatch (provision again?)", a.name));
                    }
                }
            }
        }
    }
    if !ops.earlier_open.is_empty() {
        lines.push(format!(
            "  from earlier runs, still open: {} ({}): {OPS} dead-letters list --status parked",
            ops.earlier_open.len(),
            by_status(&ops.earlier_open)
        ));
    }
    lines.extend(render_metrics(&ops.metrics));
    lines.join("\n")
}

async fn read_dead_letters(store: &ReadModelStore) -> Result<Vec<DeadLetterView>, String> {
    store.dead_letters(None, READ_LIMIT).await.map_err(|e| e.to_string())
}

/// The metrics lines: counts as sums, milliseconds as average and maximum over their samples.
fn render_metrics(metrics: &Result<Vec<MetricValue>, String>) -> Vec<String> {
    let values = match metrics {
        Err(e) => return vec![format!("  metrics: could not read them: {e}")],
        Ok(values) if values.is_empty() => return vec!["  metrics: none recorded for this stack".into()],
        Ok(values) => values,
    };
    let mut lines = vec![format!("  metrics ({NAMESPACE}, this run):")];
    for v in values {
        let name = if v.dimensions.is_empty() { v.name.clone() } else { format!("{} {}", v.name, v.dimensions) };
        let value = if matches!(v.name.as_str(), "SagaDuration" | "StepLatency" | "ProviderLatency") {
            let average = if v.samples > 0.0 { v.sum / v.samples } else { 0.0 };
            format!("{} samples, avg {average:.0} ms, max {:.0} ms", v.samples, v.maximum)
        } else {
            format!("{}", v.sum)
        };
        lines.push(format!("    {name:<48} {value}"));
    }
    lines
}

const NAMESPACE: &str = "OrderSaga";

/// The stack's metrics since `since`: every metric whose `Service` is one of its functions.
pub async fn metrics(
    stack: &Stack,
    client: &aws_sdk_cloudwatch::Client,
    since: OffsetDateTime,
) -> Result<Vec<MetricValue>, String> {
    use aws_sdk_cloudwatch::primitives::DateTime;
    use aws_sdk_cloudwatch::types::Statistic;
    let error = |e: &dyn std::fmt::Display| e.to_string();
    let prefix = format!("{}-", stack.stack_name);
    let mut listed = Vec::new();
    let mut token = None;
    loop {
        let page = client
            .list_metrics()
            .namespace(NAMESPACE)
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| error(&aws_sdk_cloudwatch::error::DisplayErrorContext(&e)))?;
        listed.extend(page.metrics.unwrap_or_default());
        token = page.next_token;
        if token.is_none() {
            break;
        }
    }
    let (start, end) = (since - time::Duration::minutes(1), OffsetDateTime::now_utc() + time::Duration::minutes(1));
    // One period over the whole run, in whole minutes.
    let period = ((end - start).whole_seconds().max(60) + 59) / 60 * 60;
    let mut values = Vec::new();
    for metric in listed {
        let dimensions = metric.dimensions();
        if !dimensions.iter().any(|d| d.name() == Some("Service") && d.value().is_some_and(|v| v.starts_with(&prefix)))
        {
            continue;
        }
        let name = metric.metric_name().unwrap_or_default().to_owned();
        let stats = client
            .get_metric_statistics()
            .namespace(NAMESPACE)
            .metric_name(&name)
            .set_dimensions(Some(dimensions.to_vec()))
            .start_time(DateTime::from_secs(start.unix_timestamp()))
            .end_time(DateTime::from_secs(end.unix_timestamp()))
            .period(period as i32)
            .statistics(Statistic::Sum)
            .statistics(Statistic::SampleCount)
            .statistics(Statistic::Maximum)
            .send()
            .await
            .map_err(|e| error(&aws_sdk_cloudwatch::error::DisplayErrorContext(&e)))?;
        let points = stats.datapoints();
        if points.is_empty() {
            continue;
        }
        let total =
            |f: fn(&aws_sdk_cloudwatch::types::Datapoint) -> Option<f64>| points.iter().filter_map(f).sum::<f64>();
        let maximum = points.iter().filter_map(|p| p.maximum()).fold(0.0, f64::max);
        let extra: Vec<String> = dimensions
            .iter()
            .filter(|d| d.name() != Some("Service"))
            .map(|d| format!("{}={}", d.name().unwrap_or_default(), d.value().unwrap_or_default()))
            .collect();
        let value = MetricValue {
            name,
            dimensions: extra.join(","),
            sum: total(|p| p.sum()),
            samples: total(|p| p.sample_count()),
            maximum,
        };
        // One value per name and dimensions: the same metric from several functions adds up.
        match values.iter_mut().find(|v: &&mut MetricValue| v.name == value.name && v.dimensions == value.dimensions) {
            Some(known) => {
                known.sum += value.sum;
                known.samples += value.samples;
                known.maximum = known.maximum.max(value.maximum);
            }
            None => values.push(value),
        }
    }
    values.sort_by(|a, b| (&a.name, &a.dimensions).cmp(&(&b.name, &b.dimensions)));
    Ok(values)
}

/// Reads the dead letters (waiting, bounded, until two reads agree) and the stack's alarms.
/// Dead letters seen or acted on since `run_started` are this run's; the tables outlive runs.
pub async fn gather(stack: &Stack, sdk: &aws_config::SdkConfig, run_started: OffsetDateTime) -> Operations {
    let (dead_letters, settled) = match stack.environment.get("READ_MODEL_TABLE") {
        None => (Err("the stack has no READ_MODEL_TABLE".to_owned()), true),
        Some(table) => {
            let store = ReadModelStore::new(aws_sdk_dynamodb::Client::new(sdk), table.clone());
            let deadline = Instant::now() + SETTLE;
            let mut last = read_dead_letters(&store).await;
            loop {
                if last.is_err() {
                    break (last, true);
                }
                if Instant::now() + SETTLE_POLL > deadline {
                    break (last, false);
                }
                tokio::time::sleep(SETTLE_POLL).await;
                let next = read_dead_letters(&store).await;
                if next == last {
                    break (next, true);
                }
                last = next;
            }
        }
    };
    let (dead_letters, earlier_open) = match dead_letters {
        Ok(views) => {
            let (this_run, earlier): (Vec<_>, Vec<_>) = views.into_iter().partition(|v| touched_since(v, run_started));
            let open = earlier.into_iter().filter(|v| matches!(v.status, Status::Pending | Status::Parked)).collect();
            (Ok(this_run), open)
        }
        other => (other, Vec::new()),
    };
    let cloudwatch = crate::lambda::emf::cloudwatch_client(aws_sdk_cloudwatch::config::Builder::from(sdk));
    let alarms = alarms(stack, &cloudwatch).await;
    let metrics = metrics(stack, &cloudwatch, run_started).await;
    Operations { stack_name: stack.stack_name.clone(), dead_letters, earlier_open, settled, alarms, metrics }
}

/// The state of every alarm the provisioner created for the stack.
pub async fn alarms(stack: &Stack, client: &aws_sdk_cloudwatch::Client) -> Result<Vec<AlarmState>, String> {
    let names: Vec<&String> = stack
        .outcomes
        .iter()
        .filter(|o| o.kind == "AWS::CloudWatch::Alarm")
        .filter(|o| !matches!(o.status, crate::Status::Skipped(_) | crate::Status::Failed(_)))
        .filter_map(|o| o.physical_id.as_ref())
        .collect();
    let mut found = BTreeMap::new();
    for chunk in names.chunks(100) {
        let mut pages = client
            .describe_alarms()
            .set_alarm_names(Some(chunk.iter().map(|n| (*n).clone()).collect()))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| aws_sdk_cloudwatch::error::DisplayErrorContext(&e).to_string())?;
            for a in page.metric_alarms() {
                let state = a.state_value().map_or("UNKNOWN", |s| s.as_str()).to_owned();
                let reason = a.state_reason().unwrap_or_default().to_owned();
                found.insert(a.alarm_name().unwrap_or_default().to_owned(), (state, reason));
            }
        }
    }
    Ok(names
        .into_iter()
        .map(|name| {
            let (state, reason) = found.remove(name).unwrap_or_else(|| ("NOT FOUND".into(), String::new()));
            AlarmState { name: name.clone(), state, reason }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use shared::domain::dead_letter::Failure;
    use shared::readmodel::dead_letters::HistoryEntry;

    use super::*;

    const DLQ: &str = "arn:aws:sqs:us-east-1:000000000000:order-saga-";

    fn dead_letter(id: &str, queue: &str, status: Status, reason: &str) -> DeadLetterView {
        DeadLetterView {
            dead_letter_id: id.into(),
            status,
            failure: Some(Failure::Poison),
            dead_letter_queue: format!("{DLQ}{queue}"),
            reason: reason.into(),
            last_seen: "2025-01-02T10:00:00.000000Z".into(),
            ..DeadLetterView::default()
        }
    }

    fn alarm(name: &str, state: &str, reason: &str) -> AlarmState {
        AlarmState { name: format!("order-saga-{name}"), state: state.into(), reason: reason.into() }
    }

    fn ops(dead_letters: Vec<DeadLetterView>, alarms: Vec<AlarmState>) -> Operations {
        Operations {
            stack_name: "order-saga".into(),
            dead_letters: Ok(dead_letters),
            earlier_open: Vec::new(),
            settled: true,
            alarms: Ok(alarms),
            metrics: Ok(Vec::new()),
        }
    }

    #[test]
    fn metrics_are_sums_for_counts_and_average_and_maximum_for_milliseconds() {
        let value = |name: &str, dimensions: &str, sum: f64, samples: f64, maximum: f64| MetricValue {
            name: name.into(),
            dimensions: dimensions.into(),
            sum,
            samples,
            maximum,
        };
        let mut o = ops(vec![], vec![]);
        o.metrics = Ok(vec![
            value("OrdersCompleted", "", 8.0, 8.0, 1.0),
            value("SagaDuration", "Outcome=Completed", 80_000.0, 8.0, 14_000.0),
        ]);
        let text = render(&o);
        assert!(text.contains("metrics (OrderSaga, this run):"), "{text}");
        assert!(text.lines().any(|l| l.trim_start().starts_with("OrdersCompleted") && l.ends_with(" 8")), "{text}");
        assert!(
            text.contains("SagaDuration Outcome=Completed") && text.contains("8 samples, avg 10000 ms, max 14000 ms")
        );
        o.metrics = Err("refused".into());
        assert!(render(&o).ends_with("  metrics: could not read them: refused"));
    }

    #[test]
    fn nothing_wrong_is_one_line() {
        let text = render(&ops(vec![], vec![alarm("ADlqDepthAlarm", "OK", ""), alarm("BDlqDepthAlarm", "OK", "")]));
        assert_eq!(text, "Operations:\n  no dead letters; all 2 alarms OK\n  metrics: none recorded for this stack");
    }

    #[test]
    fn alarms_without_data_are_not_a_problem_but_are_counted() {
        let text = render(&ops(vec![], vec![alarm("A", "OK", ""), alarm("B", "INSUFFICIENT_DATA", "Unchecked")]));
        assert!(text.contains("  no dead letters; no alarm in ALARM (1 OK, 1 INSUFFICIENT_DATA)\n"), "{text}");
    }

    #[test]
    fn dead_letters_are_counted_by_status_and_queue_and_parked_ones_listed_with_the_command() {
        let long = format!("the message does not parse: {}", "x".repeat(300));
        let text = render(&ops(
            vec![
                dead_letter("dl-1", "ChargePaymentDlq", Status::Parked, &long),
                dead_letter("dl-2", "ChargePaymentDlq", Status::Resolved, "timed out"),
                dead_letter("dl-3", "SagaStarterDlq", Status::Redriven, "throttled"),
            ],
            vec![alarm("A", "OK", "")],
        ));
        assert!(text.contains("  dead letters: 3 (redriven 1, parked 1, resolved 1)\n"), "{text}");
        assert!(
            text.contains("    by queue: ChargePaymentDlq 2 (parked 1, resolved 1), SagaStarterDlq 1 (redriven 1)\n"),
            "{text}"
        );
        let parked = text.lines().find(|l| l.contains("dl-1")).unwrap();
        assert!(parked.starts_with("      dl-1  ChargePaymentDlq  poison: the message does not parse: xxx"), "{text}");
        let reason = parked.split_once("poison: ").unwrap().1;
        assert_eq!(reason.chars().count(), REASON_CHARS);
        assert!(reason.ends_with('…'));
        assert!(
            text.contains("        cargo run -p ops -- --env-file .local/aws.env dead-letters show dl-1\n"),
            "{text}"
        );
        assert!(!text.contains("show dl-2") && !text.contains("show dl-3"), "only parked ones are listed: {text}");
        assert!(text.contains("  alarms: all 1 alarms OK\n"), "{text}");
        assert!(text.ends_with("  metrics: none recorded for this stack"));
    }

    #[test]
    fn alarms_in_alarm_are_named_with_their_reason() {
        let text = render(&ops(
            vec![],
            vec![
                alarm("ChargePaymentDlqDepthAlarm", "ALARM", "Threshold Crossed: 1 datapoint [2.0] > 0.0"),
                alarm("B", "OK", ""),
                alarm("C", "INSUFFICIENT_DATA", ""),
            ],
        ));
        assert!(text.contains("  dead letters: none\n"), "{text}");
        assert!(text.contains("  alarms: 3 (1 OK, 1 ALARM, 1 INSUFFICIENT_DATA)\n"), "{text}");
        assert!(
            text.contains(
                "    ALARM order-saga-ChargePaymentDlqDepthAlarm: Threshold Crossed: 1 datapoint [2.0] > 0.0\n"
            ),
            "{text}"
        );
        assert!(!text.contains("ALARM order-saga-B"), "{text}");
    }

    #[test]
    fn many_parked_are_cut_with_the_listing_command_and_earlier_ones_are_counted_apart() {
        let parked = (0..PARKED_LISTED + 2)
            .map(|i| dead_letter(&format!("dl-{i}"), "OutboxRelayDlq", Status::Parked, "poison"))
            .collect();
        let mut ops = ops(parked, vec![alarm("A", "OK", "")]);
        ops.earlier_open = vec![dead_letter("old", "SagaStarterDlq", Status::Parked, "old")];
        let text = render(&ops);
        assert_eq!(text.matches("dead-letters show").count(), PARKED_LISTED, "{text}");
        assert!(
            text.contains(
                "      … and 2 more: cargo run -p ops -- --env-file .local/aws.env dead-letters list --status parked"
            ),
            "{text}"
        );
        assert!(text.contains("  from earlier runs, still open: 1 (parked 1): "), "{text}");
    }

    #[test]
    fn failures_to_read_and_an_unsettled_view_are_said() {
        let mut ops = ops(vec![], vec![]);
        ops.dead_letters = Err("Query: connection refused".into());
        ops.alarms = Err("DescribeAlarms: connection refused".into());
        let text = render(&ops);
        assert!(text.contains("  dead letters: could not read them: Query: connection refused\n"), "{text}");
        assert!(text.contains("  alarms: could not read them: DescribeAlarms: connection refused\n"), "{text}");
        let mut quiet = super::tests::ops(vec![], vec![alarm("A", "OK", "")]);
        quiet.settled = false;
        assert!(render(&quiet).contains("still changing"), "{}", render(&quiet));
    }

    #[test]
    fn queue_names_lose_the_arn_and_the_stack_prefix() {
        assert_eq!(
            queue_name("arn:aws:sqs:us-east-1:000000000000:order-saga-ChargePaymentDlq", "order-saga"),
            "ChargePaymentDlq"
        );
        assert_eq!(queue_name("arn:aws:sqs:us-east-1:000000000000:other-Dlq", "order-saga"), "other-Dlq");
        assert_eq!(queue_name("http://127.0.0.1:4566/queue/us-east-1/0/order-saga-X", "order-saga"), "X");
        assert_eq!(queue_name("", "order-saga"), "(unknown queue)");
    }

    #[test]
    fn this_run_is_what_was_seen_or_acted_on_since_it_started() {
        let since = OffsetDateTime::parse("2025-01-02T10:00:00Z", &Rfc3339).unwrap();
        let mut old = dead_letter("old", "A", Status::Parked, "");
        old.last_seen = "2025-01-01T09:00:00.000000Z".into();
        assert!(!touched_since(&old, since));
        old.history.push(HistoryEntry {
            at: "2025-01-02T10:00:01.000000Z".into(),
            what: "discarded".into(),
            by: Some("ana".into()),
            detail: String::new(),
        });
        assert!(touched_since(&old, since), "acted on during the run");
        let new = dead_letter("new", "A", Status::Pending, "");
        assert!(touched_since(&new, since));
    }
}
