//! Local HTTP serving of the template's `HttpApi` events: what API Gateway's HTTP API does in
//! front of the functions, in process.
//!
//! Every `HttpApi` entry of a function's `Events` (resolved by the provisioner) becomes a route:
//! `Method` (`ANY` matches every method) and `Path` in SAM syntax, where `{name}` matches one
//! segment and `{name+}` the rest of the path; an event with neither is the `$default` route.
//! A request is turned into an API Gateway HTTP API payload 2.0 event
//! (`aws_lambda_events`' `ApiGatewayV2httpRequest`: `routeKey`, `rawPath`, `rawQueryString`,
//! lower-cased `headers`, `cookies`, `queryStringParameters`, `pathParameters`,
//! `requestContext`, `body`), the function is invoked through the local Lambda
//! service (its real binary, see [`crate::lambda`]) and its
//! response (`statusCode`, `headers`, `cookies`, `body`, `isBase64Encoded`; or any other JSON,
//! which means 200 with that JSON) is written back. As on AWS, the most specific route wins, a
//! function error (including Lambda's own timeout, the function's `Timeout`) is a `500`, and
//! the integration gives up after 30 s with a `503`.
//!
//! Routes behind a JWT authorizer (the API's `Auth`, see [`crate::authorizer`]) are verified
//! before anything is invoked, as API Gateway does: `401`/`403` `{"message": …}` with the reason
//! in `www-authenticate`; the verified claims go in `requestContext.authorizer.jwt`.
//!
//! Differences from API Gateway, by design: a path that a route serves for other methods gets
//! `405` with `Allow` (API Gateway answers 404), and errors of the server itself are JSON
//! `{"error": …}`. No Lambda authorizers, CORS, throttling or stages.
//!
//! As on API Gateway, a request whose line and headers together exceed 10 KB is refused before
//! anything is invoked: `414` when the request line alone is too long, else `431`, with a JSON
//! body like every other answer (hyper would answer a long URI itself, with an empty body: the
//! head is read ahead of it, and one request is served per connection so each is checked).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use aws_lambda_events::apigw::{
    ApiGatewayRequestAuthorizer, ApiGatewayRequestAuthorizerJwtDescription, ApiGatewayV2httpRequest,
    ApiGatewayV2httpRequestContext, ApiGatewayV2httpRequestContextHttpDescription,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, error, info, warn};

use crate::Stack;
use crate::authorizer::{RouteAuth, api_authorizers};
use crate::runner::Invoke;

/// API Gateway's payload limit.
const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
/// The HTTP API integration timeout.
const MAX_TIMEOUT: Duration = Duration::from_secs(30);
/// How long requests under way may finish once the server is stopped.
const DRAIN: Duration = Duration::from_secs(35);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
    Greedy(String),
}

/// One `HttpApi` event of a function.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    pub function: String,
    pub event: String,
    /// Upper case; `ANY` for every method.
    pub method: String,
    /// SAM syntax (`/orders/{id}`); `None` for the `$default` route.
    pub path: Option<String>,
    /// `ApiId`, resolved (the API's name locally).
    pub api_id: Option<String>,
    segments: Vec<Segment>,
    /// The event's `Auth.Authorizer` (`NONE`: none; unset: the API's default).
    authorizer_name: Option<String>,
    /// The event's `Auth.AuthorizationScopes`.
    scopes: Vec<String>,
    /// The authorizer in front of the route, once resolved against its API.
    auth: Option<RouteAuth>,
}

impl HttpRoute {
    /// `GET /orders/{id}`, or `$default`.
    pub fn route_key(&self) -> String {
        match &self.path {
            Some(path) => format!("{} {path}", self.method),
            None => "$default".into(),
        }
    }

    fn accepts(&self, method: &str) -> bool {
        self.method == "ANY" || self.method == method
    }

    /// The path parameters, if `path` (as sent, percent-encoded) matches.
    fn matches(&self, path: &str) -> Option<BTreeMap<String, String>> {
        if self.path.is_none() {
            return Some(BTreeMap::new());
        }
        let parts: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        let mut params = BTreeMap::new();
        for (i, segment) in self.segments.iter().enumerate() {
            match segment {
                Segment::Literal(literal) => {
                    if parts.get(i) != Some(&literal.as_str()) {
                        return None;
                    }
                }
                Segment::Param(name) => match parts.get(i) {
                    Some(part) if !part.is_empty() => {
                        params.insert(name.clone(), shared::text::percent_decode(part, false));
                    }
                    _ => return None,
                },
                Segment::Greedy(name) => {
                    let rest = parts.get(i..).filter(|rest| !rest.is_empty() && !rest[0].is_empty())?;
                    params.insert(name.clone(), shared::text::percent_decode(&rest.join("/"), false));
                    return Some(params);
                }
            }
        }
        (parts.len() == self.segments.len()).then_some(params)
    }

    /// How specific the route is: literal segments first, then a fixed length, then an exact
    /// method; the `$default` route last.
    fn specificity(&self) -> (bool, usize, bool, usize, bool) {
        let literals = self.segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count();
        let greedy = self.segments.iter().any(|s| matches!(s, Segment::Greedy(_)));
        (self.path.is_some(), literals, !greedy, self.segments.len(), self.method != "ANY")
    }
}

impl fmt::Display for HttpRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} ({})", self.route_key(), self.function, self.event)
    }
}

fn parse_path(path: &str) -> anyhow::Result<Vec<Segment>> {
    let Some(rest) = path.strip_prefix('/') else { bail!("Path {path:?} must start with /") };
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let mut segments = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let segment = match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            Some(name) if name.ends_with('+') && i + 1 == parts.len() => {
                Segment::Greedy(name.trim_end_matches('+').to_owned())
            }
            Some(name) if !name.is_empty() && !name.contains(['+', '{', '}']) => Segment::Param(name.to_owned()),
            Some(_) => bail!("Path {path:?}: bad parameter {part:?}"),
            None if part.contains(['{', '}']) => bail!("Path {path:?}: bad segment {part:?}"),
            None => Segment::Literal((*part).to_owned()),
        };
        segments.push(segment);
    }
    Ok(segments)
}

/// Every `HttpApi` event of the stack's functions, in a stable order.
pub fn routes(stack: &Stack) -> anyhow::Result<Vec<HttpRoute>> {
    let mut routes: Vec<HttpRoute> = Vec::new();
    for (function, props) in &stack.function_properties {
        for (event, spec) in props.get("Events").and_then(Value::as_object).into_iter().flatten() {
            if spec.get("Type").and_then(Value::as_str) != Some("HttpApi") {
                continue;
            }
            let p = spec.get("Properties").unwrap_or(&Value::Null);
            let context = || format!("{function}.{event} (HttpApi)");
            let path = p.get("Path").and_then(Value::as_str).map(str::to_owned);
            let method = p.get("Method").and_then(Value::as_str).map(str::to_ascii_uppercase);
            let (path, method) = match (path, method) {
                (Some(path), Some(method)) => (Some(path), method),
                (None, None) => (None, "ANY".to_owned()),
                _ => bail!("{}: Path and Method go together", context()),
            };
            let segments = match &path {
                Some(path) => parse_path(path).with_context(context)?,
                None => Vec::new(),
            };
            let route = HttpRoute {
                function: function.clone(),
                event: event.clone(),
                method,
                path,
                api_id: p.get("ApiId").and_then(Value::as_str).map(str::to_owned),
                segments,
                authorizer_name: p.pointer("/Auth/Authorizer").and_then(Value::as_str).map(str::to_owned),
                scopes: p
                    .pointer("/Auth/AuthorizationScopes")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
                auth: None,
            };
            if let Some(other) =
                routes.iter().find(|r| r.route_key() == route.route_key() && r.segments == route.segments)
            {
                bail!("{} and {} declare the same route {}", other.function, route.function, route.route_key());
            }
            routes.push(route);
        }
    }
    routes.sort_by_key(|r| (r.path.clone(), r.method.clone()));
    Ok(routes)
}

struct State {
    routes: Vec<HttpRoute>,
    functions: Arc<dyn Invoke>,
    port: u16,
}

/// The running server.
pub struct HttpHandle {
    addr: SocketAddr,
    routes: Vec<String>,
    skipped: Vec<String>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl HttpHandle {
    /// Where it listens (the port the OS chose, when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:3000`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Human-readable, one per route served.
    pub fn routes(&self) -> &[String] {
        &self.routes
    }

    /// Routes not served (their function is not served), and why.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// Stops accepting, lets requests under way finish (bounded), and waits for the end.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            error!(error = %e, "the HTTP server task ended abnormally");
        }
    }
}

/// Serves the stack's `HttpApi` routes on `addr`, invoking their functions through `functions`.
/// Routes of functions it does not serve are listed in [`HttpHandle::skipped`]. Dropping the
/// handle stops the server too.
pub async fn serve(stack: &Stack, functions: Arc<dyn Invoke>, addr: SocketAddr) -> anyhow::Result<HttpHandle> {
    let mut served = Vec::new();
    let mut skipped = Vec::new();
    // Each API's authorizers, made once and shared by its routes (one key cache per authorizer).
    let mut apis = BTreeMap::new();
    for (id, props) in &stack.apis {
        apis.insert(id.clone(), api_authorizers(props).with_context(|| format!("the HTTP API {id}"))?);
    }
    for mut route in routes(stack)? {
        let api = route.api_id.as_ref().and_then(|id| apis.get(id));
        route.auth = match route.authorizer_name.as_ref().or(api.and_then(|a| a.default.as_ref())) {
            None => None,
            Some(name) if name == "NONE" => None,
            Some(name) => {
                let authorizer = api
                    .and_then(|a| a.authorizers.get(name))
                    .with_context(|| format!("{route}: no authorizer {name} on its API"))?;
                Some(RouteAuth { authorizer: authorizer.clone(), scopes: route.scopes.clone() })
            }
        };
        if functions.serves(&route.function) {
            served.push(route);
        } else {
            skipped.push(format!("{route}: {} is not served", route.function));
        }
    }
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let addr = listener.local_addr()?;
    let routes = served.iter().map(ToString::to_string).collect();
    let state = Arc::new(State { routes: served, functions, port: addr.port() });
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(accept(listener, state, stopped));
    info!(%addr, "serving the HTTP API");
    Ok(HttpHandle { addr, routes, skipped, stop, task })
}

async fn accept(listener: TcpListener, state: Arc<State>, stopped: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        let mut stop = stopped.clone();
        tokio::select! {
            () = stop_requested(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((mut stream, peer)) => {
                    let state = state.clone();
                    let mut stop = stopped.clone();
                    connections.spawn(async move {
                        let head = match tokio::time::timeout(HEAD_READ_TIMEOUT, read_head(&mut stream)).await {
                            Ok(Ok(Head::Fits(head))) => head,
                            Ok(Ok(Head::TooLarge { status })) => {
                                refuse_head(&mut stream, status).await;
                                return;
                            }
                            Ok(Ok(Head::Closed)) => return,
                            Ok(Err(e)) => {
                                debug!(%peer, error = %e, "reading the request failed");
                                return;
                            }
                            Err(_) => {
                                debug!(%peer, "no request within {} s", HEAD_READ_TIMEOUT.as_secs());
                                return;
                            }
                        };
                        let service = service_fn(move |request| respond(state.clone(), request, peer));
                        let mut builder = http1::Builder::new();
                        builder.timer(TokioTimer::new()).header_read_timeout(HEAD_READ_TIMEOUT).keep_alive(false);
                        let stream = Prefixed { prefix: head, read: 0, inner: stream };
                        let connection = builder.serve_connection(TokioIo::new(stream), service);
                        tokio::pin!(connection);
                        tokio::select! {
                            done = connection.as_mut() => {
                                if let Err(e) = done {
                                    debug!(%peer, error = %e, "connection ended with an error");
                                }
                            }
                            () = stop_requested(&mut stop) => {
                                connection.as_mut().graceful_shutdown();
                                let _ = connection.await;
                            }
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!("requests still under way after {} s: aborted", DRAIN.as_secs());
        connections.abort_all();
    }
}

/// API Gateway's HTTP API quota on a request's line and headers together.
const MAX_HEAD_BYTES: usize = 10 * 1024;
/// How long a client may take to send its request's head.
const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A request's head as read ahead of hyper.
enum Head {
    /// What was read (the head, maybe the start of the body): hyper reads it again.
    Fits(Vec<u8>),
    /// Over [`MAX_HEAD_BYTES`]: `414` or `431`.
    TooLarge { status: StatusCode },
    /// The client went away without a byte.
    Closed,
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut read = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n")
            && end + 4 <= MAX_HEAD_BYTES
        {
            return Ok(Head::Fits(read));
        }
        if read.len() > MAX_HEAD_BYTES || read.windows(4).any(|w| w == b"\r\n\r\n") {
            let line_ends = read.windows(2).position(|w| w == b"\r\n");
            let status = match line_ends {
                Some(end) if end <= MAX_HEAD_BYTES => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                _ => StatusCode::URI_TOO_LONG,
            };
            return Ok(Head::TooLarge { status });
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // A truncated request: hyper answers (or closes) as it would.
            return Ok(if read.is_empty() { Head::Closed } else { Head::Fits(read) });
        }
        read.extend_from_slice(&chunk[..n]);
    }
}

/// Answers a request whose head is over the limit, without reading the rest of it.
async fn refuse_head(stream: &mut TcpStream, status: StatusCode) {
    let what = if status == StatusCode::URI_TOO_LONG { "request line" } else { "request line and headers" };
    let body = json!({ "error": format!("the {what} exceed {MAX_HEAD_BYTES} bytes, API Gateway's limit") }).to_string();
    let reason = status.canonical_reason().unwrap_or_default();
    let response = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A connection whose first bytes were already read: they are read again first.
struct Prefixed {
    prefix: Vec<u8>,
    read: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.read);
            buf.put_slice(&this.prefix[this.read..this.read + n]);
            this.read += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Returns once a stop is requested (or the handle is gone).
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn error_response(status: StatusCode, message: &str, extra: &[(&str, String)]) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(json!({ "error": message }).to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in extra {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(*name), HeaderValue::try_from(value.as_str())) {
            headers.insert(name, value);
        }
    }
    response
}

/// API Gateway's answer to a request its authorizer refused.
fn denied_response(denied: &crate::authorizer::Denied) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(denied.body().to_string())));
    *response.status_mut() = StatusCode::from_u16(denied.status()).unwrap_or(StatusCode::UNAUTHORIZED);
    let headers = response.headers_mut();
    headers.insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(challenge) = HeaderValue::try_from(denied.challenge()) {
        headers.insert(hyper::header::WWW_AUTHENTICATE, challenge);
    }
    response
}

async fn respond(
    state: Arc<State>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().as_str().to_ascii_uppercase();
    let path = request.uri().path().to_owned();
    let candidates: Vec<(&HttpRoute, BTreeMap<String, String>)> =
        state.routes.iter().filter_map(|r| r.matches(&path).map(|params| (r, params))).collect();
    let chosen = candidates
        .iter()
        .filter(|(r, _)| r.accepts(&method))
        .max_by_key(|(r, _)| r.specificity())
        .map(|(r, params)| (*r, params.clone()));
    let Some((route, path_parameters)) = chosen else {
        if candidates.is_empty() {
            return Ok(error_response(StatusCode::NOT_FOUND, &format!("no route for {method} {path}"), &[]));
        }
        let mut allow: Vec<&str> = candidates.iter().map(|(r, _)| r.method.as_str()).collect();
        allow.sort_unstable();
        allow.dedup();
        let message = format!("method {method} is not allowed for {path}");
        return Ok(error_response(StatusCode::METHOD_NOT_ALLOWED, &message, &[("allow", allow.join(", "))]));
    };
    let (parts, body) = request.into_parts();
    let jwt = match &route.auth {
        None => None,
        Some(auth) => {
            let authorization = parts.headers.get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            match auth.authorizer.authorize(authorization, &auth.scopes).await {
                // Its claims are strings, as API Gateway passes them.
                Ok(jwt) => serde_json::from_value(jwt).ok(),
                Err(denied) => {
                    info!(%method, %path, route = %route.route_key(), status = denied.status(), reason = ?denied, "request refused by the authorizer");
                    return Ok(denied_response(&denied));
                }
            }
        }
    };
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(error_response(StatusCode::PAYLOAD_TOO_LARGE, "the body is larger than 10 MB", &[]));
        }
        Err(e) => {
            debug!(error = %e, "reading the request body failed");
            return Ok(error_response(StatusCode::BAD_REQUEST, "the request body could not be read", &[]));
        }
    };
    let event = api_event(route, &parts, &body, path_parameters, jwt, peer, state.port);
    let started = std::time::Instant::now();
    // The function runs in the request's trace, as behind API Gateway.
    let trace = event.headers.get("x-amzn-trace-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let Ok(event) = serde_json::to_vec(&event) else {
        return Ok(error_response(StatusCode::BAD_REQUEST, "the request cannot be passed on as an event", &[]));
    };
    let invocation = state.functions.invoke_traced(&route.function, event, trace);
    let response = match tokio::time::timeout(MAX_TIMEOUT, invocation).await {
        Err(_) => {
            warn!(route = %route, "the integration timed out after 30 s");
            error_response(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable", &[])
        }
        Ok(Err(e)) => {
            error!(route = %route, error = %e, "the function failed");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error", &[])
        }
        Ok(Ok(answer)) => {
            serde_json::from_slice(&answer).map_err(anyhow::Error::from).and_then(to_response).unwrap_or_else(|e| {
                error!(route = %route, error = %e, "the function's response is malformed");
                error_response(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error", &[])
            })
        }
    };
    info!(%method, %path, route = %route.route_key(), status = response.status().as_u16(),
          ms = started.elapsed().as_millis() as u64, "request");
    Ok(response)
}

/// The payload 2.0 event API Gateway would send for this request and route, with the claims its
/// JWT authorizer verified.
fn api_event(
    route: &HttpRoute,
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    path_parameters: BTreeMap<String, String>,
    jwt: Option<ApiGatewayRequestAuthorizerJwtDescription>,
    peer: SocketAddr,
    port: u16,
) -> ApiGatewayV2httpRequest {
    let mut headers = HeaderMap::new();
    let mut cookies = Vec::new();
    for (name, value) in &parts.headers {
        if name == hyper::header::COOKIE {
            let value = String::from_utf8_lossy(value.as_bytes());
            cookies.extend(value.split(';').map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned));
            continue;
        }
        // Header names arrive lower-cased; repeated headers are joined with commas.
        let joined = match headers.get(name) {
            Some(existing) => HeaderValue::from_bytes(&[existing.as_bytes(), b",", value.as_bytes()].concat()),
            None => Ok(value.clone()),
        };
        headers.insert(name.clone(), joined.unwrap_or_else(|_| value.clone()));
    }
    let forwarded = [("x-forwarded-for", peer.ip().to_string()), ("x-forwarded-port", port.to_string())];
    // API Gateway starts a trace for a request that comes without one.
    let added = [("x-forwarded-proto", "http".into()), ("x-amzn-trace-id", crate::lambda::trace_id())];
    for (name, value) in forwarded.into_iter().chain(added) {
        if let (false, Ok(value)) = (headers.contains_key(name), HeaderValue::try_from(value)) {
            headers.insert(name, value);
        }
    }
    let text = |name: HeaderName| headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let host = text(hyper::header::HOST).unwrap_or_else(|| format!("127.0.0.1:{port}"));

    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut http = ApiGatewayV2httpRequestContextHttpDescription::default();
    http.method = parts.method.clone();
    http.path = Some(parts.uri.path().to_owned());
    http.protocol = Some(format!("{:?}", parts.version));
    http.source_ip = Some(peer.ip().to_string());
    http.user_agent = Some(text(hyper::header::USER_AGENT).unwrap_or_default());
    let mut context = ApiGatewayV2httpRequestContext::default();
    context.account_id = Some("000000000000".into());
    context.apiid = Some(route.api_id.clone().unwrap_or_else(|| "local".into()));
    context.domain_prefix = host.split(['.', ':']).next().map(str::to_owned);
    context.domain_name = Some(host);
    context.http = http;
    context.request_id = Some(format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)));
    context.route_key = Some(route.route_key());
    context.stage = Some("$default".into());
    context.time = Some(clf_time(now.as_secs() as i64));
    context.time_epoch = now.as_millis() as i64;
    context.authorizer = jwt.map(|jwt| {
        let mut authorizer = ApiGatewayRequestAuthorizer::default();
        authorizer.jwt = Some(jwt);
        authorizer
    });

    let mut event = ApiGatewayV2httpRequest::default();
    event.version = Some("2.0".into());
    event.route_key = context.route_key.clone();
    event.raw_path = Some(parts.uri.path().to_owned());
    let raw_query = parts.uri.query().unwrap_or_default();
    // Decoded, repeated parameters joined with commas (when the event is written).
    event.query_string_parameters = raw_query.parse().unwrap_or_default();
    event.raw_query_string = Some(raw_query.to_owned());
    event.headers = headers;
    event.cookies = (!cookies.is_empty()).then_some(cookies);
    event.path_parameters = path_parameters.into_iter().collect();
    event.request_context = context;
    if !body.is_empty() {
        // API Gateway sends bodies that are not text as base64.
        event.body = Some(match std::str::from_utf8(body) {
            Ok(text) => text.to_owned(),
            Err(_) => {
                event.is_base64_encoded = true;
                STANDARD.encode(body)
            }
        });
    }
    event
}

/// `22/Nov/2026:03:00:00 +0000`, as `requestContext.time` has it.
fn clf_time(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
            t.day(),
            &t.month().to_string()[..3],
            t.year(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => unix.to_string(),
    }
}

fn header_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The function's answer as an HTTP response (payload 2.0 response format).
fn to_response(answer: Value) -> anyhow::Result<Response<Full<Bytes>>> {
    let Some(status) = answer.get("statusCode") else {
        // Any other JSON is the body of a 200.
        let mut response = Response::new(Full::new(Bytes::from(answer.to_string())));
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(response);
    };
    let status = header_text(status).and_then(|s| s.parse::<u16>().ok()).context("statusCode is not a number")?;
    let status = StatusCode::from_u16(status).with_context(|| format!("statusCode {status} is not an HTTP status"))?;
    let body = match answer.get("body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(text)) if answer.get("isBase64Encoded") == Some(&Value::Bool(true)) => {
            STANDARD.decode(text).context("the body is not base64")?
        }
        Some(Value::String(text)) => text.clone().into_bytes(),
        Some(other) => other.to_string().into_bytes(),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in answer.get("headers").and_then(Value::as_object).into_iter().flatten() {
        let name = HeaderName::try_from(name.as_str()).with_context(|| format!("header name {name:?}"))?;
        let value = header_text(value).with_context(|| format!("header {name}"))?;
        headers.insert(name.clone(), HeaderValue::try_from(value).with_context(|| format!("header {name}"))?);
    }
    for (name, values) in answer.get("multiValueHeaders").and_then(Value::as_object).into_iter().flatten() {
        let name = HeaderName::try_from(name.as_str()).with_context(|| format!("header name {name:?}"))?;
        for value in values.as_array().into_iter().flatten().filter_map(header_text) {
            headers.append(name.clone(), HeaderValue::try_from(value).with_context(|| format!("header {name}"))?);
        }
    }
    for cookie in answer.get("cookies").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
        headers.append(hyper::header::SET_COOKIE, HeaderValue::try_from(cookie).context("cookie")?);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: &str, path: Option<&str>) -> HttpRoute {
        HttpRoute {
            function: "F".into(),
            event: "E".into(),
            method: method.into(),
            path: path.map(str::to_owned),
            api_id: None,
            segments: path.map(|p| parse_path(p).unwrap()).unwrap_or_default(),
            authorizer_name: None,
            scopes: Vec::new(),
            auth: None,
        }
    }

    #[test]
    fn sam_paths_match_segments() {
        let r = route("GET", Some("/orders/{id}"));
        assert_eq!(r.matches("/orders/o%2D1").unwrap()["id"], "o-1");
        assert!(r.matches("/orders/").is_none());
        assert!(r.matches("/orders").is_none());
        assert!(r.matches("/orders/a/b").is_none());
        let r = route("GET", Some("/customers/{id}/orders"));
        assert_eq!(r.matches("/customers/c1/orders").unwrap()["id"], "c1");
        assert!(r.matches("/customers/c1/payments").is_none());
        let greedy = route("ANY", Some("/files/{proxy+}"));
        assert_eq!(greedy.matches("/files/a/b.txt").unwrap()["proxy"], "a/b.txt");
        assert!(greedy.matches("/files").is_none());
        assert!(route("ANY", None).matches("/anything").is_some());
        assert!(parse_path("orders").is_err());
        assert!(parse_path("/orders/{}").is_err());
        assert!(parse_path("/a/{x+}/b").is_err());
    }

    #[test]
    fn the_most_specific_route_wins() {
        let literal = route("GET", Some("/orders/latest"));
        let param = route("GET", Some("/orders/{id}"));
        let any = route("ANY", Some("/orders/{id}"));
        let default = route("ANY", None);
        assert!(literal.specificity() > param.specificity());
        assert!(param.specificity() > any.specificity());
        assert!(any.specificity() > default.specificity());
    }

    #[test]
    fn responses_follow_the_payload_2_format() {
        let r = to_response(json!({
            "statusCode": 201,
            "headers": { "content-type": "application/json", "x-n": 3 },
            "cookies": ["a=1"],
            "body": "{\"ok\":true}",
        }))
        .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["x-n"], "3");
        assert_eq!(r.headers()["set-cookie"], "a=1");
        let plain = to_response(json!({ "hello": "world" })).unwrap();
        assert_eq!(plain.status(), 200);
        assert_eq!(plain.headers()["content-type"], "application/json");
        let binary = to_response(json!({ "statusCode": "200", "body": "aGk=", "isBase64Encoded": true })).unwrap();
        assert_eq!(binary.status(), 200);
        assert!(to_response(json!({ "statusCode": "nope" })).is_err());
        assert!(to_response(json!({ "statusCode": 200, "headers": { "bad name": "x" } })).is_err());
    }

    #[test]
    fn request_time_is_in_common_log_format() {
        assert_eq!(clf_time(1_795_143_600), "20/Nov/2026:03:00:00 +0000");
        assert_eq!(clf_time(1_767_225_599), "31/Dec/2025:23:59:59 +0000");
    }
}
