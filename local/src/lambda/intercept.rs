//! A fault for crash tests: kill an instance at the moment it makes one AWS call (say
//! `SendTaskSuccess`, after its writes and before it tells the saga), so the call never leaves.
//!
//! Such an instance is started with each of its `AWS_ENDPOINT_URL*` pointed at a proxy of its own
//! on loopback, which forwards every request to the real endpoint unchanged, except the named
//! operation (matched on `X-Amz-Target`, as the JSON-protocol services send it: Step Functions,
//! DynamoDB, EventBridge, SQS): that one kills the process instead. Other instances talk to the
//! endpoints directly.

use std::collections::HashMap;
use std::convert::Infallible;

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

/// Puts a proxy in front of every endpoint of `env` (rewritten in place); the proxies kill the
/// instance (through `kill`) on a request for `operation`. Their tasks end with the instance.
pub async fn endpoints(
    env: &mut [(String, String)],
    operation: &str,
    kill: mpsc::Sender<()>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut proxies: HashMap<String, String> = HashMap::new();
    let mut tasks = Vec::new();
    for (key, value) in env.iter_mut().filter(|(k, _)| k.starts_with("AWS_ENDPOINT_URL")) {
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
        let (client, kill, operation) = (client.clone(), kill.clone(), operation.to_owned());
        tasks.push(tokio::spawn(super::accept(listener, move |request| {
            pass(client.clone(), target.clone(), kill.clone(), operation.clone(), request)
        })));
        proxies.insert(value.clone(), proxy.clone());
        *value = proxy;
    }
    Ok(tasks)
}

fn is_operation(request: &Request<Incoming>, operation: &str) -> bool {
    let target = request.headers().get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default();
    target.rsplit('.').next() == Some(operation)
}

async fn pass(
    client: Client<HttpConnector, Full<Bytes>>,
    target: Uri,
    kill: mpsc::Sender<()>,
    operation: String,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let failed = |status: StatusCode| {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = status;
        Ok(response)
    };
    if is_operation(&request, &operation) {
        let _ = kill.send(()).await;
        // The process is gone by now; nobody reads this.
        return failed(StatusCode::SERVICE_UNAVAILABLE);
    }
    let (mut parts, body) = request.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else { return failed(StatusCode::BAD_REQUEST) };
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
                Ok(body) => Ok(Response::from_parts(parts, Full::new(body.to_bytes()))),
                Err(_) => failed(StatusCode::BAD_GATEWAY),
            }
        }
        Err(e) => {
            warn!(error = %e, "the intercepted endpoint did not answer");
            failed(StatusCode::BAD_GATEWAY)
        }
    }
}
