//! Function logs, as Lambda keeps them: every line an instance writes (stdout and stderr) and the
//! service's own `START` / `END` / `REPORT` lines go to the function's log group
//! (`/aws/lambda/<name>`), one log stream per instance, in CloudWatch Logs, and to a file per
//! function under the log directory.
//!
//! Lines that are CloudWatch Embedded Metric Format documents are also handed to the metric
//! extraction ([`super::emf`]), as CloudWatch Logs extracts them on AWS.
//!
//! One task owns the files and the shipping. Lines are shipped in `PutLogEvents` batches at most
//! `SHIP_AFTER` (5 s) after they were written; nothing is sent, and no timer runs, while no function
//! logs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_cloudwatchlogs::types::InputLogEvent;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::warn;

/// Where an instance's lines go.
#[derive(Debug, Clone)]
pub struct LogStream {
    /// The function's name: its file is `<dir>/<function>.log`.
    pub function: Arc<str>,
    pub group: Arc<str>,
    pub stream: Arc<str>,
}

impl LogStream {
    /// Lambda's stream name: `2026/11/22/[$LATEST]<instance id>`.
    pub fn for_instance(function: &Arc<str>, group: &Arc<str>, instance_id: &str) -> Self {
        let today = time::OffsetDateTime::now_utc().date();
        let stream =
            format!("{:04}/{:02}/{:02}/[$LATEST]{instance_id}", today.year(), today.month() as u8, today.day());
        Self { function: function.clone(), group: group.clone(), stream: stream.into() }
    }
}

enum Message {
    Line { log: LogStream, at_ms: i64, text: String },
    Flush(oneshot::Sender<()>),
}

/// A handle to the log task; cheap to clone.
#[derive(Clone)]
pub struct LogSink {
    tx: mpsc::UnboundedSender<Message>,
    echo: bool,
    /// With CloudWatch Logs: EMF lines become CloudWatch metrics.
    metrics: Option<super::emf::MetricSink>,
}

/// CloudWatch Logs' limits per `PutLogEvents`.
const MAX_BATCH_EVENTS: usize = 10_000;
const MAX_BATCH_BYTES: usize = 1_000_000;
/// How long lines may wait before they are shipped. Lambda's own delivery takes seconds too; at
/// one second, a busy system's shipping took a third of what a saga step costs over its floor
/// (LocalStack is one process on the machine's two cores).
const SHIP_AFTER: Duration = Duration::from_secs(5);

impl LogSink {
    /// Starts the log task: files under `dir`, CloudWatch Logs through `client` (none: files only,
    /// and no metrics), the metrics in the lines through `metrics`. With `echo`, every line is
    /// also printed to standard error, prefixed by its function.
    pub fn start(
        dir: PathBuf,
        client: Option<aws_sdk_cloudwatchlogs::Client>,
        metrics: Option<aws_sdk_cloudwatch::Client>,
        echo: bool,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = client.is_some().then(|| super::emf::MetricSink::start(metrics));
        tokio::spawn(run(rx, dir, client));
        Self { tx, echo, metrics }
    }

    pub fn line(&self, log: &LogStream, text: String) {
        if self.echo {
            eprintln!("{} {text}", log.function);
        }
        if let Some(metrics) = &self.metrics
            && super::emf::looks_like_emf(&text)
        {
            metrics.line(&text);
        }
        let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let _ = self.tx.send(Message::Line { log: log.clone(), at_ms, text });
    }

    /// Returns once every line sent so far is written and shipped (or given up on), and the
    /// metrics extracted from them put.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = flushed.await;
        }
        if let Some(metrics) = &self.metrics {
            metrics.flush().await;
        }
    }
}

struct Shipper {
    client: Option<aws_sdk_cloudwatchlogs::Client>,
    pending: BTreeMap<(Arc<str>, Arc<str>), Vec<InputLogEvent>>,
    groups: HashSet<Arc<str>>,
    streams: HashSet<(Arc<str>, Arc<str>)>,
    /// Failures already reported, so a missing emulator is said once, not per batch.
    reported: HashSet<String>,
}

async fn run(mut rx: mpsc::UnboundedReceiver<Message>, dir: PathBuf, client: Option<aws_sdk_cloudwatchlogs::Client>) {
    let mut files: HashMap<Arc<str>, std::io::BufWriter<std::fs::File>> = HashMap::new();
    let mut shipper = Shipper {
        client,
        pending: BTreeMap::new(),
        groups: HashSet::new(),
        streams: HashSet::new(),
        reported: HashSet::new(),
    };
    let mut due: Option<Instant> = None;
    loop {
        let message = match due {
            Some(at) => tokio::select! {
                message = rx.recv() => message,
                () = tokio::time::sleep_until(at) => {
                    flush_files(&mut files);
                    shipper.ship().await;
                    due = None;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match message {
            None => {
                flush_files(&mut files);
                shipper.ship().await;
                return;
            }
            Some(Message::Flush(done)) => {
                flush_files(&mut files);
                shipper.ship().await;
                due = None;
                let _ = done.send(());
            }
            Some(Message::Line { log, at_ms, text }) => {
                write_line(&mut files, &dir, &log, at_ms, &text);
                if shipper.client.is_some() {
                    let event = InputLogEvent::builder().timestamp(at_ms).message(text).build();
                    if let Ok(event) = event {
                        shipper.pending.entry((log.group.clone(), log.stream.clone())).or_default().push(event);
                    }
                    due.get_or_insert_with(|| Instant::now() + SHIP_AFTER);
                }
            }
        }
    }
}

fn flush_files(files: &mut HashMap<Arc<str>, std::io::BufWriter<std::fs::File>>) {
    for file in files.values_mut() {
        let _ = file.flush();
    }
}

fn write_line(
    files: &mut HashMap<Arc<str>, std::io::BufWriter<std::fs::File>>,
    dir: &Path,
    log: &LogStream,
    at_ms: i64,
    text: &str,
) {
    if !files.contains_key(&log.function) {
        let path = dir.join(format!("{}.log", log.function));
        let opened = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::OpenOptions::new().create(true).append(true).open(&path));
        match opened {
            Ok(file) => {
                files.insert(log.function.clone(), std::io::BufWriter::new(file));
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot write the function's log file");
                return;
            }
        }
    }
    if let Some(file) = files.get_mut(&log.function) {
        let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_default();
        let instance = log.stream.rsplit(']').next().unwrap_or_default();
        let short = &instance[..instance.len().min(8)];
        let _ = writeln!(file, "{at} {short} {text}");
    }
}

impl Shipper {
    fn report(&mut self, what: &str, error: String) {
        if self.reported.insert(what.to_owned()) {
            warn!(error, "CloudWatch Logs: {what} failed; function logs stay in the local files");
        }
    }

    async fn ship(&mut self) {
        let Some(client) = self.client.clone() else { return };
        let pending = std::mem::take(&mut self.pending);
        for ((group, stream), mut events) in pending {
            if !self.groups.contains(&group) {
                match client.create_log_group().log_group_name(group.as_ref()).send().await {
                    Ok(_) => {}
                    Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_already_exists_exception()) => {}
                    Err(e) => {
                        self.report(
                            "CreateLogGroup",
                            aws_sdk_cloudwatchlogs::error::DisplayErrorContext(&e).to_string(),
                        );
                        continue;
                    }
                }
                self.groups.insert(group.clone());
            }
            let key = (group.clone(), stream.clone());
            if !self.streams.contains(&key) {
                let created = client
                    .create_log_stream()
                    .log_group_name(group.as_ref())
                    .log_stream_name(stream.as_ref())
                    .send()
                    .await;
                match created {
                    Ok(_) => {}
                    Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_already_exists_exception()) => {}
                    Err(e) => {
                        self.report(
                            "CreateLogStream",
                            aws_sdk_cloudwatchlogs::error::DisplayErrorContext(&e).to_string(),
                        );
                        continue;
                    }
                }
                self.streams.insert(key);
            }
            // A batch must be in time order.
            events.sort_by_key(InputLogEvent::timestamp);
            let mut batch = Vec::new();
            let mut bytes = 0;
            for event in events {
                let size = event.message().len() + 26;
                if !batch.is_empty() && (batch.len() >= MAX_BATCH_EVENTS || bytes + size > MAX_BATCH_BYTES) {
                    self.put(&client, &group, &stream, std::mem::take(&mut batch)).await;
                    bytes = 0;
                }
                bytes += size;
                batch.push(event);
            }
            if !batch.is_empty() {
                self.put(&client, &group, &stream, batch).await;
            }
        }
    }

    async fn put(
        &mut self,
        client: &aws_sdk_cloudwatchlogs::Client,
        group: &str,
        stream: &str,
        events: Vec<InputLogEvent>,
    ) {
        let sent = client
            .put_log_events()
            .log_group_name(group)
            .log_stream_name(stream)
            .set_log_events(Some(events))
            .send()
            .await;
        if let Err(e) = sent {
            self.report("PutLogEvents", aws_sdk_cloudwatchlogs::error::DisplayErrorContext(&e).to_string());
        }
    }
}
