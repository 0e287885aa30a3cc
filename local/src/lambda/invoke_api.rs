//! Lambda's Invoke API on a loopback port, so the ecosystem's own clients reach the running
//! functions: `cargo lambda invoke <name> -A 127.0.0.1 -P <port>`, `aws lambda invoke
//! --endpoint-url http://127.0.0.1:<port>`, any AWS SDK with `AWS_ENDPOINT_URL_LAMBDA`.
//!
//! `POST /2015-03-31/functions/{name}/invocations`, the name being the function's name, its
//! logical id, its ARN or its crate's name. `X-Amz-Invocation-Type`: `RequestResponse` (200 with
//! the response; a function error adds `X-Amz-Function-Error: Unhandled`), `Event` (202, run in
//! the background, retried twice on error) or `DryRun` (204). `X-Amz-Log-Type: Tail` returns the
//! last 4 KB of the invocation's log in `X-Amz-Log-Result`. Errors are Lambda's: 404
//! `ResourceNotFoundException`, 429 `TooManyRequestsException`, 413
//! `RequestEntityTooLargeException`, 400 `InvalidRequestContentException`.
//!
//! Not Lambda's: `PUT /_local/functions/{name}/faults` sets a function's [`Faults`] (JSON).
//! Signatures are not checked.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{Faults, InvokeError, InvokeOptions, LambdaService};

/// The default port (cargo lambda's own emulator takes 9000).
pub const DEFAULT_PORT: u16 = 9001;
/// Lambda's payload limits: synchronous and asynchronous.
const MAX_SYNC_BYTES: usize = 6 * 1024 * 1024;
const MAX_ASYNC_BYTES: usize = 256 * 1024;
/// Retries of an asynchronous invocation that fails (Lambda's default `MaximumRetryAttempts`).
const ASYNC_RETRIES: u32 = 2;

/// The running Invoke API.
pub struct InvokeApi {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl InvokeApi {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for InvokeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the Invoke API for `service` on `addr`.
pub async fn serve(service: Arc<LambdaService>, addr: SocketAddr) -> anyhow::Result<InvokeApi> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the Lambda Invoke API to {addr}"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(super::accept(listener, move |request| respond(service.clone(), request)));
    info!(%addr, "serving the Lambda Invoke API");
    Ok(InvokeApi { addr, task })
}

fn error(status: StatusCode, error_type: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({ "Type": "User", "message": message }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(value) = HeaderValue::from_str(error_type) {
        headers.insert("x-amzn-errortype", value);
    }
    response
}

fn header(request: &Request<Incoming>, name: &str) -> Option<String> {
    request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

async fn respond(service: Arc<LambdaService>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let segments: Vec<String> =
        path.trim_start_matches('/').split('/').map(|s| shared::text::percent_decode(s, false)).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = request.method().clone();
    Ok(match (method, segments.as_slice()) {
        (Method::POST, ["2015-03-31", "functions", name, "invocations"]) => {
            let name = (*name).to_owned();
            invoke(service, &name, request).await
        }
        (Method::PUT, ["_local", "functions", name, "faults"]) => {
            let name = (*name).to_owned();
            let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            match serde_json::from_slice::<Faults>(&body) {
                Err(e) => error(StatusCode::BAD_REQUEST, "InvalidRequestContentException", &format!("faults: {e}")),
                Ok(faults) => match service.set_faults(&name, faults.clone()) {
                    Ok(()) => {
                        warn!(function = %name, ?faults, "faults set");
                        let mut ok = Response::new(Full::new(Bytes::from(json!(faults).to_string())));
                        ok.headers_mut()
                            .insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                        ok
                    }
                    Err(e) => error(StatusCode::NOT_FOUND, "ResourceNotFoundException", &e.to_string()),
                },
            }
        }
        _ => error(StatusCode::NOT_FOUND, "UnknownOperationException", &format!("no operation at {path}")),
    })
}

async fn invoke(service: Arc<LambdaService>, name: &str, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(spec) = service.spec(name).cloned() else {
        return error(StatusCode::NOT_FOUND, "ResourceNotFoundException", &format!("Function not found: {name}"));
    };
    if let Some(query) = request.uri().query() {
        let qualifier = query.split('&').find_map(|p| p.strip_prefix("Qualifier="));
        if qualifier.is_some_and(|q| q != "$LATEST" && q != "%24LATEST") {
            let message = format!("Function not found: {}:{}", spec.arn, qualifier.unwrap_or_default());
            return error(StatusCode::NOT_FOUND, "ResourceNotFoundException", &message);
        }
    }
    let kind = header(&request, "x-amz-invocation-type").unwrap_or_else(|| "RequestResponse".to_owned());
    let tail = header(&request, "x-amz-log-type").is_some_and(|t| t == "Tail");
    let client_context = header(&request, "x-amz-client-context")
        .and_then(|c| STANDARD.decode(c).ok())
        .and_then(|c| String::from_utf8(c).ok())
        .or_else(|| header(&request, "lambda-runtime-client-context"));
    let options = InvokeOptions {
        throttle: true,
        trace_id: header(&request, "x-amzn-trace-id"),
        client_context,
        cognito_identity: header(&request, "lambda-runtime-cognito-identity"),
    };
    let limit = if kind == "Event" { MAX_ASYNC_BYTES } else { MAX_SYNC_BYTES };
    let payload = match Limited::new(request.into_body(), limit).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            let message = format!("Request must be smaller than {limit} bytes for the InvokeFunction operation");
            return error(StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLargeException", &message);
        }
    };
    let payload = if payload.iter().all(u8::is_ascii_whitespace) { Bytes::from_static(b"{}") } else { payload };
    if serde_json::from_slice::<serde::de::IgnoredAny>(&payload).is_err() {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            "Could not parse request body into json",
        );
    }
    match kind.as_str() {
        "DryRun" => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        "Event" => {
            let function = spec.logical_id.clone();
            tokio::spawn(async move {
                let options = InvokeOptions { throttle: false, ..options };
                for attempt in 0..=ASYNC_RETRIES {
                    match service.invoke(&function, payload.clone(), &options).await {
                        Ok(invoked) if invoked.function_error.is_none() => return,
                        Ok(invoked) => {
                            warn!(%function, attempt, error = ?invoked.function_error, "asynchronous invocation failed")
                        }
                        Err(e) => warn!(%function, attempt, error = %e, "asynchronous invocation not run"),
                    }
                    tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                }
            });
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::ACCEPTED;
            response
        }
        "RequestResponse" => match service.invoke(&spec.logical_id, payload, &options).await {
            Err(InvokeError::Throttled) => {
                error(StatusCode::TOO_MANY_REQUESTS, "TooManyRequestsException", "Rate Exceeded.")
            }
            Err(InvokeError::NotFound(name)) => {
                error(StatusCode::NOT_FOUND, "ResourceNotFoundException", &format!("Function not found: {name}"))
            }
            Err(e @ InvokeError::Service(_)) => {
                error(StatusCode::INTERNAL_SERVER_ERROR, "ServiceException", &e.to_string())
            }
            Ok(invoked) => {
                let mut response = Response::new(Full::new(invoked.payload));
                let headers = response.headers_mut();
                headers.insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                headers.insert("x-amz-executed-version", HeaderValue::from_static("$LATEST"));
                if let Ok(id) = HeaderValue::from_str(&invoked.request_id) {
                    headers.insert("x-amzn-requestid", id);
                }
                if invoked.function_error.is_some() {
                    headers.insert("x-amz-function-error", HeaderValue::from_static("Unhandled"));
                }
                if tail && let Ok(log) = HeaderValue::from_str(&STANDARD.encode(invoked.log_tail.as_bytes())) {
                    headers.insert("x-amz-log-result", log);
                }
                response
            }
        },
        other => error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            &format!("X-Amz-Invocation-Type {other:?}: RequestResponse, Event or DryRun"),
        ),
    }
}
