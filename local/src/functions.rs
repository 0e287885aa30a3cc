//! The project's functions in process: for each function of the template, the handler its
//! Lambda runs, built with that function's own environment (resolved from `template.yaml`).
//! The runner feeds them from their event sources, as Lambda would.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use anyhow::{Context, bail};
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use serde_json::Value;
use shared::aggregate::Repository;
use shared::domain::services::Simulated;
use shared::eventstore::{DynamoEventStore, EventStoreConfig};
use shared::readmodel::runtime::ProjectionLambda;
use shared::saga::runtime::StepLambda;

use crate::Stack;
use crate::http::{HttpFn, http_fn};
use crate::runner::Handler;

/// The clients every function is built with, each pointed at its emulator.
#[derive(Clone)]
pub struct FunctionClients {
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub sfn: aws_sdk_sfn::Client,
    pub events: aws_sdk_eventbridge::Client,
}

impl FunctionClients {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self {
            dynamodb: aws_sdk_dynamodb::Client::new(config),
            sqs: aws_sdk_sqs::Client::new(config),
            sfn: aws_sdk_sfn::Client::new(config),
            events: aws_sdk_eventbridge::Client::new(config),
        }
    }
}

/// The crate a function is built from: the last part of its `CodeUri`.
pub fn crate_of(stack: &Stack, logical_id: &str) -> Option<String> {
    let uri = stack.function_properties.get(logical_id)?.get("CodeUri")?.as_str()?;
    uri.trim_end_matches('/').rsplit('/').next().map(str::to_owned)
}

fn lookup(env: &BTreeMap<String, String>) -> impl Fn(&str) -> Option<String> + Sync + '_ {
    move |name| env.get(name).cloned().filter(|v| !v.is_empty())
}

fn step_lambda<X>(
    clients: &FunctionClients,
    vars: &(dyn Fn(&str) -> Option<String> + Sync),
    services: X,
) -> Result<StepLambda<X>, shared::config::ConfigError> {
    StepLambda::new(clients.dynamodb.clone(), clients.sfn.clone(), clients.sqs.clone(), vars, services)
}

fn projection<F, Fut>(
    clients: &FunctionClients,
    vars: &(dyn Fn(&str) -> Option<String> + Sync),
    handle: F,
) -> Result<Handler, shared::config::ConfigError>
where
    F: Fn(Arc<ProjectionLambda>, SqsEvent) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = SqsBatchResponse> + Send + 'static,
{
    let lambda = Arc::new(ProjectionLambda::new(clients.dynamodb.clone(), clients.sqs.clone(), vars)?);
    Ok(Handler::sqs(move |event| {
        let invocation = handle(lambda.clone(), event);
        async move { Ok(invocation.await) }
    }))
}

fn step<X, F, Fut>(lambda: StepLambda<X>, handle: F) -> Handler
where
    X: Send + Sync + 'static,
    F: Fn(Arc<StepLambda<X>>, SqsEvent) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = SqsBatchResponse> + Send + 'static,
{
    let lambda = Arc::new(lambda);
    Handler::sqs(move |event| {
        let invocation = handle(lambda.clone(), event);
        async move { Ok(invocation.await) }
    })
}

/// A handler for every event-driven function of the stack, by logical id. Functions invoked
/// directly or over HTTP (place-order) are left out: see [`PlaceOrder`].
pub fn handlers(stack: &Stack, clients: &FunctionClients) -> anyhow::Result<HashMap<String, Handler>> {
    let mut handlers = HashMap::new();
    for logical_id in stack.function_properties.keys() {
        if let Some(handler) = handler_for(stack, logical_id, clients)? {
            handlers.insert(logical_id.clone(), handler);
        }
    }
    Ok(handlers)
}

/// The handler of one function, built with its environment and the given clients; `None` for
/// a function that no event source invokes.
pub fn handler_for(stack: &Stack, logical_id: &str, clients: &FunctionClients) -> anyhow::Result<Option<Handler>> {
    let name = crate_of(stack, logical_id).with_context(|| format!("{logical_id} has no CodeUri"))?;
    let env = stack.functions.get(logical_id).cloned().unwrap_or_default();
    let vars = lookup(&env);
    let configuring = || format!("configuring {logical_id}");
    let sim = || Simulated::from_vars(&vars).with_context(configuring);
    Ok(Some(match name.as_str() {
        "reserve-inventory" => step(step_lambda(clients, &vars, ()).with_context(configuring)?, |l, e| async move {
            reserve_inventory::handle(&l, e).await
        }),
        "release-inventory" => step(step_lambda(clients, &vars, ()).with_context(configuring)?, |l, e| async move {
            release_inventory::handle(&l, e).await
        }),
        "charge-payment" => step(step_lambda(clients, &vars, sim()?).with_context(configuring)?, |l, e| async move {
            charge_payment::handle(&l, e).await
        }),
        "refund-payment" => step(step_lambda(clients, &vars, sim()?).with_context(configuring)?, |l, e| async move {
            refund_payment::handle(&l, e).await
        }),
        "create-shipment" => step(step_lambda(clients, &vars, sim()?).with_context(configuring)?, |l, e| async move {
            create_shipment::handle(&l, e).await
        }),
        "cancel-shipment" => step(step_lambda(clients, &vars, sim()?).with_context(configuring)?, |l, e| async move {
            cancel_shipment::handle(&l, e).await
        }),
        "send-notification" => {
            step(step_lambda(clients, &vars, sim()?).with_context(configuring)?, |l, e| async move {
                send_notification::handle(&l, e).await
            })
        }
        "finalize-order" => step(step_lambda(clients, &vars, ()).with_context(configuring)?, |l, e| async move {
            finalize_order::handle(&l, e).await
        }),
        "saga-starter" => {
            let starter = Arc::new(
                saga_starter::Starter::new(clients.sfn.clone(), clients.sqs.clone(), &vars)
                    .with_context(configuring)?,
            );
            Handler::dynamodb_stream(move |event| {
                let starter = starter.clone();
                async move { Ok(saga_starter::handle(&starter, event).await) }
            })
        }
        "outbox-relay" => {
            let bus = outbox_relay::EventBridgeBus::new(clients.events.clone(), &vars).with_context(configuring)?;
            let relay = Arc::new(outbox_relay::Relay { bus, retry: shared::retry::RetryPolicy::default() });
            Handler::dynamodb_stream(move |event| {
                let relay = relay.clone();
                async move { Ok(outbox_relay::handle(&relay, event).await) }
            })
        }
        "project-order-view" => {
            projection(clients, &vars, |l, e| async move { project_order_view::handle(&l, e).await })
                .with_context(configuring)?
        }
        "project-customer-orders" => {
            projection(clients, &vars, |l, e| async move { project_customer_orders::handle(&l, e).await })
                .with_context(configuring)?
        }
        "project-inventory" => projection(clients, &vars, |l, e| async move { project_inventory::handle(&l, e).await })
            .with_context(configuring)?,
        "project-sales" => projection(clients, &vars, |l, e| async move { project_sales::handle(&l, e).await })
            .with_context(configuring)?,
        // Invoked over HTTP (or directly): see [`http_handlers`].
        "place-order" | "query-api" => return Ok(None),
        other => bail!("{logical_id}: no in-process handler for crate {other}"),
    }))
}

/// The functions invoked over the HTTP API (place-order, query-api), by logical id, each built
/// with its own environment: what [`crate::http::serve`] serves.
pub fn http_handlers(stack: &Stack, clients: &FunctionClients) -> anyhow::Result<HashMap<String, HttpFn>> {
    let mut handlers = HashMap::new();
    for logical_id in stack.function_properties.keys() {
        let env = stack.functions.get(logical_id).cloned().unwrap_or_default();
        let vars = lookup(&env);
        let configuring = || format!("configuring {logical_id}");
        let handler = match crate_of(stack, logical_id).as_deref() {
            Some("place-order") => {
                let config = EventStoreConfig::from_vars(&vars).with_context(configuring)?;
                let repo = Arc::new(Repository::new(DynamoEventStore::new(clients.dynamodb.clone(), config)));
                http_fn(move |event| {
                    let repo = repo.clone();
                    async move { place_order::handle(&repo, event).await }
                })
            }
            Some("query-api") => {
                let config = query_api::Config::from_vars(&vars).with_context(configuring)?;
                let api = Arc::new(query_api::QueryApi::new(clients.dynamodb.clone(), config));
                http_fn(move |event| {
                    let api = api.clone();
                    async move { api.handle(event).await }
                })
            }
            _ => continue,
        };
        handlers.insert(logical_id.clone(), handler);
    }
    Ok(handlers)
}

/// The place-order function, to be called directly (as a direct Lambda invocation is).
pub struct PlaceOrder {
    repo: Repository<DynamoEventStore>,
}

impl PlaceOrder {
    pub fn new(stack: &Stack, clients: &FunctionClients) -> anyhow::Result<Self> {
        let id = stack
            .function_properties
            .keys()
            .find(|id| crate_of(stack, id).as_deref() == Some("place-order"))
            .context("the template has no place-order function")?;
        let env = stack.functions.get(id).cloned().unwrap_or_default();
        let config = EventStoreConfig::from_vars(&lookup(&env))?;
        Ok(Self { repo: Repository::new(DynamoEventStore::new(clients.dynamodb.clone(), config)) })
    }

    pub async fn invoke(&self, event: Value) -> Value {
        place_order::handle(&self.repo, event).await
    }
}
