//! The HTTP API as a client sees it: the project's template provisioned under a fresh stack
//! name, its `HttpApi` routes served by the local HTTP server (`local_env::http`), which invokes
//! the functions' real binaries through the local Lambda service, and reqwest as the client.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use aws_sdk_dynamodb::types::AttributeValue;
use local_env::http::HttpHandle;
use local_env::issuer::Issuer;
use local_env::lambda::LambdaService;
use local_env::{Options, Stack, Template};
use serde::Serialize;
use serde_json::Value;
use shared::adapters::dynamodb::{DynamoEventStore, EventStoreConfig};

use crate::{LocalAws, unique, workspace_root};

/// The function that serves the query routes.
pub const QUERY_API: &str = "QueryApiFunction";

/// One stack per test binary: provisioning is the slow part, and every test uses its own ids.
/// It is provisioned on a runtime of its own, since each test has its own runtime.
fn provisioned() -> Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK
        .get_or_init(|| {
            std::thread::spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                runtime.block_on(async {
                    let aws = LocalAws::load().await;
                    let template = Template::load(&workspace_root().join("template.yaml")).expect("template");
                    // The API trusts this binary's issuer.
                    let parameter_overrides =
                        HashMap::from([(local_env::issuer::ISSUER_PARAMETER.to_owned(), issuer().url().to_owned())]);
                    let options = Options {
                        stack_name: unique("q"),
                        region: aws.var("AWS_REGION"),
                        account_id: "000000000000".into(),
                        parameter_overrides,
                    };
                    let stack = local_env::provision(&template, &options, &aws.provisioning_clients())
                        .await
                        .expect("provision");
                    assert!(stack.failed().is_empty() && stack.unresolved.is_empty(), "{}", local_env::report(&stack));
                    stack
                })
            })
            .join()
            .expect("provisioning thread")
        })
        .clone()
}

/// One local OIDC issuer per test binary, serving its keys from a runtime of its own (each
/// test has its own runtime, and the provisioned stack trusts this issuer's URL). Tokens are
/// signed in process.
pub fn issuer() -> &'static Issuer {
    static ISSUER: OnceLock<Issuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let (started, issuer) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let issuer = Issuer::start(([127, 0, 0, 1], 0).into()).await.expect("start the local issuer");
                started.send(issuer).expect("hand the issuer over");
                std::future::pending::<()>().await;
            });
        });
        issuer.recv().expect("the local issuer starts")
    })
}

pub struct ApiEnv {
    pub aws: LocalAws,
    pub stack: Stack,
    pub service: Arc<LambdaService>,
    pub store: DynamoEventStore,
    pub read_model_table: String,
    pub server: HttpHandle,
}

impl ApiEnv {
    /// The stack's HTTP API, served on a free port by the project's functions.
    pub async fn start() -> Self {
        let aws = LocalAws::load().await;
        let stack = provisioned();
        let service = aws.lambda_service(&stack);
        let server = local_env::http::serve(&stack, service.clone(), ([127, 0, 0, 1], 0).into())
            .await
            .expect("serve the HTTP API");
        let env = stack.functions.get(QUERY_API).cloned().expect("the template has QueryApiFunction");
        let config = EventStoreConfig::from_vars(&|n: &str| env.get(n).cloned()).expect("event store config");
        let store = DynamoEventStore::new(aws.dynamodb(), config);
        let read_model_table = env.get("READ_MODEL_TABLE").cloned().expect("READ_MODEL_TABLE");
        Self { aws, stack, service, store, read_model_table, server }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `GET target` as an operator (who may read everything).
    pub async fn get(&self, target: &str) -> HttpResponse {
        self.request("GET", target, None).await
    }

    /// `GET target` with `Authorization: bearer` (none: no header).
    pub async fn get_as(&self, target: &str, bearer: Option<&str>) -> HttpResponse {
        request_as(self.addr(), "GET", target, bearer, None).await
    }

    /// A request as an operator.
    pub async fn request(&self, method: &str, target: &str, body: Option<&str>) -> HttpResponse {
        request_as(self.addr(), method, target, Some(&issuer().operator_bearer()), body).await
    }

    /// Writes a read model item as the projections do: the model's attributes (serde_dynamo)
    /// plus its key and a revision.
    pub async fn put_model(&self, (pk, sk): (String, String), model: &impl Serialize) {
        let mut item: HashMap<String, AttributeValue> =
            serde_dynamo::aws_sdk_dynamodb_1::to_item(model).expect("a read model is an item");
        item.insert("pk".into(), AttributeValue::S(pk));
        item.insert("sk".into(), AttributeValue::S(sk));
        item.insert("revision".into(), AttributeValue::N("1".into()));
        self.aws
            .dynamodb()
            .put_item()
            .table_name(&self.read_model_table)
            .set_item(Some(item))
            .send()
            .await
            .expect("put read model item");
    }

    pub async fn stop(self) {
        self.server.stop().await;
        self.service.shutdown().await;
    }
}

/// An error answer must be JSON `{"error": "<message>"}` and say nothing of the SDK or AWS.
pub fn assert_clean_error(response: &HttpResponse, status: u16) {
    assert_eq!(response.status, status, "{}", response.body);
    assert!(
        response.header("content-type").is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        response.headers
    );
    let body = response.json();
    let object = body.as_object().unwrap_or_else(|| panic!("not an object: {body}"));
    assert!(object.len() == 1 && object["error"].is_string(), "{body}");
    let lowered = response.body.to_ascii_lowercase();
    for leak in [
        "dispatch",
        "service error",
        "exception",
        "dynamodb",
        "sdk",
        "aws",
        "http://",
        "127.0.0.1:8000",
        "timeout",
        "connector",
    ] {
        assert!(!lowered.contains(leak), "the error body leaks {leak:?}: {}", response.body);
    }
}

/// An answer as the tests read it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl HttpResponse {
    /// The answer of `request` (sent as `system-tests`, accepting JSON), or why there was none.
    pub async fn of(request: reqwest::RequestBuilder) -> anyhow::Result<Self> {
        let response = request.header("user-agent", "system-tests").header("accept", "application/json").send().await?;
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        Ok(Self { status, headers, body: response.text().await? })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn body_json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.body).map_err(|e| anyhow::anyhow!("not JSON ({e}): {}", self.body))
    }

    /// The `Link` header's targets by `rel`.
    pub fn links(&self) -> BTreeMap<String, String> {
        self.header("link").map(parse_links).unwrap_or_default()
    }
}

/// `<url>; rel="next", <url>; rel="prev"` → {next: url, prev: url}.
pub fn parse_links(header: &str) -> BTreeMap<String, String> {
    header
        .split(", <")
        .filter_map(|part| {
            let (url, params) = part.trim().trim_start_matches('<').split_once('>')?;
            let rel = params.split(';').find_map(|p| p.trim().strip_prefix("rel="))?;
            Some((rel.trim_matches('"').to_owned(), url.to_owned()))
        })
        .collect()
}

/// `method http://addr target` with these headers and a JSON body, if any.
pub fn build(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> reqwest::RequestBuilder {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
    let mut request = local_env::http_client().request(method, format!("http://{addr}{target}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    match body {
        Some(body) => request.header("content-type", "application/json").body(body.to_owned()),
        None => request,
    }
}

/// One request with these headers (a body is sent as JSON); panics (failing the test) when
/// there is no HTTP answer.
pub async fn request_with_headers(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResponse {
    let what = format!("{method} {target}");
    HttpResponse::of(build(addr, method, target, headers, body)).await.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// One request with `Authorization: bearer` (a body is sent as JSON); panics (failing the test)
/// when there is no HTTP answer.
pub async fn request_as(
    addr: SocketAddr,
    method: &str,
    target: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> HttpResponse {
    let headers: Vec<(&str, &str)> = bearer.map(|b| ("authorization", b)).into_iter().collect();
    request_with_headers(addr, method, target, &headers, body).await
}

/// One request; panics (failing the test) when there is no HTTP answer.
pub async fn request(addr: SocketAddr, method: &str, target: &str, body: Option<&str>) -> HttpResponse {
    request_with_headers(addr, method, target, &[], body).await
}

/// The body as JSON, failing the test when it is not.
pub trait Json {
    fn json(&self) -> Value;
}

impl Json for HttpResponse {
    fn json(&self) -> Value {
        self.body_json().unwrap_or_else(|e| panic!("{e:#}"))
    }
}
