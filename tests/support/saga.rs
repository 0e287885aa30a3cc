//! A whole system per test: the project's template provisioned under a fresh stack name (its
//! own tables, queues, state machine), every function its own binary in the local Lambda
//! service, fed by the local runner, and helpers to place orders and watch their sagas.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use local_env::lambda::LambdaService;
use local_env::observe::{Finished, history, saga_steps, wait_for_saga};
use local_env::runner::{Invoke, Runner, RunnerClients, RunnerHandle};
use local_env::{Options, Stack, Template};
use serde_json::Value;
use shared::aggregate::Repository;
use shared::eventstore::{DynamoEventStore, EventStore, EventStoreConfig, RecordedEvent, StreamId};

use crate::{LocalAws, unique, workspace_root};

pub struct SagaEnv {
    pub aws: LocalAws,
    pub stack: Stack,
    pub service: Arc<LambdaService>,
    pub sfn: aws_sdk_sfn::Client,
    pub repo: Repository<DynamoEventStore>,
    running: Option<RunnerHandle>,
    run_id: String,
}

/// Test settings: redeliveries after 3 s instead of 60 (so a crashed or timed-out invocation's
/// message comes back quickly), two pollers per queue.
fn overrides() -> HashMap<String, String> {
    HashMap::from([
        ("StepVisibilityTimeout".to_owned(), "3".to_owned()),
        ("StepMaximumConcurrency".to_owned(), "2".to_owned()),
    ])
}

/// A message on a dead-letter queue.
#[derive(Debug)]
pub struct DeadLetter {
    pub body: String,
    /// The `reason` attribute the function gave it.
    pub reason: String,
    /// SQS's `ApproximateReceiveCount` of this receive.
    pub receive_count: Option<String>,
}

impl SagaEnv {
    pub async fn start() -> Self {
        Self::start_with(|_, service| service).await
    }

    /// Starts with the runner invoking through what `customise` makes of the Lambda service
    /// (to deliver twice, say). `None` starts no runner: nothing runs until invoked.
    pub async fn start_with(customise: impl FnOnce(&Stack, Arc<dyn Invoke>) -> Arc<dyn Invoke>) -> Self {
        Self::start_inner(Some(customise)).await
    }

    /// The system provisioned, the functions ready to be invoked, no event source running.
    pub async fn start_idle() -> Self {
        Self::start_inner(None::<fn(&Stack, Arc<dyn Invoke>) -> Arc<dyn Invoke>>).await
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
        Self { aws, stack, service, sfn, repo, running, run_id: unique("") }
    }

    async fn start_inner(customise: Option<impl FnOnce(&Stack, Arc<dyn Invoke>) -> Arc<dyn Invoke>>) -> Self {
        let aws = LocalAws::load().await;
        let template = Template::load(&workspace_root().join("template.yaml")).expect("template");
        let options = Options {
            stack_name: unique("s"),
            region: aws.var("AWS_REGION"),
            account_id: "000000000000".into(),
            parameter_overrides: overrides(),
        };
        let stack = local_env::provision(&template, &options, &aws.provisioning_clients()).await.expect("provision");
        assert!(stack.failed().is_empty() && stack.unresolved.is_empty(), "{}", local_env::report(&stack));
        let service = aws.lambda_service(&stack);
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
        Self { aws, stack, service, sfn, repo, running, run_id: unique("") }
    }

    pub fn state_machine(&self) -> &str {
        &self.stack.outputs["OrderSagaArn"]
    }

    /// The URL of a queue of the stack, by logical id.
    pub fn queue_url(&self, logical_id: &str) -> String {
        self.stack.resources[logical_id].reference.clone()
    }

    /// Receives from the stack's queue `logical_id` (a DLQ) until `want` messages are in or
    /// about `want_within` seconds pass; each as it was parked.
    pub async fn dead_letters(&self, logical_id: &str, want: usize, want_within: u32) -> Vec<DeadLetter> {
        let (sqs, url) = (self.aws.sqs(), self.queue_url(logical_id));
        let mut parked = Vec::new();
        for _ in 0..want_within {
            let got = sqs
                .receive_message()
                .queue_url(&url)
                .message_attribute_names("All")
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .expect("receive");
            for m in got.messages() {
                let attribute = m.message_attributes().and_then(|a| a.get("reason")).and_then(|a| a.string_value());
                let receive_count = m
                    .attributes()
                    .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount))
                    .cloned();
                parked.push(DeadLetter {
                    body: m.body().unwrap_or_default().to_owned(),
                    reason: attribute.unwrap_or_default().to_owned(),
                    receive_count,
                });
            }
            if parked.len() >= want {
                break;
            }
        }
        parked
    }

    /// A sample order from `events/place-order/`, with a test-unique id.
    pub fn sample(&self, name: &str) -> Value {
        local_env::demo::sample_order(&workspace_root().join("events/place-order"), name, &unique(&self.run_id[..6]))
            .expect("sample order")
    }

    /// Places an order by invoking the place-order binary directly; returns its id.
    pub async fn place(&self, order: Value) -> String {
        let id = order["orderId"].as_str().expect("orderId").to_owned();
        let answer = self.service.invoke_json(local_env::demo::PLACE_ORDER, &order).await.expect("place-order answers");
        assert_eq!(answer["orderId"], id.as_str(), "placing failed: {answer}");
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
        self.service.shutdown().await;
    }
}
