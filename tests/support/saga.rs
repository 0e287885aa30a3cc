//! A whole system per test: the project's template provisioned under a fresh stack name (its
//! own tables, queues, state machine), every function running in the local runner, and helpers
//! to place orders and watch their sagas.

use std::collections::HashMap;
use std::time::Duration;

use local_env::functions::{FunctionClients, PlaceOrder};
use local_env::observe::{Finished, saga_steps, wait_for_saga};
use local_env::runner::{Handler, Runner, RunnerClients, RunnerHandle};
use local_env::{Options, Stack, Template};
use serde_json::Value;
use shared::aggregate::Repository;
use shared::eventstore::{DynamoEventStore, EventStore, EventStoreConfig, RecordedEvent, StreamId};

use crate::{LocalAws, unique, workspace_root};

pub struct SagaEnv {
    pub aws: LocalAws,
    pub stack: Stack,
    pub clients: FunctionClients,
    pub repo: Repository<DynamoEventStore>,
    pub place_order: PlaceOrder,
    running: Option<RunnerHandle>,
    run_id: String,
}

/// Test settings: redeliveries after 3 s instead of 60 (so a "crashed" handler's message comes
/// back quickly), two pollers per queue.
fn overrides() -> HashMap<String, String> {
    HashMap::from([
        ("StepVisibilityTimeout".to_owned(), "3".to_owned()),
        ("StepMaximumConcurrency".to_owned(), "2".to_owned()),
    ])
}

impl SagaEnv {
    pub async fn start() -> Self {
        Self::start_with(|_, _, handlers| handlers).await
    }

    /// Starts with the handlers as `customise` leaves them (to wrap or replace one).
    pub async fn start_with(
        customise: impl FnOnce(&Stack, &FunctionClients, HashMap<String, Handler>) -> HashMap<String, Handler>,
    ) -> Self {
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
        let clients =
            FunctionClients { dynamodb: aws.dynamodb(), sqs: aws.sqs(), sfn: aws.sfn(), events: aws.eventbridge() };
        let handlers = local_env::functions::handlers(&stack, &clients).expect("handlers");
        let handlers = customise(&stack, &clients, handlers);
        let runner = Runner::new(&stack, RunnerClients { sqs: aws.sqs(), streams: aws.dynamodb_streams() }, handlers)
            .expect("runner");
        let env = stack.environment.clone();
        let config = EventStoreConfig::from_vars(&|n: &str| env.get(n).cloned()).expect("event store config");
        let repo = Repository::new(DynamoEventStore::new(aws.dynamodb(), config));
        local_env::demo::restock(&repo, local_env::demo::STOCK).await.expect("restock");
        let place_order = PlaceOrder::new(&stack, &clients).expect("place order");
        let running = Some(runner.start());
        Self { aws, stack, clients, repo, place_order, running, run_id: unique("") }
    }

    pub fn state_machine(&self) -> &str {
        &self.stack.outputs["OrderSagaArn"]
    }

    /// The URL of a queue of the stack, by logical id.
    pub fn queue_url(&self, logical_id: &str) -> String {
        self.stack.resources[logical_id].reference.clone()
    }

    /// A sample order from `events/place-order/`, with a test-unique id.
    pub fn sample(&self, name: &str) -> Value {
        local_env::demo::sample_order(&workspace_root().join("events/place-order"), name, &unique(&self.run_id[..6]))
            .expect("sample order")
    }

    /// Places an order through the place-order function; returns its id.
    pub async fn place(&self, order: Value) -> String {
        let id = order["orderId"].as_str().expect("orderId").to_owned();
        let answer = self.place_order.invoke(order).await;
        assert_eq!(answer["orderId"], id.as_str(), "placing failed: {answer}");
        id
    }

    pub async fn finished(&self, order_id: &str) -> Finished {
        wait_for_saga(&self.clients.sfn, self.state_machine(), order_id, Duration::from_secs(90))
            .await
            .expect("saga ends")
    }

    pub async fn steps(&self, finished: &Finished) -> Vec<String> {
        saga_steps(&self.clients.sfn, &finished.execution_arn).await.expect("history")
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
    }
}
