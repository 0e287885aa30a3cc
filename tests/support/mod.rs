//! Shared by the integration tests and benchmarks: the emulator environment and a small
//! aggregate to exercise the event store with.
//!
//! The environment is the one `scripts/env.sh up` provisioned (`.local/aws.env`), overlaid by
//! the process environment, so `cargo test` works with or without the file sourced.

pub mod http;
pub mod invoke;
pub mod saga;
pub mod tally;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use local_env::lambda::invoke_api::InvokeApi;
use local_env::lambda::{LambdaService, binaries};
use local_env::{Stack, Status};
use shared::adapters::dynamodb::{DynamoEventStore, EventStoreConfig};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub struct LocalAws {
    pub vars: BTreeMap<String, String>,
    config: SdkConfig,
}

impl LocalAws {
    /// Loads the provisioned environment; panics with the fix when it is missing.
    pub async fn load() -> Self {
        let file = workspace_root().join(".local/aws.env");
        let mut vars = std::fs::read_to_string(&file).map(|t| local_env::envfile::parse(&t)).unwrap_or_default();
        for (k, v) in std::env::vars() {
            if vars.contains_key(&k) || k.starts_with("AWS_") {
                vars.insert(k, v);
            }
        }
        assert!(
            vars.contains_key("AWS_ENDPOINT_URL_DYNAMODB") || vars.contains_key("AWS_ENDPOINT_URL"),
            "no emulator endpoints: run `scripts/env.sh up` first (it writes {})",
            file.display()
        );
        let region = vars.get("AWS_REGION").cloned().unwrap_or_else(|| "us-east-1".into());
        let credentials = aws_sdk_dynamodb::config::Credentials::new(
            vars.get("AWS_ACCESS_KEY_ID").cloned().unwrap_or_else(|| "test".into()),
            vars.get("AWS_SECRET_ACCESS_KEY").cloned().unwrap_or_else(|| "test".into()),
            None,
            None,
            "local-env",
        );
        let config = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region))
            .credentials_provider(credentials)
            .load()
            .await;
        Self { vars, config }
    }

    pub fn var(&self, name: &str) -> String {
        self.vars.get(name).cloned().unwrap_or_else(|| panic!("{name} is not provisioned: run `scripts/env.sh up`"))
    }

    /// The endpoint for one service, as the SDK would pick it from `AWS_ENDPOINT_URL_<ID>`.
    fn endpoint(&self, service_id: &str) -> Option<String> {
        self.vars.get(&format!("AWS_ENDPOINT_URL_{service_id}")).or_else(|| self.vars.get("AWS_ENDPOINT_URL")).cloned()
    }

    pub fn sdk_config(&self) -> &SdkConfig {
        &self.config
    }

    pub fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::from_conf(self.dynamodb_config().build())
    }

    /// DynamoDB client configuration, for callers that add to it (e.g. an interceptor).
    pub fn dynamodb_config(&self) -> aws_sdk_dynamodb::config::Builder {
        let mut b = aws_sdk_dynamodb::config::Builder::from(&self.config);
        b.set_endpoint_url(self.endpoint("DYNAMODB"));
        b
    }

    pub fn sqs(&self) -> aws_sdk_sqs::Client {
        let mut b = aws_sdk_sqs::config::Builder::from(&self.config);
        b.set_endpoint_url(self.endpoint("SQS"));
        aws_sdk_sqs::Client::from_conf(b.build())
    }

    pub fn eventbridge(&self) -> aws_sdk_eventbridge::Client {
        let mut b = aws_sdk_eventbridge::config::Builder::from(&self.config);
        b.set_endpoint_url(self.endpoint("EVENTBRIDGE"));
        aws_sdk_eventbridge::Client::from_conf(b.build())
    }

    pub fn dynamodb_streams(&self) -> aws_sdk_dynamodbstreams::Client {
        let mut b = aws_sdk_dynamodbstreams::config::Builder::from(&self.config);
        b.set_endpoint_url(self.endpoint("DYNAMODB_STREAMS").or_else(|| self.endpoint("DYNAMODB")));
        aws_sdk_dynamodbstreams::Client::from_conf(b.build())
    }

    pub fn cloudwatch(&self) -> aws_sdk_cloudwatch::Client {
        let mut b = aws_sdk_cloudwatch::config::Builder::from(&self.config);
        b.set_endpoint_url(self.endpoint("CLOUDWATCH"));
        aws_sdk_cloudwatch::Client::from_conf(b.build())
    }

    pub fn lambda(&self) -> aws_sdk_lambda::Client {
        let mut b = aws_sdk_lambda::config::Builder::from(&self.config);
        b.set_endpoint_url(self.endpoint("LAMBDA"));
        aws_sdk_lambda::Client::from_conf(b.build())
    }

    pub fn sfn(&self) -> aws_sdk_sfn::Client {
        let mut b = aws_sdk_sfn::config::Builder::from(&self.config);
        b.set_endpoint_url(self.endpoint("SFN"));
        aws_sdk_sfn::Client::from_conf(b.build())
    }

    pub fn logs(&self) -> aws_sdk_cloudwatchlogs::Client {
        let mut b = aws_sdk_cloudwatchlogs::config::Builder::from(&self.config);
        b.set_endpoint_url(self.endpoint("CLOUDWATCH_LOGS"));
        aws_sdk_cloudwatchlogs::Client::from_conf(b.build())
    }

    pub fn sns(&self) -> aws_sdk_sns::Client {
        let mut b = aws_sdk_sns::config::Builder::from(&self.config);
        b.set_endpoint_url(self.endpoint("SNS"));
        aws_sdk_sns::Client::from_conf(b.build())
    }

    pub fn ssm(&self) -> aws_sdk_ssm::Client {
        let mut b = aws_sdk_ssm::config::Builder::from(&self.config);
        b.set_endpoint_url(self.endpoint("SSM"));
        aws_sdk_ssm::Client::from_conf(b.build())
    }

    /// Clients for the provisioner, each pointed at its own emulator.
    pub fn provisioning_clients(&self) -> local_env::Clients {
        local_env::Clients {
            dynamodb: self.dynamodb(),
            sqs: self.sqs(),
            events: self.eventbridge(),
            sfn: self.sfn(),
            cloudwatch: self.cloudwatch(),
            logs: self.logs(),
            sns: self.sns(),
        }
    }

    /// Deletes a test stack's alarms and queues once it is done with them: LocalStack evaluates
    /// every alarm each `Period` x `EvaluationPeriods` and publishes every queue's depth each
    /// minute for as long as it runs, so a stack left behind keeps the idle emulator busy.
    pub async fn remove_alarms_and_queues(&self, stack: &Stack) {
        let of_kind = |kind: &str| -> Vec<String> {
            stack
                .outcomes
                .iter()
                .filter(|o| o.kind == kind && matches!(o.status, Status::Created | Status::Updated | Status::Exists))
                .filter_map(|o| o.physical_id.clone())
                .collect()
        };
        for names in of_kind("AWS::CloudWatch::Alarm").chunks(100) {
            self.cloudwatch()
                .delete_alarms()
                .set_alarm_names(Some(names.to_vec()))
                .send()
                .await
                .expect("delete alarms");
        }
        for url in of_kind("AWS::SQS::Queue") {
            self.sqs().delete_queue().queue_url(url).send().await.expect("delete queue");
        }
        let dashboards = of_kind("AWS::CloudWatch::Dashboard");
        if !dashboards.is_empty() {
            self.cloudwatch()
                .delete_dashboards()
                .set_dashboard_names(Some(dashboards))
                .send()
                .await
                .expect("delete dashboards");
        }
    }

    /// The stack's functions in the local Lambda service: their own binaries, given the
    /// emulators' endpoints, logging to CloudWatch Logs and to `.local/logs/<stack>/`.
    pub fn lambda_service(&self, stack: &Stack) -> Arc<LambdaService> {
        self.lambda_service_with(stack, None)
    }

    /// As [`Self::lambda_service`], with the functions' Lambda endpoint at `lambda_endpoint`.
    pub fn lambda_service_with(&self, stack: &Stack, lambda_endpoint: Option<String>) -> Arc<LambdaService> {
        let mut options = local_env::lambda::Options::new(stack);
        options.log_dir = workspace_root().join(".local/logs").join(&stack.stack_name);
        options.aws_env =
            self.vars.iter().filter(|(k, _)| k.starts_with("AWS_")).map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(endpoint) = lambda_endpoint {
            options.aws_env.insert("AWS_ENDPOINT_URL_LAMBDA".into(), endpoint);
        }
        // The functions' metrics go to this test's emulator, whatever this process's environment says.
        options.metrics_client =
            Some(local_env::lambda::emf::cloudwatch_client(self.cloudwatch().config().to_builder()));
        LambdaService::new(stack, function_binaries(), options, Some(self.logs())).expect("the Lambda service")
    }

    /// The stack's functions with their own Invoke API, which they reach as Lambda (the
    /// dead-letter handler replays a skipped stream batch through it).
    pub async fn lambda_service_and_api(&self, stack: &Stack) -> (Arc<LambdaService>, InvokeApi) {
        // A free port, taken again at once: the service's functions must know it before it is served.
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let service = self.lambda_service_with(stack, Some(format!("http://127.0.0.1:{port}")));
        let api = local_env::lambda::invoke_api::serve(service.clone(), ([127, 0, 0, 1], port).into())
            .await
            .expect("the Invoke API");
        (service, api)
    }

    pub fn event_store_config(&self) -> EventStoreConfig {
        EventStoreConfig {
            events_table: self.var("EVENTS_TABLE"),
            commands_table: self.var("COMMANDS_TABLE"),
            snapshots_table: self.var("SNAPSHOTS_TABLE"),
            idempotency_ttl: EventStoreConfig::DEFAULT_IDEMPOTENCY_TTL,
        }
    }

    pub fn event_store(&self) -> DynamoEventStore {
        DynamoEventStore::new(self.dynamodb(), self.event_store_config())
    }
}

/// An id no earlier run used, so tests never see each other's data.
/// Every message in a CloudWatch Logs group of a function (`/aws/lambda/<name>`).
pub async fn log_messages(logs: &aws_sdk_cloudwatchlogs::Client, function_name: &str) -> Vec<String> {
    let group = format!("/aws/lambda/{function_name}");
    let mut messages = Vec::new();
    let mut token = None;
    loop {
        let page = logs
            .filter_log_events()
            .log_group_name(&group)
            .set_next_token(token)
            .send()
            .await
            .expect("FilterLogEvents on the function's group");
        messages.extend(page.events().iter().filter_map(|e| e.message().map(str::to_owned)));
        token = page.next_token().map(str::to_owned);
        if token.is_none() {
            return messages;
        }
    }
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

static BINARY_PROFILE: OnceLock<&'static str> = OnceLock::new();

/// Benchmarks measure release binaries, as deployed: call before the first [`function_binaries`].
pub fn use_release_binaries() {
    let _ = BINARY_PROFILE.set("release");
}

/// The binary of every function crate of `template.yaml`, built by cargo once per test binary
/// (the debug profile unless [`use_release_binaries`] was called: what `cargo test` just built
/// is reused).
pub fn function_binaries() -> &'static HashMap<String, PathBuf> {
    static BINARIES: OnceLock<HashMap<String, PathBuf>> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let template = local_env::Template::load(&workspace_root().join("template.yaml")).expect("template");
        let mut crates: Vec<String> = template
            .resources
            .values()
            .filter(|r| r.kind == "AWS::Serverless::Function")
            .filter_map(|r| r.properties.get("CodeUri")?.as_str()?.rsplit('/').next().map(str::to_owned))
            .collect();
        crates.sort();
        crates.dedup();
        binaries::build(&workspace_root(), &crates, BINARY_PROFILE.get().copied())
            .expect("the functions' binaries build")
    })
}
