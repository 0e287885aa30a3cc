//! The local Lambda service: each function of the template runs as its own binary, spawned and
//! driven through the Lambda Runtime API the way Lambda drives it, and is invoked through
//! [`LambdaService::invoke`] (by the event source mappings, the HTTP API emulation and the
//! Invoke API in [`invoke_api`]).
//!
//! - **Environment.** Exactly what the function gets on AWS: `Globals` plus its own
//!   `Environment` (resolved from the template), Lambda's reserved variables
//!   (`AWS_LAMBDA_FUNCTION_NAME`, `…_MEMORY_SIZE`, `…_VERSION`, `AWS_LAMBDA_LOG_GROUP_NAME`,
//!   `AWS_LAMBDA_LOG_STREAM_NAME`, `AWS_LAMBDA_RUNTIME_API`, `AWS_REGION`, credentials, `_HANDLER`,
//!   `LAMBDA_TASK_ROOT`, `TZ`…) and the emulators' `AWS_ENDPOINT_URL*`. Nothing else of the
//!   caller's environment leaks in.
//! - **Instances.** One invocation at a time per instance; an idle instance is reused (warm); a
//!   new one starts when all are busy, up to the function's limit: `ReservedConcurrentExecutions`,
//!   else the largest `ScalingConfig.MaximumConcurrency` of its SQS events, else a default. Event
//!   source mappings wait for a free instance; the Invoke API is throttled (429) as Lambda is.
//! - **Init.** From spawn to the runtime's first `next`, at most 10 s. A failed init fails the
//!   invocation (`Runtime.ExitError`, `Runtime.InitError`) and the instance is discarded.
//! - **Timeout.** The template's `Timeout` (default 3 s) is enforced: past it the invocation fails
//!   with `Sandbox.Timedout` and the instance is killed, as on Lambda.
//! - **Crashes.** An instance that exits or is killed mid-invocation fails it
//!   (`Runtime.ExitError`) and is replaced by the next invocation.
//! - **Logs.** See [`logs`]: `START`, `END` and `REPORT` lines (duration, billed duration, memory
//!   size, max memory used = the process's peak RSS, init duration on a cold start) around each
//!   invocation's own output, per function, in CloudWatch Logs and in a file.
//! - **Faults**, for tests: kill an instance when it makes a given AWS call (after its writes,
//!   before it tells the saga), once it has answered (its work done, the answer lost) or after a
//!   delay; hold answers back (slow invocations); cold-start every invocation.

pub mod binaries;
pub mod emf;
pub mod instance;
pub mod intercept;
pub mod invoke_api;
pub mod logs;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::Stack;
use crate::runner::{BoxFuture, Invoke};
use instance::{Answer, Ended, Event, Failure, Instance, Launch};
use logs::{LogSink, LogStream};

/// Lambda's default function timeout and memory.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_MEMORY_MB: u64 = 128;
/// Lambda's limit on the init phase.
const INIT_LIMIT: Duration = Duration::from_secs(10);
/// Instances per function when neither the function nor its event sources set a limit.
pub const DEFAULT_CONCURRENCY: usize = 10;

/// What the service is built with, besides the stack.
pub struct Options {
    /// Where each function's log file goes (`<dir>/<function name>.log`).
    pub log_dir: PathBuf,
    /// Instances per function when the template sets no limit.
    pub default_concurrency: usize,
    /// Print every function log line to standard error too.
    pub echo_logs: bool,
    /// Region, credentials and endpoints the functions get (the emulators').
    pub aws_env: BTreeMap<String, String>,
    /// Where the metrics in the functions' logs (EMF) are put, as CloudWatch would; none: a
    /// client from this process's environment, made at the first metric.
    pub metrics_client: Option<aws_sdk_cloudwatch::Client>,
}

impl Options {
    /// Logs under `.local/logs/<stack>`, the default concurrency, the process's AWS variables.
    pub fn new(stack: &Stack) -> Self {
        Self {
            log_dir: PathBuf::from(".local/logs").join(&stack.stack_name),
            default_concurrency: DEFAULT_CONCURRENCY,
            echo_logs: false,
            aws_env: crate::passthrough_env(),
            metrics_client: None,
        }
    }
}

/// Faults to inject into a function's invocations (for tests; see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Faults {
    /// Kill the instance once it has answered, before the answer is returned: the function's
    /// work is done, its caller sees a crash (`Runtime.ExitError`).
    #[serde(default)]
    pub kill_after_answer: bool,
    /// Kill the instance when it makes this AWS call (an operation name, e.g.
    /// `SendTaskSuccess`), before the call leaves: what came before it is done, it is not.
    /// The invocation runs on a new instance whose endpoints go through an intercepting proxy.
    #[serde(default)]
    pub kill_on_call: Option<String>,
    /// Kill the instance this long into the invocation, whatever it is doing.
    #[serde(default, with = "millis")]
    pub kill_after: Option<Duration>,
    /// Hold each answer back this long (counted against the function's timeout).
    #[serde(default, with = "millis")]
    pub delay: Option<Duration>,
    /// Run every invocation on a new instance, discarded afterwards.
    #[serde(default)]
    pub cold_start: bool,
    /// How many invocations the faults apply to; none: every one.
    #[serde(default)]
    pub times: Option<u32>,
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// The figures of one invocation: what its `REPORT` line says.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub request_id: String,
    pub duration_ms: f64,
    pub billed_ms: u64,
    pub memory_size_mb: u64,
    pub max_memory_used_mb: u64,
    /// Set on a cold start.
    pub init_ms: Option<f64>,
    /// `timeout` or `error` when the invocation failed outside the handler's own answer.
    pub status: Option<&'static str>,
    pub error_type: Option<String>,
}

impl Report {
    /// Lambda's `REPORT` line.
    pub fn line(&self) -> String {
        let mut line = format!(
            "REPORT RequestId: {}\tDuration: {:.2} ms\tBilled Duration: {} ms\tMemory Size: {} MB\tMax Memory Used: {} MB",
            self.request_id, self.duration_ms, self.billed_ms, self.memory_size_mb, self.max_memory_used_mb
        );
        if let Some(init) = self.init_ms {
            line.push_str(&format!("\tInit Duration: {init:.2} ms"));
        }
        if let Some(status) = self.status {
            line.push_str(&format!("\tStatus: {status}"));
        }
        if let (Some(_), Some(error_type)) = (self.status, &self.error_type) {
            line.push_str(&format!("\tError Type: {error_type}"));
        }
        line
    }
}

/// The outcome of an invocation, as the Invoke API returns it.
#[derive(Debug, Clone)]
pub struct Invoked {
    pub request_id: String,
    /// The response, or with `function_error` set, the error (`errorType`, `errorMessage`).
    pub payload: Bytes,
    /// The error type of a failed invocation (Lambda's `X-Amz-Function-Error` says `Unhandled`).
    pub function_error: Option<String>,
    /// The last 4 KB of the invocation's log.
    pub log_tail: String,
    pub report: Report,
}

/// Why an invocation did not run.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("Function not found: {0}")]
    NotFound(String),
    #[error("Rate Exceeded.")]
    Throttled,
    #[error("the instance could not be started: {0}")]
    Service(String),
}

/// How an invocation is asked for.
#[derive(Debug, Clone, Default)]
pub struct InvokeOptions {
    /// Fail with [`InvokeError::Throttled`] rather than wait when every instance is busy.
    pub throttle: bool,
    /// `X-Amzn-Trace-Id` of the caller, passed on as the invocation's trace id.
    pub trace_id: Option<String>,
    pub client_context: Option<String>,
    pub cognito_identity: Option<String>,
}

/// A function as the service runs it, resolved from the stack.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionSpec {
    pub logical_id: String,
    pub name: String,
    pub arn: String,
    /// The crate its `CodeUri` names (its binary has the same name).
    pub crate_name: String,
    pub timeout: Duration,
    pub memory_mb: u64,
    pub concurrency: usize,
    pub log_group: String,
    /// The template's variables (Globals merged), resolved.
    pub environment: BTreeMap<String, String>,
}

impl FunctionSpec {
    /// Every `AWS::Serverless::Function` of the stack.
    pub fn all(stack: &Stack, default_concurrency: usize) -> anyhow::Result<Vec<Self>> {
        stack.function_properties.keys().map(|id| Self::of(stack, id, default_concurrency)).collect()
    }

    pub fn of(stack: &Stack, logical_id: &str, default_concurrency: usize) -> anyhow::Result<Self> {
        let props = stack.function_properties.get(logical_id).with_context(|| format!("no function {logical_id}"))?;
        let context = || format!("function {logical_id}");
        let code_uri =
            props.get("CodeUri").and_then(Value::as_str).with_context(|| format!("{logical_id}: no CodeUri"))?;
        let crate_name = code_uri.trim_end_matches('/').rsplit('/').next().unwrap_or_default().to_owned();
        let resolved = stack.resources.get(logical_id);
        let name =
            resolved.map(|r| r.reference.clone()).unwrap_or_else(|| format!("{}-{logical_id}", stack.stack_name));
        let arn = resolved
            .and_then(|r| r.attributes.get("Arn").cloned())
            .unwrap_or_else(|| format!("arn:aws:lambda:us-east-1:000000000000:function:{name}"));
        let seconds = |key: &str| -> anyhow::Result<Option<u64>> {
            match props.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => {
                    let n = v.as_u64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()));
                    n.map(Some).with_context(|| format!("{key} {v} is not a whole number"))
                }
            }
        };
        let timeout = match seconds("Timeout").with_context(context)? {
            Some(0) => bail!("{logical_id}: Timeout must be positive"),
            Some(s) => Duration::from_secs(s),
            None => DEFAULT_TIMEOUT,
        };
        let memory_mb = seconds("MemorySize").with_context(context)?.unwrap_or(DEFAULT_MEMORY_MB);
        let reserved = seconds("ReservedConcurrentExecutions").with_context(context)?;
        let from_sources = props
            .get("Events")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(_, e)| {
                let n = e.pointer("/Properties/ScalingConfig/MaximumConcurrency")?;
                n.as_u64().or_else(|| n.as_str().and_then(|s| s.trim().parse().ok()))
            })
            .max();
        let concurrency = reserved.or(from_sources).map_or(default_concurrency, |n| n as usize);
        let log_group = props
            .pointer("/LoggingConfig/LogGroup")
            .and_then(Value::as_str)
            .map_or_else(|| format!("/aws/lambda/{name}"), str::to_owned);
        let environment = stack.functions.get(logical_id).cloned().unwrap_or_default();
        Ok(Self {
            logical_id: logical_id.to_owned(),
            name,
            arn,
            crate_name,
            timeout,
            memory_mb,
            concurrency,
            log_group,
            environment,
        })
    }
}

/// Per-function figures, from the invocations' `REPORT` figures.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionStats {
    pub logical_id: String,
    pub name: String,
    pub invocations: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub cold_starts: u64,
    pub init_ms: Vec<f64>,
    pub duration_ms: Vec<f64>,
    pub max_memory_used_mb: u64,
    /// Billed duration, summed over the invocations.
    pub billed_ms: u64,
    pub memory_size_mb: u64,
}

struct Function {
    spec: FunctionSpec,
    binary: PathBuf,
    env: Vec<(String, String)>,
    group: Arc<str>,
    log_name: Arc<str>,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Instance>>,
    faults: Mutex<Faults>,
    stats: Mutex<FunctionStats>,
    instances_started: AtomicU64,
}

/// The faults that apply to one invocation.
impl Function {
    /// The faults of the next invocation, counting it against `times`.
    fn faults(&self) -> Faults {
        let Ok(mut faults) = self.faults.lock() else { return Faults::default() };
        let applied = faults.clone();
        match faults.times {
            Some(0) => Faults::default(),
            Some(1) => {
                *faults = Faults::default();
                applied
            }
            Some(n) => {
                faults.times = Some(n - 1);
                applied
            }
            None => applied,
        }
    }

    fn log(&self, sink: &LogSink, instance: &Instance, line: String) {
        instance.note(&line);
        sink.line(&instance.log, line);
    }

    async fn start_instance(&self, sink: &LogSink, kill_on_call: Option<String>) -> Result<Instance, InvokeError> {
        let number = self.instances_started.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:08x}{:024x}", number, fastrand::u128(..) >> 32);
        let log = LogStream::for_instance(&self.log_name, &self.group, &id);
        let launch = Launch { binary: self.binary.clone(), env: self.env.clone(), log, kill_on_call };
        Instance::spawn(launch, sink).await.map_err(|e| InvokeError::Service(e.to_string()))
    }

    async fn invoke(&self, sink: &LogSink, payload: Bytes, options: &InvokeOptions) -> Result<Invoked, InvokeError> {
        let permit: OwnedSemaphorePermit = if options.throttle {
            self.permits.clone().try_acquire_owned().map_err(|_| InvokeError::Throttled)?
        } else {
            self.permits.clone().acquire_owned().await.map_err(|_| InvokeError::Service("shut down".into()))?
        };
        let faults = self.faults();
        let request_id = uuid::Uuid::new_v4().to_string();
        let fresh = faults.cold_start || faults.kill_on_call.is_some();
        let warm = if fresh { None } else { self.take_idle() };
        let (mut instance, init) = match warm {
            Some(instance) => (instance, None),
            None => {
                let mut instance = self.start_instance(sink, faults.kill_on_call.clone()).await?;
                sink.line(&instance.log, "INIT_START Runtime Version: provided:al2023 (local)".to_owned());
                let started = Instant::now();
                match instance.init(INIT_LIMIT).await {
                    Ok(init) => (instance, Some(init)),
                    Err(failure) => {
                        let init = started.elapsed();
                        return Ok(self.failed(sink, &instance, request_id, failure, init));
                    }
                }
            }
        };

        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.spec.timeout);
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let event = Event {
            request_id: request_id.clone(),
            payload,
            deadline_ms: now_ms + self.spec.timeout.as_millis() as u64,
            function_arn: self.spec.arn.clone(),
            trace_id: options.trace_id.clone().unwrap_or_else(trace_id),
            client_context: options.client_context.clone(),
            cognito_identity: options.cognito_identity.clone(),
        };
        instance.clear_tail();
        self.log(sink, &instance, format!("START RequestId: {request_id} Version: $LATEST"));
        let kill = faults.kill_after.map(|after| instance.kill_at(tokio::time::Instant::from_std(started + after)));
        let mut ended = instance.invoke(event, deadline, faults.delay).await;
        drop(kill);
        let duration = started.elapsed();
        let max_memory = instance.max_memory_mb();
        if faults.kill_after_answer && matches!(ended, Ended::Answered(_)) {
            instance.kill().await;
            ended = Ended::Exited("signal: killed".to_owned());
        }
        let (payload, function_error, status) = match ended {
            Ended::Answered(Answer::Response(body)) => (body, None, None),
            Ended::Answered(Answer::Error { error_type, body }) => (body, Some(error_type), None),
            Ended::Exited(how) => {
                let message = format!("RequestId: {request_id} Error: Runtime exited with error: {how}");
                self.log(sink, &instance, format!("{message}\nRuntime.ExitError"));
                let failure = Failure::new("Runtime.ExitError", message);
                (failure.payload, Some(failure.error_type), Some("error"))
            }
            Ended::TimedOut => {
                instance.kill().await;
                let seconds = self.spec.timeout.as_secs_f64();
                let stamp = time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                self.log(sink, &instance, format!("{stamp} {request_id} Task timed out after {seconds:.2} seconds"));
                let failure = Failure::new(
                    "Sandbox.Timedout",
                    format!("RequestId: {request_id} Error: Task timed out after {seconds:.2} seconds"),
                );
                (failure.payload, Some(failure.error_type), Some("timeout"))
            }
        };
        let init_ms = init.map(|d| d.as_secs_f64() * 1000.0);
        let duration_ms = duration.as_secs_f64() * 1000.0;
        let report = Report {
            request_id: request_id.clone(),
            duration_ms,
            // provided.al2023 bills the init phase of a cold start too.
            billed_ms: (duration_ms + init_ms.unwrap_or(0.0)).ceil() as u64,
            memory_size_mb: self.spec.memory_mb,
            max_memory_used_mb: max_memory.unwrap_or(0),
            init_ms,
            status,
            error_type: function_error.clone(),
        };
        self.log(sink, &instance, format!("END RequestId: {request_id}"));
        self.log(sink, &instance, report.line());
        self.record(&report);
        let log_tail = instance.tail();
        if instance.is_alive()
            && status.is_none()
            && !fresh
            && let Ok(mut idle) = self.idle.lock()
        {
            idle.push(instance);
        }
        drop(permit);
        Ok(Invoked { request_id, payload, function_error, log_tail, report })
    }

    /// A warm instance, most recently used first; dead ones are dropped.
    fn take_idle(&self) -> Option<Instance> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(instance) = idle.pop() {
            if instance.is_alive() {
                return Some(instance);
            }
        }
        None
    }

    /// An invocation whose instance never got through init.
    fn failed(
        &self,
        sink: &LogSink,
        instance: &Instance,
        request_id: String,
        failure: Failure,
        init: Duration,
    ) -> Invoked {
        let init_ms = init.as_secs_f64() * 1000.0;
        self.log(
            sink,
            instance,
            format!(
                "INIT_REPORT Init Duration: {init_ms:.2} ms\tPhase: init\tStatus: error\tError Type: {}",
                failure.error_type
            ),
        );
        self.log(sink, instance, format!("START RequestId: {request_id} Version: $LATEST"));
        self.log(sink, instance, format!("END RequestId: {request_id}"));
        let report = Report {
            request_id: request_id.clone(),
            duration_ms: 0.0,
            billed_ms: init_ms.ceil() as u64,
            memory_size_mb: self.spec.memory_mb,
            max_memory_used_mb: instance.max_memory_mb().unwrap_or(0),
            init_ms: Some(init_ms),
            status: Some("error"),
            error_type: Some(failure.error_type.clone()),
        };
        self.log(sink, instance, report.line());
        self.record(&report);
        Invoked {
            request_id,
            payload: failure.payload,
            function_error: Some(failure.error_type),
            log_tail: instance.tail(),
            report,
        }
    }

    fn record(&self, report: &Report) {
        if let Ok(mut stats) = self.stats.lock() {
            stats.invocations += 1;
            if report.error_type.is_some() {
                stats.errors += 1;
            }
            if report.status == Some("timeout") {
                stats.timeouts += 1;
            }
            if let Some(init) = report.init_ms {
                stats.cold_starts += 1;
                stats.init_ms.push(init);
            }
            stats.duration_ms.push(report.duration_ms);
            stats.billed_ms += report.billed_ms;
            stats.memory_size_mb = report.memory_size_mb;
            stats.max_memory_used_mb = stats.max_memory_used_mb.max(report.max_memory_used_mb);
        }
    }
}

/// Accepts HTTP/1.1 connections for ever (until the task is aborted), each request answered by
/// `respond`: the Runtime API of each instance and the Invoke API.
async fn accept<F, Fut>(listener: tokio::net::TcpListener, respond: F)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<hyper::Response<http_body_util::Full<Bytes>>, std::convert::Infallible>>
        + Send
        + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: back off rather than spin.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let respond = respond.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(respond);
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

/// A new X-Ray trace header: `Root=1-<epoch hex>-<96 bits>;Parent=<64 bits>;Sampled=0`.
pub fn trace_id() -> String {
    let epoch = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("Root=1-{epoch:08x}-{:024x};Parent={:016x};Sampled=0", fastrand::u128(..) >> 32, fastrand::u64(..))
}

/// The variables every instance of a function gets (the per-instance ones are added at spawn).
fn environment(spec: &FunctionSpec, aws_env: &BTreeMap<String, String>, binary: &Path) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = spec.environment.clone();
    for (key, value) in aws_env {
        if key.starts_with("AWS_ENDPOINT_URL")
            || matches!(
                key.as_str(),
                "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" | "AWS_SESSION_TOKEN" | "AWS_REGION"
            )
        {
            env.insert(key.clone(), value.clone());
        }
    }
    let region = aws_env.get("AWS_REGION").cloned().unwrap_or_else(|| "us-east-1".to_owned());
    let runtime_dir = binary.parent().map(|p| p.display().to_string()).unwrap_or_default();
    // Lambda's reserved variables: a template cannot override them.
    for (key, value) in [
        ("AWS_LAMBDA_FUNCTION_NAME", spec.name.clone()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", spec.memory_mb.to_string()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_owned()),
        ("AWS_LAMBDA_LOG_GROUP_NAME", spec.log_group.clone()),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand".to_owned()),
        ("AWS_REGION", region.clone()),
        ("AWS_DEFAULT_REGION", region),
        ("_HANDLER", "bootstrap".to_owned()),
        ("LAMBDA_RUNTIME_DIR", runtime_dir),
        ("TZ", ":UTC".to_owned()),
        ("LANG", "en_US.UTF-8".to_owned()),
        ("PATH", "/usr/local/bin:/usr/bin/:/bin:/opt/bin".to_owned()),
    ] {
        env.insert(key.to_owned(), value);
    }
    env.into_iter().collect()
}

/// The running functions of a stack.
pub struct LambdaService {
    functions: Vec<Arc<Function>>,
    sink: LogSink,
    log_dir: PathBuf,
}

impl LambdaService {
    /// Every function of the stack, each with its binary (by crate name, see [`binaries`]).
    /// Nothing is spawned before the first invocation.
    pub fn new(
        stack: &Stack,
        binaries: &HashMap<String, PathBuf>,
        options: Options,
        logs: Option<aws_sdk_cloudwatchlogs::Client>,
    ) -> anyhow::Result<Arc<Self>> {
        let sink = LogSink::start(options.log_dir.clone(), logs, options.metrics_client.clone(), options.echo_logs);
        let mut functions = Vec::new();
        for spec in FunctionSpec::all(stack, options.default_concurrency)? {
            let binary = binaries
                .get(&spec.crate_name)
                .with_context(|| format!("{}: no binary for crate {}", spec.logical_id, spec.crate_name))?
                .clone();
            let env = environment(&spec, &options.aws_env, &binary);
            functions.push(Arc::new(Function {
                group: spec.log_group.as_str().into(),
                log_name: spec.name.as_str().into(),
                permits: Arc::new(Semaphore::new(spec.concurrency)),
                stats: Mutex::new(FunctionStats {
                    logical_id: spec.logical_id.clone(),
                    name: spec.name.clone(),
                    ..Default::default()
                }),
                spec,
                binary,
                env,
                idle: Mutex::new(Vec::new()),
                faults: Mutex::new(Faults::default()),
                instances_started: AtomicU64::new(0),
            }));
        }
        Ok(Arc::new(Self { functions, sink, log_dir: options.log_dir }))
    }

    /// A function by logical id, name, ARN (qualified or not) or crate name.
    fn find(&self, name: &str) -> Option<&Arc<Function>> {
        let name = name.strip_suffix(":$LATEST").unwrap_or(name);
        let unqualified = name.rsplit_once(":function:").map_or(name, |(_, rest)| rest);
        self.functions
            .iter()
            .find(|f| f.spec.logical_id == unqualified || f.spec.name == unqualified || f.spec.arn == name)
            .or_else(|| {
                let mut by_crate = self.functions.iter().filter(|f| f.spec.crate_name == unqualified);
                let first = by_crate.next();
                if by_crate.next().is_some() { None } else { first }
            })
    }

    pub fn spec(&self, name: &str) -> Option<&FunctionSpec> {
        self.find(name).map(|f| &f.spec)
    }

    pub fn specs(&self) -> Vec<&FunctionSpec> {
        self.functions.iter().map(|f| &f.spec).collect()
    }

    /// Invokes a function (see [`find`](Self::find) for its names) with a JSON payload.
    pub async fn invoke(
        &self,
        name: &str,
        payload: impl Into<Bytes>,
        options: &InvokeOptions,
    ) -> Result<Invoked, InvokeError> {
        let function = self.find(name).ok_or_else(|| InvokeError::NotFound(name.to_owned()))?.clone();
        function.invoke(&self.sink, payload.into(), options).await
    }

    /// Invokes and returns the response as JSON; a function error is an `Err` with its payload.
    pub async fn invoke_json(&self, name: &str, payload: &Value) -> anyhow::Result<Value> {
        let invoked = self.invoke(name, payload.to_string(), &InvokeOptions::default()).await?;
        let text = String::from_utf8_lossy(&invoked.payload);
        if let Some(error) = invoked.function_error {
            bail!("{name} failed ({error}): {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("{name} answered with something other than JSON: {text}"))
    }

    /// Sets the faults of a function's next invocations (replacing earlier ones).
    pub fn set_faults(&self, name: &str, faults: Faults) -> Result<(), InvokeError> {
        let function = self.find(name).ok_or_else(|| InvokeError::NotFound(name.to_owned()))?;
        if let Ok(mut current) = function.faults.lock() {
            *current = faults;
        }
        Ok(())
    }

    /// Each function's figures so far, by logical id.
    pub fn stats(&self) -> Vec<FunctionStats> {
        self.functions.iter().filter_map(|f| f.stats.lock().ok().map(|s| s.clone())).collect()
    }

    /// The processes of a function's idle instances (for tests that look at them from outside).
    pub fn idle_pids(&self, name: &str) -> Vec<u32> {
        self.find(name)
            .and_then(|f| f.idle.lock().ok().map(|idle| idle.iter().filter_map(Instance::pid).collect()))
            .unwrap_or_default()
    }

    /// Where a function's log file is.
    pub fn log_file(&self, name: &str) -> Option<PathBuf> {
        self.find(name).map(|f| self.log_dir.join(format!("{}.log", f.spec.name)))
    }

    /// Waits until every log line so far is in its file and in CloudWatch Logs.
    pub async fn flush_logs(&self) {
        self.sink.flush().await;
    }

    /// Stops every idle instance and flushes the logs. Invocations under way keep their
    /// instance, which ends with them.
    pub async fn shutdown(&self) {
        for function in &self.functions {
            let idle: Vec<Instance> = function.idle.lock().map(|mut i| std::mem::take(&mut *i)).unwrap_or_default();
            for mut instance in idle {
                instance.kill().await;
            }
        }
        self.sink.flush().await;
    }
}

impl Invoke for LambdaService {
    fn serves(&self, function: &str) -> bool {
        self.find(function).is_some()
    }

    fn invoke(&self, function: &str, payload: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        self.invoke_traced(function, payload, None)
    }

    fn invoke_traced(
        &self,
        function: &str,
        payload: Vec<u8>,
        trace_header: Option<String>,
    ) -> BoxFuture<Result<Vec<u8>, String>> {
        let found = self.find(function).cloned();
        let sink = self.sink.clone();
        let name = function.to_owned();
        Box::pin(async move {
            let function = found.ok_or_else(|| format!("Function not found: {name}"))?;
            let options = InvokeOptions { trace_id: trace_header, ..InvokeOptions::default() };
            let invoked = function.invoke(&sink, Bytes::from(payload), &options).await.map_err(|e| e.to_string())?;
            match invoked.function_error {
                Some(error_type) => Err(format!("{error_type}: {}", String::from_utf8_lossy(&invoked.payload))),
                None => Ok(invoked.payload.to_vec()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_read_as_lambdas() {
        let mut report = Report {
            request_id: "r-1".into(),
            duration_ms: 12.345,
            billed_ms: 13,
            memory_size_mb: 256,
            max_memory_used_mb: 21,
            init_ms: Some(30.5),
            status: None,
            error_type: None,
        };
        assert_eq!(
            report.line(),
            "REPORT RequestId: r-1\tDuration: 12.35 ms\tBilled Duration: 13 ms\tMemory Size: 256 MB\tMax Memory Used: 21 MB\tInit Duration: 30.50 ms"
        );
        report.init_ms = None;
        report.status = Some("timeout");
        report.error_type = Some("Sandbox.Timedout".into());
        assert!(report.line().ends_with("Max Memory Used: 21 MB\tStatus: timeout\tError Type: Sandbox.Timedout"));
    }

    #[test]
    fn faults_apply_as_many_times_as_asked() {
        let faults = Faults { kill_after_answer: true, times: Some(2), ..Default::default() };
        let parsed: Faults = serde_json::from_str(r#"{"killAfterAnswer":true,"times":2}"#).expect("faults");
        assert_eq!(parsed, faults);
        let delayed: Faults = serde_json::from_str(r#"{"delay":1500}"#).expect("faults");
        assert_eq!(delayed.delay, Some(Duration::from_millis(1500)));
        assert!(serde_json::from_str::<Faults>(r#"{"kil":true}"#).is_err(), "a misspelt fault is refused");
        let on_call: Faults = serde_json::from_str(r#"{"killOnCall":"SendTaskSuccess","times":1}"#).expect("faults");
        assert_eq!(on_call.kill_on_call.as_deref(), Some("SendTaskSuccess"));
    }

    #[test]
    fn trace_ids_have_the_xray_shape() {
        let id = trace_id();
        let parts: Vec<&str> = id.split(';').collect();
        assert_eq!(parts.len(), 3, "{id}");
        assert!(parts[0].starts_with("Root=1-") && parts[0].len() == "Root=1-".len() + 8 + 1 + 24, "{id}");
        assert!(parts[1].starts_with("Parent=") && parts[1].len() == "Parent=".len() + 16, "{id}");
    }
}
