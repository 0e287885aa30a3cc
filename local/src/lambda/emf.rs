//! CloudWatch Embedded Metric Format, extracted from the function logs as CloudWatch Logs does
//! on AWS: a log line that is an EMF document (a JSON object with `_aws.CloudWatchMetrics`)
//! becomes metric data, put to CloudWatch (LocalStack) with `PutMetricData`.
//!
//! The log task only hands such lines over (an unbounded channel, never waiting); one task of
//! its own parses them and puts them in batches at most `PUT_AFTER` (5 s) after they were written.
//! Failures are logged (once per kind), never fatal, and never hold the function logs back.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::warn;

/// How long extracted metrics may wait before they are put: CloudWatch's resolution is a minute,
/// and fewer, larger requests leave LocalStack's one process to the system under test.
const PUT_AFTER: Duration = Duration::from_secs(5);
/// `PutMetricData` takes at most 1,000 metric data per request.
const MAX_BATCH: usize = 1_000;

/// Whether a log line may be an EMF document (cheap: no parsing), so the log task passes on
/// only those.
pub fn looks_like_emf(line: &str) -> bool {
    line.trim_start().starts_with('{') && line.contains("\"_aws\"") && line.contains("\"CloudWatchMetrics\"")
}

/// The metric data an EMF document declares, by namespace: one datum per metric, dimension set
/// and value (an array value gives a datum per element), at the document's `Timestamp`. `None`
/// for a line that is not an EMF document; a metric whose value or dimension is missing or not
/// of the right type is left out, as CloudWatch does.
pub fn metric_data(line: &str) -> Option<Vec<(String, MetricDatum)>> {
    let doc: Value = serde_json::from_str(line.trim()).ok()?;
    let aws = doc.get("_aws")?;
    let directives = aws.get("CloudWatchMetrics")?.as_array()?;
    let timestamp = aws.get("Timestamp").and_then(Value::as_i64).map(DateTime::from_millis);
    let mut data = Vec::new();
    for directive in directives {
        let Some(namespace) = directive.get("Namespace").and_then(Value::as_str) else { continue };
        let sets: Vec<Vec<&str>> = match directive.get("Dimensions").and_then(Value::as_array) {
            Some(sets) if !sets.is_empty() => sets
                .iter()
                .filter_map(Value::as_array)
                .map(|set| set.iter().filter_map(Value::as_str).collect())
                .collect(),
            _ => vec![Vec::new()],
        };
        // A dimension's value is the root member of its name, a string.
        let dimension_sets: Vec<Vec<Dimension>> = sets
            .iter()
            .filter_map(|set| {
                set.iter()
                    .map(|name| {
                        let value = doc.get(*name)?.as_str()?;
                        Some(Dimension::builder().name(*name).value(value).build())
                    })
                    .collect::<Option<Vec<_>>>()
            })
            .collect();
        for metric in directive.get("Metrics").and_then(Value::as_array).into_iter().flatten() {
            let Some(name) = metric.get("Name").and_then(Value::as_str) else { continue };
            let unit = metric.get("Unit").and_then(Value::as_str).map(StandardUnit::from);
            let values: Vec<f64> = match doc.get(name) {
                Some(Value::Array(values)) => values.iter().filter_map(Value::as_f64).collect(),
                Some(value) => value.as_f64().into_iter().collect(),
                None => Vec::new(),
            };
            for dimensions in &dimension_sets {
                for value in &values {
                    let datum = MetricDatum::builder()
                        .metric_name(name)
                        .value(*value)
                        .set_unit(unit.clone())
                        .set_timestamp(timestamp)
                        .set_dimensions((!dimensions.is_empty()).then(|| dimensions.clone()))
                        .build();
                    data.push((namespace.to_owned(), datum));
                }
            }
        }
    }
    Some(data)
}

enum Message {
    Line(String),
    Flush(oneshot::Sender<()>),
}

/// A handle to the extraction task; cheap to clone.
#[derive(Clone)]
pub struct MetricSink {
    tx: mpsc::UnboundedSender<Message>,
}

impl MetricSink {
    /// Starts the task, putting through `client` (none: one from this process's environment,
    /// `AWS_ENDPOINT_URL*`, made at the first metric).
    pub fn start(client: Option<aws_sdk_cloudwatch::Client>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, client));
        Self { tx }
    }

    /// A log line that [`looks_like_emf`]; never waits.
    pub fn line(&self, text: &str) {
        let _ = self.tx.send(Message::Line(text.to_owned()));
    }

    /// Returns once every metric handed over so far is put (or given up on).
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = flushed.await;
        }
    }
}

struct Putter {
    client: Option<aws_sdk_cloudwatch::Client>,
    pending: BTreeMap<String, Vec<MetricDatum>>,
    reported: HashSet<&'static str>,
}

async fn run(mut rx: mpsc::UnboundedReceiver<Message>, client: Option<aws_sdk_cloudwatch::Client>) {
    let mut putter = Putter { client, pending: BTreeMap::new(), reported: HashSet::new() };
    let mut due: Option<Instant> = None;
    loop {
        let message = match due {
            Some(at) => tokio::select! {
                message = rx.recv() => message,
                () = tokio::time::sleep_until(at) => {
                    putter.put().await;
                    due = None;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match message {
            None => {
                putter.put().await;
                return;
            }
            Some(Message::Flush(done)) => {
                putter.put().await;
                due = None;
                let _ = done.send(());
            }
            Some(Message::Line(text)) => match metric_data(&text) {
                Some(data) if !data.is_empty() => {
                    for (namespace, datum) in data {
                        putter.pending.entry(namespace).or_default().push(datum);
                    }
                    due.get_or_insert_with(|| Instant::now() + PUT_AFTER);
                }
                _ => {}
            },
        }
    }
}

impl Putter {
    fn report(&mut self, what: &'static str, error: String) {
        if self.reported.insert(what) {
            warn!(error, "CloudWatch: {what} failed; metrics from the function logs are not extracted");
        }
    }

    async fn put(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let client = match &self.client {
            Some(client) => client.clone(),
            None => {
                let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
                let client = cloudwatch_client(aws_sdk_cloudwatch::config::Builder::from(&sdk));
                self.client = Some(client.clone());
                client
            }
        };
        let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        for (namespace, data) in std::mem::take(&mut self.pending) {
            // A refused batch is halved until the datum it cannot take is alone: one bad datum
            // costs itself, not the second of metrics it came with.
            let mut batches: Vec<Vec<MetricDatum>> = data.chunks(MAX_BATCH).map(<[MetricDatum]>::to_vec).collect();
            while let Some(batch) = batches.pop() {
                let sent =
                    client.put_metric_data().namespace(&namespace).set_metric_data(Some(batch.clone())).send().await;
                let Err(e) = sent else { continue };
                if batch.len() > 1 {
                    let (first, second) = batch.split_at(batch.len() / 2);
                    batches.push(first.to_vec());
                    batches.push(second.to_vec());
                } else {
                    let error = aws_sdk_cloudwatch::error::DisplayErrorContext(&e).to_string();
                    self.report("PutMetricData", format!("{error}; the datum: {batch:?}"));
                }
            }
        }
        let took = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().saturating_sub(started);
        tracing::debug!(ms = took.as_millis() as u64, "EMF metrics put");
    }
}

/// A CloudWatch client for LocalStack. The SDK speaks `rpc-v2-cbor` to CloudWatch, and writes
/// a timestamp (a datum's, `GetMetricStatistics`' period) as CBOR tag 1 over a float of epoch
/// seconds; LocalStack 4.9.2 reads only an integer there and fails the whole request
/// (`InternalError`). The client rewrites each such float as the integer of its whole seconds,
/// the same length, before signing. Nothing else changes; AWS reads either.
pub fn cloudwatch_client(config: aws_sdk_cloudwatch::config::Builder) -> aws_sdk_cloudwatch::Client {
    aws_sdk_cloudwatch::Client::from_conf(config.interceptor(WholeSecondTimestamps).build())
}

#[derive(Debug)]
struct WholeSecondTimestamps;

impl aws_sdk_cloudwatch::config::Intercept for WholeSecondTimestamps {
    fn name(&self) -> &'static str {
        "WholeSecondTimestamps"
    }

    fn modify_before_signing(
        &self,
        context: &mut aws_sdk_cloudwatch::config::interceptors::BeforeTransmitInterceptorContextMut<'_>,
        _components: &aws_sdk_cloudwatch::config::RuntimeComponents,
        _cfg: &mut aws_sdk_cloudwatch::config::ConfigBag,
    ) -> Result<(), aws_sdk_cloudwatch::error::BoxError> {
        let request = context.request_mut();
        let Some(bytes) = request.body().bytes() else { return Ok(()) };
        let mut body = bytes.to_vec();
        if cbor_timestamps_to_integers(&mut body).is_some() && body != bytes {
            *request.body_mut() = aws_smithy_types::body::SdkBody::from(body);
        }
        Ok(())
    }
}

/// Walks one CBOR data item at `pos` (and everything in it), rewriting tag 1 over a 64-bit
/// float into tag 1 over a 64-bit unsigned integer (whole seconds). Returns the position after
/// the item; `None` for input that does not read as CBOR (then left as it is).
fn cbor_item(buf: &mut [u8], pos: usize) -> Option<usize> {
    let initial = *buf.get(pos)?;
    let (major, info) = (initial >> 5, initial & 0x1f);
    let (argument, mut next) = match info {
        0..=23 => (u64::from(info), pos + 1),
        24..=27 => {
            let len = 1usize << (info - 24);
            let bytes = buf.get(pos + 1..pos + 1 + len)?;
            (bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)), pos + 1 + len)
        }
        31 if (2..=5).contains(&major) => {
            // Indefinite length: items (pairs, for a map) up to the break.
            let mut at = pos + 1;
            loop {
                if *buf.get(at)? == 0xff {
                    return Some(at + 1);
                }
                at = cbor_item(buf, at)?;
                if major == 5 {
                    at = cbor_item(buf, at)?;
                }
            }
        }
        _ => return None,
    };
    match major {
        0 | 1 => Some(next),
        2 | 3 => next.checked_add(usize::try_from(argument).ok()?),
        4 | 5 => {
            let items = if major == 5 { argument.checked_mul(2)? } else { argument };
            for _ in 0..items {
                next = cbor_item(buf, next)?;
            }
            Some(next)
        }
        6 => {
            if argument == 1 && buf.get(next) == Some(&0xfb) {
                let bits: [u8; 8] = buf.get(next + 1..next + 9)?.try_into().ok()?;
                let seconds = f64::from_be_bytes(bits);
                if seconds >= 0.0 && seconds < u64::MAX as f64 {
                    buf[next] = 0x1b;
                    buf[next + 1..next + 9].copy_from_slice(&(seconds.floor() as u64).to_be_bytes());
                }
            }
            cbor_item(buf, next)
        }
        // Simple values and floats: the argument was all of it.
        _ => Some(next),
    }
}

fn cbor_timestamps_to_integers(buf: &mut [u8]) -> Option<()> {
    let mut pos = 0;
    while pos < buf.len() {
        pos = cbor_item(buf, pos)?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"_aws":{"Timestamp":1795000000000,"CloudWatchMetrics":[{"Namespace":"OrderSaga","Dimensions":[["Service","Step"]],"Metrics":[{"Name":"StepLatency","Unit":"Milliseconds"},{"Name":"Calls"}]}]},"Service":"s1-ChargePaymentFunction","Step":"ChargePayment","StepLatency":[12.5,3.0],"Calls":1}"#;

    #[test]
    fn an_emf_document_becomes_one_datum_per_value() {
        assert!(looks_like_emf(LINE));
        let data = metric_data(LINE).expect("an EMF document");
        assert_eq!(data.len(), 3);
        assert!(data.iter().all(|(ns, _)| ns == "OrderSaga"));
        let (_, first) = &data[0];
        assert_eq!(first.metric_name(), Some("StepLatency"));
        assert_eq!(first.value(), Some(12.5));
        assert_eq!(first.unit(), Some(&StandardUnit::Milliseconds));
        assert_eq!(first.timestamp(), Some(&DateTime::from_millis(1_795_000_000_000)));
        let dimensions: Vec<(&str, &str)> =
            first.dimensions().iter().map(|d| (d.name().unwrap(), d.value().unwrap())).collect();
        assert_eq!(dimensions, [("Service", "s1-ChargePaymentFunction"), ("Step", "ChargePayment")]);
        assert_eq!(data[1].1.value(), Some(3.0));
        assert_eq!(data[2].1.metric_name(), Some("Calls"));
        assert_eq!(data[2].1.unit(), None);
    }

    #[test]
    fn cbor_timestamps_become_whole_seconds_and_nothing_else_changes() {
        // {"t": 1(1795378075.5), "v": 1.5 as f64, "s": "ab", "l": [_ 1, 2]}
        let mut body = vec![0xbf, 0x61, b't', 0xc1, 0xfb];
        body.extend(1_795_378_075.5f64.to_be_bytes());
        body.extend([0x61, b'v', 0xfb]);
        body.extend(1.5f64.to_be_bytes());
        body.extend([0x61, b's', 0x62, b'a', b'b', 0x61, b'l', 0x9f, 0x01, 0x02, 0xff, 0xff]);
        let before = body.clone();
        assert!(cbor_timestamps_to_integers(&mut body).is_some());
        let mut want = vec![0xbf, 0x61, b't', 0xc1, 0x1b];
        want.extend(1_795_378_075u64.to_be_bytes());
        want.extend(&before[13..]);
        assert_eq!(body, want);
        // What does not read as CBOR is left alone.
        let mut truncated = before[..9].to_vec();
        assert!(cbor_timestamps_to_integers(&mut truncated).is_none());
        assert_eq!(truncated, before[..9]);
    }

    #[test]
    fn several_dimension_sets_and_no_dimensions() {
        let line = r#"{"_aws":{"Timestamp":1,"CloudWatchMetrics":[{"Namespace":"N","Dimensions":[["A"],["A","B"],[]],"Metrics":[{"Name":"M","Unit":"Count"}]}]},"A":"a","B":"b","M":2}"#;
        let data = metric_data(line).expect("an EMF document");
        let sets: Vec<usize> = data.iter().map(|(_, d)| d.dimensions().len()).collect();
        assert_eq!(sets, [1, 2, 0]);
        assert!(data.iter().all(|(_, d)| d.value() == Some(2.0) && d.unit() == Some(&StandardUnit::Count)));
    }

    #[test]
    fn what_is_not_emf_or_is_incomplete_is_left_out() {
        let log = r#"{"level":"INFO","fields":{"message":"order placed"}}"#;
        assert!(!looks_like_emf(log));
        assert!(metric_data(log).is_none());
        assert!(metric_data("START RequestId: 1 Version: $LATEST").is_none());
        // A dimension without its value drops its set; a metric without a value gives nothing.
        let line = r#"{"_aws":{"CloudWatchMetrics":[{"Namespace":"N","Dimensions":[["Missing"]],"Metrics":[{"Name":"M"}]},{"Namespace":"N","Metrics":[{"Name":"Absent"},{"Name":"Text"}]}]},"M":1,"Text":"x"}"#;
        assert_eq!(metric_data(line).map(|d| d.len()), Some(0));
    }
}
