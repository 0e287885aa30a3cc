//! Proxies in front of AWS endpoints, which see every request and answer on its way: a [`Tap`]
//! decides what happens. Operations are told apart by `X-Amz-Target`, as the JSON-protocol
//! services send it (Step Functions, DynamoDB, EventBridge, SQS, CloudWatch Logs).
//!
//! - [`KillOnCall`], a fault for crash tests: kill an instance at the moment it makes one AWS
//!   call (say `SendTaskSuccess`, after its writes and before it tells the saga), so the call
//!   never leaves. Such an instance is started with each of its `AWS_ENDPOINT_URL*` pointed at
//!   proxies of its own.
//! - The run's cost meter ([`crate::meter`]), in front of every function and poller.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

/// What a proxy does with each request and answer.
pub trait Tap: Send + Sync + 'static {
    /// Sees (and may rewrite) a request for `operation` (the `X-Amz-Target`, empty for other
    /// protocols) before it is forwarded; `false` stops it (answered 503).
    fn request(&self, operation: &str, body: &mut Bytes) -> impl Future<Output = bool> + Send;
    /// Sees the answer.
    fn response(&self, _operation: &str, _status: StatusCode, _body: &Bytes) {}
}

/// Kills the instance (through the channel) on a request for `operation`.
pub struct KillOnCall {
    pub operation: String,
    pub kill: mpsc::Sender<()>,
}

impl Tap for KillOnCall {
    async fn request(&self, operation: &str, _body: &mut Bytes) -> bool {
        if operation.rsplit('.').next() != Some(self.operation.as_str()) {
            return true;
        }
        let _ = self.kill.send(()).await;
        // The process is gone by now; nobody reads the answer.
        false
    }
}

/// Puts a proxy in front of every `AWS_ENDPOINT_URL*` among `env` (rewritten in place; one proxy
/// per distinct URL). The proxies' tasks run until aborted.
pub async fn endpoints<'a, T: Tap>(
    env: impl Iterator<Item = (&'a str, &'a mut String)>,
    tap: Arc<T>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut proxies: HashMap<String, String> = HashMap::new();
    let mut tasks = Vec::new();
    for (key, value) in env.filter(|(k, _)| k.starts_with("AWS_ENDPOINT_URL")) {
        if let Some(proxy) = proxies.get(value.as_str()) {
            *value = proxy.clone();
            continue;
        }
        let Ok(target) = value.parse::<Uri>() else {
            warn!(%key, %value, "not a URL: this endpoint is not intercepted");
            continue;
        };
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let proxy = format!("http://{}", listener.local_addr()?);
        let (client, tap) = (client.clone(), tap.clone());
        tasks.push(tokio::spawn(super::accept(listener, move |request| {
            pass(client.clone(), target.clone(), tap.clone(), request)
        })));
        proxies.insert(value.clone(), proxy.clone());
        *value = proxy;
    }
    Ok(tasks)
}

async fn pass<T: Tap>(
    client: Client<HttpConnector, Full<Bytes>>,
    target: Uri,
    tap: Arc<T>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let failed = |status: StatusCode| {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = status;
        Ok(response)
    };
    let (mut parts, body) = request.into_parts();
    let Ok(mut body) = body.collect().await.map(|b| b.to_bytes()) else { return failed(StatusCode::BAD_REQUEST) };
    let operation = parts.headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let length = body.len();
    if !tap.request(&operation, &mut body).await {
        return failed(StatusCode::SERVICE_UNAVAILABLE);
    }
    if body.len() != length {
        // Rewritten: the client sets the new length.
        parts.headers.remove(hyper::header::CONTENT_LENGTH);
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) =
        format!("{}://{}{path}", target.scheme_str().unwrap_or("http"), target.authority().map_or("", |a| a.as_str()))
            .parse::<Uri>()
    else {
        return failed(StatusCode::BAD_GATEWAY);
    };
    if let Some(host) = target.authority().and_then(|a| hyper::header::HeaderValue::from_str(a.as_str()).ok()) {
        parts.headers.insert(hyper::header::HOST, host);
    }
    parts.uri = uri;
    match client.request(Request::from_parts(parts, Full::new(body))).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            match body.collect().await {
                Ok(body) => {
                    let body = body.to_bytes();
                    tap.response(&operation, parts.status, &body);
                    Ok(Response::from_parts(parts, Full::new(body)))
                }
                Err(_) => failed(StatusCode::BAD_GATEWAY),
            }
        }
        Err(e) => {
            warn!(error = %e, "the intercepted endpoint did not answer");
            failed(StatusCode::BAD_GATEWAY)
        }
    }
}
