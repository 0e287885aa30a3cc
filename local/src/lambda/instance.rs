//! One execution environment: the function's own binary, spawned with the environment Lambda
//! gives it, polling a Runtime API served for it alone on a loopback port of its own (on AWS
//! every sandbox has its own Runtime API too, so the server always knows which instance asks).
//!
//! The Runtime API is the documented one: `GET /2018-06-01/runtime/invocation/next` (long-polls
//! until an invocation is handed over), `POST …/invocation/{id}/response`, `POST
//! …/invocation/{id}/error` and `POST …/init/error`. The first `next` ends the init phase.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::logs::{LogSink, LogStream};

const PREFIX: &str = "/2018-06-01/runtime";
/// Lambda's limit on a synchronous response.
pub const MAX_RESPONSE_BYTES: usize = 6 * 1024 * 1024;
/// What a log tail keeps (Lambda returns the last 4 KB with `LogType: Tail`).
const TAIL_BYTES: usize = 4096;

/// What the runtime receives from `next`.
pub struct Event {
    pub request_id: String,
    pub payload: Bytes,
    pub deadline_ms: u64,
    pub function_arn: String,
    pub trace_id: String,
    pub client_context: Option<String>,
    pub cognito_identity: Option<String>,
}

/// How the runtime ended an invocation.
pub enum Answer {
    Response(Bytes),
    Error { error_type: String, body: Bytes },
}

/// A failed invocation or init, as Lambda reports it (`errorType`, `errorMessage`).
#[derive(Debug, Clone)]
pub struct Failure {
    pub error_type: String,
    pub payload: Bytes,
}

impl Failure {
    pub fn new(error_type: &str, message: String) -> Self {
        let payload = json!({ "errorType": error_type, "errorMessage": message }).to_string();
        Self { error_type: error_type.to_owned(), payload: Bytes::from(payload) }
    }
}

/// How an invocation on an instance ended.
pub enum Ended {
    Answered(Answer),
    /// The process exited (or was killed) before answering: how it ended, Lambda's way.
    Exited(String),
    TimedOut,
}

struct Handoff {
    event: Event,
    answer: oneshot::Sender<Answer>,
}

struct Current {
    request_id: String,
    answer: oneshot::Sender<Answer>,
}

/// The Runtime API's state for one instance.
struct Api {
    handoffs: tokio::sync::Mutex<mpsc::Receiver<Handoff>>,
    current: Mutex<Option<Current>>,
    /// Fired by the first `next` (init done) or by `init/error`.
    init: Mutex<Option<oneshot::Sender<Result<(), Answer>>>>,
}

/// What an instance is started with.
pub struct Launch {
    pub binary: PathBuf,
    /// Everything but the per-instance variables (runtime API, log stream).
    pub env: Vec<(String, String)>,
    pub log: LogStream,
    /// Kill the instance when it makes this AWS call (see [`super::intercept`]).
    pub kill_on_call: Option<String>,
}

/// A running execution environment.
pub struct Instance {
    pub log: LogStream,
    pid: Option<u32>,
    handoff: mpsc::Sender<Handoff>,
    init: Option<oneshot::Receiver<Result<(), Answer>>>,
    exited: watch::Receiver<Option<String>>,
    kill: mpsc::Sender<()>,
    server: JoinHandle<()>,
    proxies: Vec<JoinHandle<()>>,
    tail: Arc<Mutex<String>>,
    spawned_at: Instant,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Lambda freezes and eventually reclaims idle sandboxes; locally they end with us.
        let _ = self.kill.try_send(());
        self.server.abort();
        self.proxies.iter().for_each(JoinHandle::abort);
    }
}

impl Instance {
    /// Spawns the binary, with its Runtime API listening; init runs from here (see [`init`]).
    pub async fn spawn(mut launch: Launch, sink: &LogSink) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let (handoff, handoffs) = mpsc::channel(1);
        let (init_tx, init_rx) = oneshot::channel();
        let api = Arc::new(Api {
            handoffs: tokio::sync::Mutex::new(handoffs),
            current: Mutex::new(None),
            init: Mutex::new(Some(init_tx)),
        });
        let server = tokio::spawn(super::accept(listener, move |request| route(api.clone(), request)));
        let (kill, mut kill_rx) = mpsc::channel::<()>(1);
        let proxies = match &launch.kill_on_call {
            Some(operation) => {
                let tap = super::intercept::KillOnCall { operation: operation.clone(), kill: kill.clone() };
                let env = launch.env.iter_mut().map(|(k, v)| (k.as_str(), v));
                super::intercept::endpoints(env, Arc::new(tap)).await?
            }
            None => Vec::new(),
        };

        let task_root = launch.binary.parent().map(PathBuf::from).unwrap_or_default();
        let mut command = Command::new(&launch.binary);
        command
            .env_clear()
            .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{port}"))
            .env("AWS_LAMBDA_LOG_STREAM_NAME", launch.log.stream.as_ref())
            .env("LAMBDA_TASK_ROOT", &task_root)
            .current_dir(&task_root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        // Init is timed from before the process exists: a busy machine may run the whole init
        // before this task is scheduled again.
        let spawned_at = Instant::now();
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                server.abort();
                proxies.iter().for_each(JoinHandle::abort);
                return Err(std::io::Error::new(e.kind(), format!("spawning {}: {e}", launch.binary.display())));
            }
        };
        let tail = Arc::new(Mutex::new(String::new()));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward(out, sink.clone(), launch.log.clone(), tail.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward(err, sink.clone(), launch.log.clone(), tail.clone()));
        }
        let pid = child.id();
        let (exited_tx, exited) = watch::channel(None);
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = kill_rx.recv() => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let _ = exited_tx.send(Some(match status {
                Ok(status) => describe(status),
                Err(e) => format!("wait failed: {e}"),
            }));
        });
        Ok(Self { log: launch.log, pid, handoff, init: Some(init_rx), exited, kill, server, proxies, tail, spawned_at })
    }

    /// Waits for the init phase to end: the runtime's first `next`. Bounded by `limit`
    /// (Lambda's 10 s); an init error, an exit or the limit fail it (and the instance).
    pub async fn init(&mut self, limit: Duration) -> Result<Duration, Failure> {
        let Some(init) = self.init.take() else { return Ok(Duration::ZERO) };
        let mut exited = self.exited.clone();
        let outcome = tokio::select! {
            ready = init => ready.ok(),
            () = exited_now(&mut exited) => None,
            () = tokio::time::sleep(limit) => {
                self.kill().await;
                return Err(Failure::new(
                    "Runtime.InitTimeout",
                    format!("Init phase did not complete within {:.2} seconds", limit.as_secs_f64()),
                ));
            }
        };
        match outcome {
            Some(Ok(())) => Ok(self.spawned_at.elapsed()),
            Some(Err(answer)) => {
                self.kill().await;
                let (error_type, body) = match answer {
                    Answer::Error { error_type, body } => (error_type, body),
                    Answer::Response(body) => ("Runtime.InitError".to_owned(), body),
                };
                Err(Failure { error_type, payload: body })
            }
            None => {
                let how = self.exit_status().await;
                Err(Failure::new("Runtime.ExitError", format!("Runtime exited with error: {how}")))
            }
        }
    }

    /// Hands the event to the runtime and waits for its answer, an exit, or the deadline. With
    /// `hold`, an answer is held back that long (a slow invocation), still within the deadline.
    pub async fn invoke(&mut self, event: Event, deadline: tokio::time::Instant, hold: Option<Duration>) -> Ended {
        let (answer, answered) = oneshot::channel();
        if self.handoff.send(Handoff { event, answer }).await.is_err() {
            return Ended::Exited(self.exit_status().await);
        }
        let mut exited = self.exited.clone();
        let answer = tokio::select! {
            biased;
            answer = answered => match answer {
                Ok(answer) => answer,
                Err(_) => return Ended::Exited(self.exit_status().await),
            },
            () = exited_now(&mut exited) => return Ended::Exited(self.exit_status().await),
            () = tokio::time::sleep_until(deadline) => return Ended::TimedOut,
        };
        let Some(hold) = hold else { return Ended::Answered(answer) };
        tokio::select! {
            biased;
            () = exited_now(&mut exited) => Ended::Exited(self.exit_status().await),
            () = tokio::time::sleep_until(deadline) => Ended::TimedOut,
            () = tokio::time::sleep(hold) => Ended::Answered(answer),
        }
    }

    /// Kills the process at `at`, unless the returned guard is dropped first.
    pub fn kill_at(&self, at: tokio::time::Instant) -> KillTimer {
        let kill = self.kill.clone();
        KillTimer(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let _ = kill.try_send(());
        }))
    }

    /// Kills the process (SIGKILL) and waits until it is gone.
    pub async fn kill(&mut self) {
        let _ = self.kill.try_send(());
        let mut exited = self.exited.clone();
        exited_now(&mut exited).await;
    }

    pub fn is_alive(&self) -> bool {
        self.exited.borrow().is_none()
    }

    /// How the process ended (`signal: killed`, `exit status: 101`), once it has.
    async fn exit_status(&self) -> String {
        let mut exited = self.exited.clone();
        exited_now(&mut exited).await;
        let ended = exited.borrow().clone();
        ended.unwrap_or_else(|| "unknown".to_owned())
    }

    /// The process's peak resident set (VmHWM), in MB: Lambda's "Max Memory Used".
    pub fn max_memory_mb(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb.div_ceil(1024))
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The last lines logged since the current invocation started (at most 4 KB).
    pub fn tail(&self) -> String {
        self.tail.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Starts a new tail: an invocation begins.
    pub fn clear_tail(&self) {
        self.tail.lock().map(|mut t| t.clear()).ok();
    }

    /// Adds a line of the service's own (START, END, REPORT…) to the tail.
    pub fn note(&self, line: &str) {
        push_tail(&self.tail, line);
    }
}

/// A pending kill (see [`Instance::kill_at`]): dropped, it is called off.
pub struct KillTimer(JoinHandle<()>);

impl Drop for KillTimer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Returns once the process has ended (the watch's guard is not held across an await).
async fn exited_now(exited: &mut watch::Receiver<Option<String>>) {
    let _ = exited.wait_for(Option::is_some).await;
}

fn describe(status: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            let name = match signal {
                9 => "killed".to_owned(),
                15 => "terminated".to_owned(),
                6 => "aborted".to_owned(),
                11 => "segmentation fault".to_owned(),
                n => format!("signal {n}"),
            };
            return format!("signal: {name}");
        }
    }
    match status.code() {
        Some(code) => format!("exit status {code}"),
        None => status.to_string(),
    }
}

fn push_tail(tail: &Mutex<String>, line: &str) {
    if let Ok(mut tail) = tail.lock() {
        tail.push_str(line);
        tail.push('\n');
        if tail.len() > TAIL_BYTES {
            let mut cut = tail.len() - TAIL_BYTES;
            while !tail.is_char_boundary(cut) {
                cut += 1;
            }
            tail.drain(..cut);
        }
    }
}

/// Copies the process's output, line by line, to the function's log.
async fn forward(output: impl AsyncRead + Unpin, sink: LogSink, log: LogStream, tail: Arc<Mutex<String>>) {
    let mut reader = BufReader::new(output);
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        match reader.read_until(b'\n', &mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buffer);
                let line = line.trim_end_matches(['\n', '\r']);
                push_tail(&tail, line);
                sink.line(&log, line.to_owned());
            }
        }
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn accepted() -> Response<Full<Bytes>> {
    reply(StatusCode::ACCEPTED, json!({ "status": "OK" }))
}

async fn body(request: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    match Limited::new(request.into_body(), MAX_RESPONSE_BYTES + 1).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(_) => Err(reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({ "errorMessage": "Response payload size exceeded maximum allowed payload size (6291556 bytes).",
                    "errorType": "RequestEntityTooLarge" }),
        )),
    }
}

/// The error type a runtime declares with its error (`Lambda-Runtime-Function-Error-Type`).
fn declared_error_type(request: &Request<Incoming>) -> Option<String> {
    request.headers().get("lambda-runtime-function-error-type").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

async fn route(api: Arc<Api>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return Ok(reply(StatusCode::NOT_FOUND, json!({ "errorMessage": "not found", "errorType": "NotFound" })));
    };
    let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    let method = request.method().clone();
    Ok(match (method, parts.as_slice()) {
        (Method::GET, ["invocation", "next"]) => next(&api).await,
        (Method::POST, ["invocation", id, "response"]) => {
            let id = (*id).to_owned();
            match body(request).await {
                Ok(bytes) => finish(&api, &id, Answer::Response(bytes)),
                Err(too_large) => {
                    let failure = Failure::new(
                        "Function.ResponseSizeTooLarge",
                        "Response payload size exceeded maximum allowed payload size (6291556 bytes).".into(),
                    );
                    finish(&api, &id, Answer::Error { error_type: failure.error_type, body: failure.payload });
                    too_large
                }
            }
        }
        (Method::POST, ["invocation", id, "error"]) => {
            let id = (*id).to_owned();
            let declared = declared_error_type(&request);
            let bytes = body(request).await.unwrap_or_default();
            let error_type = declared
                .or_else(|| serde_json::from_slice::<Value>(&bytes).ok()?.get("errorType")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| "Unhandled".to_owned());
            finish(&api, &id, Answer::Error { error_type, body: bytes })
        }
        (Method::POST, ["init", "error"]) => {
            let declared = declared_error_type(&request);
            let bytes = body(request).await.unwrap_or_default();
            let error_type = declared.unwrap_or_else(|| "Runtime.InitError".to_owned());
            if let Some(init) = api.init.lock().ok().and_then(|mut i| i.take()) {
                let _ = init.send(Err(Answer::Error { error_type, body: bytes }));
            }
            accepted()
        }
        _ => {
            reply(StatusCode::NOT_FOUND, json!({ "errorMessage": format!("no route {path}"), "errorType": "NotFound" }))
        }
    })
}

async fn next(api: &Api) -> Response<Full<Bytes>> {
    if let Some(init) = api.init.lock().ok().and_then(|mut i| i.take()) {
        let _ = init.send(Ok(()));
    }
    let handoff = api.handoffs.lock().await.recv().await;
    let Some(Handoff { event, answer }) = handoff else {
        return reply(
            StatusCode::GONE,
            json!({ "errorMessage": "the instance is shutting down", "errorType": "Gone" }),
        );
    };
    if let Ok(mut current) = api.current.lock() {
        *current = Some(Current { request_id: event.request_id.clone(), answer });
    }
    let mut response = Response::new(Full::new(event.payload));
    let headers = response.headers_mut();
    let mut set = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    };
    set("content-type", "application/json");
    set("lambda-runtime-aws-request-id", &event.request_id);
    set("lambda-runtime-deadline-ms", &event.deadline_ms.to_string());
    set("lambda-runtime-invoked-function-arn", &event.function_arn);
    set("lambda-runtime-trace-id", &event.trace_id);
    if let Some(context) = &event.client_context {
        set("lambda-runtime-client-context", context);
    }
    if let Some(identity) = &event.cognito_identity {
        set("lambda-runtime-cognito-identity", identity);
    }
    response
}

fn finish(api: &Api, request_id: &str, answer: Answer) -> Response<Full<Bytes>> {
    let current = api.current.lock().ok().and_then(|mut c| match c.as_ref() {
        Some(current) if current.request_id == request_id => c.take(),
        _ => None,
    });
    match current {
        Some(current) => {
            let _ = current.answer.send(answer);
            accepted()
        }
        None => reply(
            StatusCode::BAD_REQUEST,
            json!({ "errorMessage": format!("Invalid request ID: {request_id}"), "errorType": "InvalidRequestID" }),
        ),
    }
}
