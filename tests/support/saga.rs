//! A whole system per test: the project's template provisioned under a fresh stack name (its
//! own tables, queues, state machine), every function its own binary in the local Lambda
//! service, fed by the local runner, its HTTP API served as API Gateway would, and helpers to
//! place orders (through that API, as clients do) and watch their sagas.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use handle_dead_letters::{DeadLetterHandler, SnsNotifier, SqsQueues, StreamReplayer};
use local_env::http::HttpHandle;
use local_env::lambda::LambdaService;
use local_env::observe::{Finished, history, saga_steps, wait_for_saga};
use local_env::providers::SimulatorProcess;
use local_env::runner::{Invoke, Runner, RunnerClients, RunnerHandle};
use local_env::{Options, Stack, Template};
use serde_json::Value;
use shared::adapters::dynamodb::readmodels::ReadModelStore;
use shared::adapters::dynamodb::{DynamoEventStore, EventStoreConfig};
use shared::aggregate::Repository;
use shared::domain::dead_letter::Status;
use shared::eventstore::{EventStore, RecordedEvent, StreamId};
use shared::readmodel::dead_letters::DeadLetterView;

use crate::http::request_as;
use crate::{LocalAws, unique, workspace_root};

pub struct SagaEnv {
    pub aws: LocalAws,
    pub stack: Stack,
    pub service: Arc<LambdaService>,
    pub sfn: aws_sdk_sfn::Client,
    pub repo: Repository<DynamoEventStore>,
    running: Option<RunnerHandle>,
    run_id: String,
    /// This test's own stack: its alarms and queues go when it stops.
    disposable: bool,
    /// The functions' Lambda endpoint (a test's own stack).
    invoke_api: Option<local_env::lambda::invoke_api::InvokeApi>,
    /// The providers the functions call: the simulator's own process (a test's own, so its
    /// faults touch no other test), which a test may kill and restart on its journal.
    pub providers: Option<SimulatorProcess>,
    /// The OIDC issuer the stack's HTTP API trusts.
    pub issuer: Option<local_env::issuer::Issuer>,
    /// The stack's HTTP API, served by its functions.
    http: Option<HttpHandle>,
}

/// Serves the stack's HTTP API on a free port, through `service`.
async fn serve(stack: &Stack, service: &Arc<LambdaService>) -> Option<HttpHandle> {
    let served = local_env::http::serve(stack, service.clone(), ([127, 0, 0, 1], 0).into()).await;
    Some(served.expect("serve the HTTP API"))
}

/// The provider simulator's binary, built once per test binary.
fn simulator_binary() -> &'static PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        local_env::providers::simulator_binary(&workspace_root(), None).expect("the provider simulator builds")
    })
}

/// A fresh journal for a test's simulator (its log beside it), in the temporary directory.
fn simulator_journal(stack_name: &str) -> PathBuf {
    std::env::temp_dir().join("order-saga-tests").join(format!("provider-simulator-{stack_name}.jsonl"))
}

/// Starts the provider simulator's process on `port` (0: any).
async fn start_simulator(port: u16, api_key: Option<String>, stack_name: &str) -> SimulatorProcess {
    let binary = simulator_binary();
    SimulatorProcess::start(binary, port, api_key, &simulator_journal(stack_name))
        .await
        .expect("the provider simulator starts")
}

/// Test settings: redeliveries after 3 s instead of 60 (so a crashed or timed-out invocation's
/// message comes back quickly), two pollers per queue, dead letters redriven within a second.
fn overrides() -> HashMap<String, String> {
    HashMap::from([
        ("StepVisibilityTimeout".to_owned(), "3".to_owned()),
        ("StepMaximumConcurrency".to_owned(), "2".to_owned()),
        ("PaymentMaximumConcurrency".to_owned(), "2".to_owned()),
        ("CarrierMaximumConcurrency".to_owned(), "2".to_owned()),
        ("NotifierMaximumConcurrency".to_owned(), "2".to_owned()),
        // A dead letter's automatic redrive after a second or so, not 30, and more of them.
        ("RedriveBaseDelaySeconds".to_owned(), "1".to_owned()),
        ("AutomaticRedrives".to_owned(), "10".to_owned()),
        // A stream batch the relay keeps failing is skipped (and replayed) after 3 retries, not 20.
        ("OutboxRelayMaximumRetryAttempts".to_owned(), "3".to_owned()),
        // Tests place many orders for one sample customer at once; `tests/rate_limit.rs` sets its own.
        ("OrdersPerCustomerPerMinute".to_owned(), "0".to_owned()),
    ])
}

impl SagaEnv {
    pub async fn start() -> Self {
        Self::start_with(|_, service| service).await
    }

    /// Starts with the runner invoking through what `customise` makes of the Lambda service
    /// (to deliver twice, say). `None` starts no runner: nothing runs until invoked.
    pub async fn start_with(customise: impl FnOnce(&Stack, Arc<dyn Invoke>) -> Arc<dyn Invoke>) -> Self {
        Self::start_inner(Some(customise), &[]).await
    }

    /// Starts with these template parameters set as well (`LogLevel`, say).
    pub async fn start_with_parameters(parameters: &[(&str, &str)]) -> Self {
        Self::start_inner(Some(|_: &Stack, service| service), parameters).await
    }

    /// The system provisioned, the functions ready to be invoked, no event source running.
    pub async fn start_idle() -> Self {
        Self::start_inner(None::<fn(&Stack, Arc<dyn Invoke>) -> Arc<dyn Invoke>>, &[]).await
    }

    /// The stack `scripts/env.sh up` provisioned (`.local/stack.json`), its runner resuming at the
    /// positions `local-env run` keeps, as a second `local-env run` would. For benchmarks: tables
    /// DynamoDB Local has just created answer several times slower (a fresh table with a stream:
    /// about 28 ms per TransactWriteItems against 6-10 ms on the provisioned one, measured side by
    /// side), which would be charged to whatever runs on them.
    pub async fn start_provisioned() -> Self {
        let aws = LocalAws::load().await;
        let file = workspace_root().join(".local/stack.json");
        let text = std::fs::read_to_string(&file).expect(".local/stack.json: run `scripts/env.sh up` first");
        let stack: Stack = serde_json::from_str(&text).expect("the provisioned stack");
        let service = aws.lambda_service(&stack);
        let env = stack.environment.clone();
        let config = EventStoreConfig::from_vars(&|n: &str| env.get(n).cloned()).expect("event store config");
        let repo = Repository::new(DynamoEventStore::new(aws.dynamodb(), config));
        local_env::demo::restock(&repo, local_env::demo::STOCK).await.expect("restock");
        let positions = workspace_root().join(".local/runner").join(format!("{}-positions.json", stack.stack_name));
        let clients = RunnerClients { sqs: aws.sqs(), streams: aws.dynamodb_streams() };
        let runner = Runner::new(&stack, clients, service.clone()).expect("runner").with_checkpoints(positions);
        let running = Some(runner.start());
        let sfn = aws.sfn();
        // The providers where `env.sh up` pointed the stack (asking for the stack's key), unless
        // something serves them already.
        let key = match local_env::providers::api_key_parameter(&stack) {
            Some(name) => local_env::providers::api_key(&aws.ssm(), &name).await.expect("the API key"),
            None => None,
        };
        let port = local_env::providers::port().expect("PROVIDER_SIMULATOR_PORT");
        let providers = if local_env::providers::answering(([127, 0, 0, 1], port).into()).await {
            None
        } else {
            Some(start_simulator(port, key, &unique(&format!("{}-", stack.stack_name))).await)
        };
        // The issuer `env.sh up` pointed the stack's HTTP API at, to sign the orders' tokens.
        let issuer_port = local_env::issuer::port().expect("LOCAL_ISSUER_PORT");
        let issuer = local_env::issuer::Issuer::start(([127, 0, 0, 1], issuer_port).into()).await;
        let issuer = issuer.expect("the local issuer's port is free (no `local-env run` at the same time)");
        let http = serve(&stack, &service).await;
        Self {
            aws,
            stack,
            service,
            sfn,
            repo,
            running,
            run_id: unique(""),
            disposable: false,
            invoke_api: None,
            providers,
            issuer: Some(issuer),
            http,
        }
    }

    async fn start_inner(
        customise: Option<impl FnOnce(&Stack, Arc<dyn Invoke>) -> Arc<dyn Invoke>>,
        parameters: &[(&str, &str)],
    ) -> Self {
        let aws = LocalAws::load().await;
        let template = Template::load(&workspace_root().join("template.yaml")).expect("template");
        // This stack's providers: its own simulator, asking for its own API key, kept in SSM.
        let stack_name = unique("s");
        let key_parameter = format!("{stack_name}-provider-api-key");
        let key = uuid::Uuid::new_v4().simple().to_string();
        local_env::providers::put_api_key(&aws.ssm(), &key_parameter, &key).await.expect("the API key in SSM");
        let providers = start_simulator(0, Some(key), &stack_name).await;
        let mut parameter_overrides = overrides();
        local_env::providers::point_at(&template, &providers.url(), &mut parameter_overrides);
        parameter_overrides.insert("ProviderApiKeyParameter".to_owned(), key_parameter);
        // Its HTTP API trusts its own issuer.
        let issuer =
            local_env::issuer::Issuer::start(([127, 0, 0, 1], 0).into()).await.expect("start the local issuer");
        local_env::issuer::point_at(&template, issuer.url(), &mut parameter_overrides);
        parameter_overrides.extend(parameters.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let options = Options {
            stack_name,
            region: aws.var("AWS_REGION"),
            account_id: "000000000000".into(),
            parameter_overrides,
        };
        let stack = local_env::provision(&template, &options, &aws.provisioning_clients()).await.expect("provision");
        assert!(stack.failed().is_empty() && stack.unresolved.is_empty(), "{}", local_env::report(&stack));
        let (service, invoke_api) = aws.lambda_service_and_api(&stack).await;
        let http = serve(&stack, &service).await;
        let env = stack.environment.clone();
        let config = EventStoreConfig::from_vars(&|n: &str| env.get(n).cloned()).expect("event store config");
        let repo = Repository::new(DynamoEventStore::new(aws.dynamodb(), config));
        local_env::demo::restock(&repo, local_env::demo::STOCK).await.expect("restock");
        let running = customise.map(|customise| {
            let functions = customise(&stack, service.clone());
            let clients = RunnerClients { sqs: aws.sqs(), streams: aws.dynamodb_streams() };
            Runner::new(&stack, clients, functions).expect("runner").start()
        });
        let sfn = aws.sfn();
        Self {
            aws,
            stack,
            service,
            sfn,
            repo,
            running,
            run_id: unique(""),
            disposable: true,
            invoke_api: Some(invoke_api),
            providers: Some(providers),
            issuer: Some(issuer),
            http,
        }
    }

    /// `Bearer <token>` of `customer`, from the issuer the stack's HTTP API trusts.
    pub fn customer_bearer(&self, customer: &str) -> String {
        self.issuer.as_ref().expect("the stack's issuer").customer_bearer(customer)
    }

    /// Where the stack's HTTP API is served.
    pub fn api(&self) -> SocketAddr {
        self.http.as_ref().expect("the HTTP API is served until the end").addr()
    }

    /// The HTTP API and issuer, as the demo and the scenarios place orders through them.
    pub fn demo_api(&self) -> local_env::demo::Api<'_> {
        local_env::demo::Api { addr: self.api(), issuer: self.issuer.as_ref().expect("the stack's issuer") }
    }

    pub fn state_machine(&self) -> &str {
        &self.stack.outputs["OrderSagaArn"]
    }

    /// The URL of a queue of the stack, by logical id.
    pub fn queue_url(&self, logical_id: &str) -> String {
        self.stack.resources[logical_id].reference.clone()
    }

    /// The dead letters the dead-letter handler recorded from the stack's DLQ `logical_id`, as
    /// the dead letters view lists them, once `want` of them are `settled` (or about
    /// `want_within` seconds pass).
    pub async fn dead_letters(
        &self,
        logical_id: &str,
        want: usize,
        settled: Status,
        want_within: u32,
    ) -> Vec<DeadLetterView> {
        let queue_arn = &self.stack.resources[logical_id].attributes["Arn"];
        let models = ReadModelStore::new(self.aws.dynamodb(), &self.stack.environment["READ_MODEL_TABLE"]);
        let mut found = Vec::new();
        for _ in 0..want_within * 2 {
            found = models.dead_letters(None, 10_000).await.expect("list dead letters");
            found.retain(|d| &d.dead_letter_queue == queue_arn);
            if found.iter().filter(|d| d.status == settled).count() >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        found
    }

    /// What the `ops` command line acts through, on this stack.
    pub fn operator(
        &self,
    ) -> DeadLetterHandler<DynamoEventStore, SqsQueues, SnsNotifier, aws_sdk_sfn::Client, StreamReplayer> {
        let env = &self.stack.environment;
        let config = EventStoreConfig::from_vars(&|n: &str| env.get(n).cloned()).expect("event store config");
        DeadLetterHandler {
            repo: Repository::new(DynamoEventStore::new(self.aws.dynamodb(), config)),
            queues: SqsQueues::new(self.aws.sqs()),
            notifier: SnsNotifier {
                client: self.aws.sns(),
                topic_arn: self.stack.resources["AlarmTopic"].reference.clone(),
            },
            tasks: self.aws.sfn(),
            replayer: StreamReplayer {
                streams: self.aws.dynamodb_streams(),
                lambda: self.aws.lambda(),
                region: self.aws.var("AWS_REGION"),
            },
            policy: shared::retry::RetryPolicy::no_retry(),
        }
    }

    /// A queue subscribed to the stack's alarm topic: who gets paged, for a test to read.
    pub async fn pager(&self) -> String {
        let sqs = self.aws.sqs();
        let name = format!("{}-pager", self.stack.stack_name);
        let url = sqs.create_queue().queue_name(&name).send().await.expect("pager queue").queue_url.expect("url");
        let arn = sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("pager arn")
            .attributes
            .and_then(|mut a| a.remove(&aws_sdk_sqs::types::QueueAttributeName::QueueArn))
            .expect("arn");
        let topic = &self.stack.resources["AlarmTopic"].reference;
        self.aws.sns().subscribe().topic_arn(topic).protocol("sqs").endpoint(arn).send().await.expect("subscribe");
        url
    }

    /// The notifications (`Subject`, `Message`) that reached `pager` until each of `about` is
    /// mentioned by one, or about `within` seconds pass.
    pub async fn told(&self, pager: &str, about: &[&str], within: u32) -> Vec<(String, String)> {
        let sqs = self.aws.sqs();
        let mut told: Vec<(String, String)> = Vec::new();
        for _ in 0..within {
            let got =
                sqs.receive_message().queue_url(pager).max_number_of_messages(10).wait_time_seconds(1).send().await;
            for m in got.expect("receive").messages() {
                let envelope: Value = serde_json::from_str(m.body().unwrap_or_default()).expect("an SNS envelope");
                let text = |k: &str| envelope[k].as_str().unwrap_or_default().to_owned();
                told.push((text("Subject"), text("Message")));
            }
            if about.iter().all(|a| told.iter().any(|(_, m)| m.contains(a))) {
                break;
            }
        }
        told
    }

    /// Crashes this test's provider simulator (SIGKILL): calls are refused until
    /// [`Self::restart_providers`].
    pub async fn kill_providers(&mut self) {
        self.providers.as_mut().expect("this test's provider simulator").kill().await.expect("kill the simulator");
    }

    /// Starts this test's provider simulator again, on its port and journal: it answers as it did.
    pub async fn restart_providers(&mut self) {
        let providers = self.providers.as_mut().expect("this test's provider simulator");
        providers.restart().await.expect("restart the simulator");
    }

    /// Sets a provider behaviour on this test's simulator (`PUT /control/behaviour`), e.g.
    /// `{"service": "payments", "operation": "refund", "errorRate": 1.0}`.
    pub async fn provider_behaviour(&self, behaviour: &Value) {
        let providers = self.providers.as_ref().expect("this test's provider simulator");
        let body = behaviour.to_string();
        let answer = crate::http::request(providers.addr(), "PUT", "/control/behaviour", Some(&body)).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }

    /// Back to normal for every provider (`DELETE /control/behaviour`).
    pub async fn providers_normal(&self) {
        let providers = self.providers.as_ref().expect("this test's provider simulator");
        let answer = crate::http::request(providers.addr(), "DELETE", "/control/behaviour", None).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }

    /// The provider's ledger entries whose idempotency key contains `id`: what it actually did.
    pub async fn provider_ledger(&self, id: &str) -> Vec<Value> {
        let providers = self.providers.as_ref().expect("this test's provider simulator");
        let target = format!("/control/ledger?contains={id}");
        let answer = crate::http::request(providers.addr(), "GET", &target, None).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer.body_json().expect("ledger JSON")["entries"].as_array().cloned().unwrap_or_default()
    }

    /// Every message in a function's CloudWatch Logs group (after shipping what is pending).
    pub async fn log_messages(&self, logical_id: &str) -> Vec<String> {
        self.service.flush_logs().await;
        let name = &self.service.spec(logical_id).expect("function").name;
        crate::log_messages(&self.aws.logs(), name).await
    }

    /// A sample order from `events/place-order/`, with a test-unique id.
    pub fn sample(&self, name: &str) -> Value {
        local_env::demo::sample_order(&workspace_root().join("events/place-order"), name, &unique(&self.run_id[..6]))
            .expect("sample order")
    }

    /// Places an order as its customer's client does: `POST /orders` on the stack's HTTP API,
    /// with their token; returns its id.
    pub async fn place(&self, order: Value) -> String {
        let id = order["orderId"].as_str().expect("orderId").to_owned();
        let bearer = self.customer_bearer(order["customerId"].as_str().unwrap_or_default());
        let answer = request_as(self.api(), "POST", "/orders", Some(&bearer), Some(&order.to_string())).await;
        assert!(matches!(answer.status, 200 | 201), "placing {id} failed: {} {}", answer.status, answer.body);
        id
    }

    pub async fn finished(&self, order_id: &str) -> Finished {
        wait_for_saga(&self.sfn, self.state_machine(), order_id, Duration::from_secs(90)).await.expect("saga ends")
    }

    pub async fn steps(&self, finished: &Finished) -> Vec<String> {
        saga_steps(&history(&self.sfn, &finished.execution_arn).await.expect("history"))
    }

    pub async fn events(&self, category: &str, id: &str) -> Vec<RecordedEvent> {
        self.repo.store().load(&StreamId::new(category, id).expect("stream id"), 0).await.expect("load")
    }

    pub async fn event_types(&self, category: &str, id: &str) -> Vec<String> {
        self.events(category, id).await.into_iter().map(|e| e.event_type).collect()
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
        if let Some(api) = self.invoke_api.take() {
            api.stop();
        }
        if let Some(http) = self.http.take() {
            http.stop().await;
        }
        if let Some(mut providers) = self.providers.take() {
            providers.stop().await;
            // What a passing test's simulator wrote is of no further use.
            let _ = std::fs::remove_file(providers.journal());
            let _ = std::fs::remove_file(providers.log());
        }
        if self.disposable
            && let Some(name) = local_env::providers::api_key_parameter(&self.stack)
        {
            let _ = self.aws.ssm().delete_parameter().name(name).send().await;
        }
        self.service.shutdown().await;
        if self.disposable {
            self.aws.remove_alarms_and_queues(&self.stack).await;
        }
    }
}
