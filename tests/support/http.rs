//! The HTTP API as a client sees it: the project's template provisioned under a fresh stack
//! name, its `HttpApi` routes served by the local HTTP server (`local_env::http`), which invokes
//! the functions' real binaries through the local Lambda service, and a minimal HTTP/1.1 client
//! over real TCP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use aws_sdk_dynamodb::types::AttributeValue;
use local_env::http::HttpHandle;
use local_env::issuer::Issuer;
use local_env::lambda::LambdaService;
use local_env::{Options, Stack, Template};
use serde::Serialize;
use serde_json::Value;
use shared::eventstore::{DynamoEventStore, EventStoreConfig};

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

pub use local_env::http_client::{HttpResponse, parse_links};

/// One request with `Authorization: bearer` (a body is sent as JSON); panics (failing the test)
/// when there is no HTTP answer.
pub async fn request_as(
    addr: SocketAddr,
    method: &str,
    target: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> HttpResponse {
    let mut headers = Vec::new();
    if let Some(bearer) = bearer {
        headers.push(("authorization", bearer));
    }
    local_env::http_client::request_with_headers(addr, method, target, &headers, body)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// One request; panics (failing the test) when there is no HTTP answer.
pub async fn request(addr: SocketAddr, method: &str, target: &str, body: Option<&str>) -> HttpResponse {
    local_env::http_client::request(addr, method, target, body).await.unwrap_or_else(|e| panic!("{e:#}"))
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
