//! Creates the resources of `template.yaml` on the emulators, in dependency order, idempotently:
//! what exists is kept (queues, rules and state machines are brought up to date). Each resource
//! type either has a handler, a local stand-in (functions run in the local Lambda service; IAM is
//! not enforced), or is reported by name as not created.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, anyhow, bail};
use aws_sdk_dynamodb::types as ddb;
use aws_sdk_eventbridge::types as eb;
use aws_sdk_sqs::types::QueueAttributeName;
use serde::Serialize;
use serde_json::Value;

use crate::template::{Resolved, Resolver, Template, TemplateError, yaml_to_json};

pub struct Clients {
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub events: aws_sdk_eventbridge::Client,
    pub sfn: aws_sdk_sfn::Client,
    pub cloudwatch: aws_sdk_cloudwatch::Client,
    pub logs: aws_sdk_cloudwatchlogs::Client,
    pub sns: aws_sdk_sns::Client,
}

impl Clients {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self {
            dynamodb: aws_sdk_dynamodb::Client::new(config),
            sqs: aws_sdk_sqs::Client::new(config),
            events: aws_sdk_eventbridge::Client::new(config),
            sfn: aws_sdk_sfn::Client::new(config),
            cloudwatch: aws_sdk_cloudwatch::Client::new(config),
            logs: aws_sdk_cloudwatchlogs::Client::new(config),
            sns: aws_sdk_sns::Client::new(config),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub stack_name: String,
    pub region: String,
    pub account_id: String,
    pub parameter_overrides: HashMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "status", content = "detail", rename_all = "snake_case")]
pub enum Status {
    Created,
    Updated,
    Exists,
    /// Not created locally, by design (the reason says what stands in for it).
    Local(String),
    /// Not created because its `Condition` is false, locally as on AWS (the condition is named).
    Skipped(String),
    /// A resource type the provisioner cannot create.
    Unsupported,
    Failed(String),
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Outcome {
    pub logical_id: String,
    pub kind: String,
    #[serde(flatten)]
    pub status: Status,
    pub physical_id: Option<String>,
    /// Properties that have no local effect (encryption, backups, tags…).
    pub ignored: Vec<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Stack {
    pub stack_name: String,
    pub outcomes: Vec<Outcome>,
    pub resources: BTreeMap<String, Resolved>,
    /// `Globals.Function.Environment.Variables`, resolved: what every function gets.
    pub environment: BTreeMap<String, String>,
    /// Each function's own environment (globals merged), resolved, by logical id.
    pub functions: BTreeMap<String, BTreeMap<String, String>>,
    /// Each function's properties, resolved (its `Events` drive the local runner).
    pub function_properties: BTreeMap<String, Value>,
    /// Each HTTP API's properties, resolved, by what its `Ref` resolves to (a route's `ApiId`):
    /// the local HTTP API reads its authorizers from them.
    #[serde(default)]
    pub apis: BTreeMap<String, Value>,
    pub outputs: BTreeMap<String, String>,
    /// Environment variables and outputs that could not be resolved (a resource failed).
    pub unresolved: Vec<String>,
}

impl Stack {
    pub fn unsupported(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.status == Status::Unsupported).collect()
    }

    pub fn failed(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| matches!(o.status, Status::Failed(_))).collect()
    }
}

/// Properties that configure AWS-side concerns the emulators do not model.
const NO_LOCAL_EFFECT: &[&str] = &[
    "SSESpecification",
    "PointInTimeRecoverySpecification",
    "Tags",
    "ContributorInsightsSpecification",
    "DeletionProtectionEnabled",
    "TableClass",
    "KmsMasterKeyId",
    "KmsDataKeyReusePeriodSeconds",
    "SqsManagedSseEnabled",
    "LoggingConfiguration",
    "TracingConfiguration",
    "Logging",
    "Tracing",
    "Policies",
    "KmsKeyIdentifier",
];

pub async fn provision(template: &Template, options: &Options, clients: &Clients) -> Result<Stack, TemplateError> {
    let mut resolver = Resolver::new(
        template,
        &options.stack_name,
        &options.region,
        &options.account_id,
        &options.parameter_overrides,
    )?;
    let mut outcomes = Vec::new();
    let mut function_properties = BTreeMap::new();
    let mut apis = BTreeMap::new();
    for resource in template.creation_order()? {
        let id = &resource.logical_id;
        let ignored: Vec<String> = resource
            .properties
            .as_object()
            .map(|p| p.keys().filter(|k| NO_LOCAL_EFFECT.contains(&k.as_str())).cloned().collect())
            .unwrap_or_default();
        if let Some(condition) = &resource.condition {
            let not_made = match resolver.condition(condition) {
                Ok(true) => None,
                Ok(false) => Some(Status::Skipped(format!("condition {condition} is false"))),
                Err(e) => Some(Status::Failed(e.to_string())),
            };
            if let Some(status) = not_made {
                let (logical_id, kind) = (id.clone(), resource.kind.clone());
                outcomes.push(Outcome { logical_id, kind, status, physical_id: None, ignored });
                continue;
            }
        }
        let result = match resolver.resolve(&resource.properties) {
            Err(e) => Err(anyhow!(e)),
            Ok(props) => {
                if resource.kind == "AWS::Serverless::Function" {
                    function_properties.insert(id.clone(), with_globals(&props, &template.globals, &resolver));
                }
                let ctx = Ctx { id, props: &props, options, clients, template };
                let created = create(&resource.kind, ctx).await;
                if let Ok(Some((_, resolved))) = &created
                    && resource.kind == "AWS::Serverless::HttpApi"
                {
                    apis.insert(resolved.reference.clone(), props.clone());
                }
                created
            }
        };
        let (status, physical_id) = match result {
            Ok(Some((status, resolved))) => {
                let physical = Some(resolved.reference.clone());
                resolver.resources.insert(id.clone(), resolved);
                (status, physical)
            }
            Ok(None) => (Status::Unsupported, None),
            Err(e) => (Status::Failed(format!("{e:#}")), None),
        };
        outcomes.push(Outcome { logical_id: id.clone(), kind: resource.kind.clone(), status, physical_id, ignored });
    }

    // A value that cannot be resolved (its resource failed) is reported, not fatal: the report
    // of what failed is what the user needs to see.
    let mut unresolved = Vec::new();
    let mut variables = |v: &Value, into: &mut BTreeMap<String, String>| {
        for (name, value) in v.pointer("/Environment/Variables").and_then(Value::as_object).into_iter().flatten() {
            match resolver.resolve_string(value) {
                Ok(resolved) => {
                    into.insert(name.clone(), resolved);
                }
                Err(e) => unresolved.push(format!("environment variable {name}: {e}")),
            }
        }
    };
    let mut environment = BTreeMap::new();
    variables(template.globals.get("Function").unwrap_or(&Value::Null), &mut environment);
    let mut functions = BTreeMap::new();
    for resource in template.resources.values().filter(|r| r.kind == "AWS::Serverless::Function") {
        let mut env = environment.clone();
        variables(&resource.properties, &mut env);
        functions.insert(resource.logical_id.clone(), env);
    }
    let mut outputs = BTreeMap::new();
    for (name, output) in &template.outputs {
        match output.get("Value").map(|v| resolver.resolve_string(v)) {
            Some(Ok(value)) => {
                outputs.insert(name.clone(), value);
            }
            Some(Err(e)) => unresolved.push(format!("output {name}: {e}")),
            None => {}
        }
    }
    Ok(Stack {
        stack_name: options.stack_name.clone(),
        outcomes,
        resources: resolver.resources,
        environment,
        functions,
        function_properties,
        apis,
        outputs,
        unresolved,
    })
}

/// A function's properties with SAM's `Globals.Function` filled in where the function sets
/// none (Timeout, MemorySize…), as SAM does. The environment is merged separately.
fn with_globals(props: &Value, globals: &Value, resolver: &Resolver) -> Value {
    let mut merged = props.clone();
    if let (Some(target), Some(defaults)) = (merged.as_object_mut(), globals.get("Function").and_then(Value::as_object))
    {
        for (key, value) in defaults {
            if key != "Environment" && !target.contains_key(key) {
                target.insert(key.clone(), resolver.resolve(value).unwrap_or_else(|_| value.clone()));
            }
        }
    }
    merged
}

struct Ctx<'a> {
    id: &'a str,
    props: &'a Value,
    options: &'a Options,
    clients: &'a Clients,
    template: &'a Template,
}

impl Ctx<'_> {
    fn str(&self, name: &str) -> Option<String> {
        match self.props.get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(Value::Bool(b)) => Some(b.to_string()),
            _ => None,
        }
    }

    /// The explicit name, or a generated one.
    fn name(&self, property: &str, max: usize) -> String {
        self.str(property).unwrap_or_else(|| self.generated_name(max))
    }

    /// `<stack>-<LogicalId>` cut to the service's limit, as CloudFormation names resources.
    fn generated_name(&self, max: usize) -> String {
        let mut generated = format!("{}-{}", self.options.stack_name, self.id);
        generated.truncate(max);
        generated
    }

    /// A list of strings (`AlarmActions`…); `None` when the property is absent.
    fn strings(&self, name: &str) -> anyhow::Result<Option<Vec<String>>> {
        let Some(value) = self.props.get(name) else { return Ok(None) };
        let items = value.as_array().with_context(|| format!("{name} is not a list"))?;
        let strings =
            items.iter().map(|v| v.as_str().map(str::to_owned).with_context(|| format!("{name}: {v} is not a string")));
        Ok(Some(strings.collect::<anyhow::Result<_>>()?))
    }

    fn arn(&self, service: &str, resource: &str) -> String {
        format!("arn:aws:{service}:{}:{}:{resource}", self.options.region, self.options.account_id)
    }
}

type Created = Option<(Status, Resolved)>;

async fn create(kind: &str, ctx: Ctx<'_>) -> anyhow::Result<Created> {
    match kind {
        "AWS::DynamoDB::Table" => table(&ctx, TableSpec::from_cfn(ctx.props)?).await,
        "AWS::Serverless::SimpleTable" => table(&ctx, TableSpec::from_simple(ctx.props)?).await,
        "AWS::SQS::Queue" => queue(&ctx).await,
        "AWS::Events::EventBus" => event_bus(&ctx).await,
        "AWS::Events::Rule" => rule(&ctx).await,
        "AWS::Events::Archive" => archive(&ctx).await,
        "AWS::StepFunctions::StateMachine" | "AWS::Serverless::StateMachine" => state_machine(&ctx).await,
        "AWS::CloudWatch::Alarm" => alarm(&ctx).await,
        "AWS::CloudWatch::Dashboard" => dashboard(&ctx).await,
        "AWS::SNS::Topic" => topic(&ctx).await,
        "AWS::SNS::Subscription" => subscription(&ctx).await,
        "AWS::Serverless::Function" | "AWS::Lambda::Function" => {
            let name = ctx.name("FunctionName", 64);
            let arn = ctx.arn("lambda", &format!("function:{name}"));
            Ok(stand_in("runs in the local Lambda service", name, arn))
        }
        "AWS::IAM::Role" => {
            let name = ctx.name("RoleName", 64);
            let arn = format!("arn:aws:iam::{}:role/{name}", ctx.options.account_id);
            Ok(stand_in("IAM is not enforced locally", name, arn))
        }
        "AWS::IAM::Policy"
        | "AWS::IAM::ManagedPolicy"
        | "AWS::Lambda::Permission"
        | "AWS::SQS::QueuePolicy"
        | "AWS::SNS::TopicPolicy"
        | "AWS::Events::EventBusPolicy" => {
            let name = ctx.generated_name(255);
            Ok(stand_in("permissions are not enforced locally", name.clone(), name))
        }
        "AWS::Logs::LogGroup" => log_group(&ctx).await,
        "AWS::Serverless::HttpApi" | "AWS::Serverless::Api" => {
            let name = ctx.generated_name(128);
            let arn = ctx.arn("apigateway", &format!("/apis/{name}"));
            Ok(stand_in("local-env serves its routes and invokes the functions", name, arn))
        }
        "AWS::Lambda::EventSourceMapping" => {
            let name = ctx.generated_name(255);
            Ok(stand_in("the local runner polls the source", name.clone(), name))
        }
        _ => Ok(None),
    }
}

fn stand_in(reason: &str, reference: String, arn: String) -> Created {
    let attributes = BTreeMap::from([("Arn".to_owned(), arn)]);
    Some((Status::Local(reason.to_owned()), Resolved { reference, attributes }))
}

fn resolved(reference: String, attributes: &[(&str, Option<String>)]) -> Resolved {
    let attributes = attributes.iter().filter_map(|(k, v)| v.clone().map(|v| ((*k).to_owned(), v))).collect();
    Resolved { reference, attributes }
}

// ---------------------------------------------------------------------------------------------
// DynamoDB

struct TableSpec {
    name_property: &'static str,
    attributes: Vec<(String, String)>,
    keys: Vec<(String, String)>,
    billing: String,
    throughput: Option<(i64, i64)>,
    stream_view: Option<String>,
    ttl_attribute: Option<String>,
    gsis: Vec<Value>,
    lsis: Vec<Value>,
}

fn pairs(value: Option<&Value>, a: &str, b: &str) -> anyhow::Result<Vec<(String, String)>> {
    let items = value.and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    items
        .iter()
        .map(|item| {
            let get = |k: &str| item.get(k).and_then(Value::as_str).map(str::to_owned);
            Ok((get(a).context(format!("{a} missing"))?, get(b).context(format!("{b} missing"))?))
        })
        .collect()
}

fn throughput(value: Option<&Value>) -> Option<(i64, i64)> {
    let v = value?;
    let num = |k: &str| v.get(k).and_then(|x| x.as_i64().or_else(|| x.as_str()?.parse().ok()));
    Some((num("ReadCapacityUnits")?, num("WriteCapacityUnits")?))
}

impl TableSpec {
    fn from_cfn(p: &Value) -> anyhow::Result<Self> {
        let ttl = p.get("TimeToLiveSpecification");
        Ok(Self {
            name_property: "TableName",
            attributes: pairs(p.get("AttributeDefinitions"), "AttributeName", "AttributeType")?,
            keys: pairs(p.get("KeySchema"), "AttributeName", "KeyType")?,
            billing: p.get("BillingMode").and_then(Value::as_str).unwrap_or("PROVISIONED").to_owned(),
            throughput: throughput(p.get("ProvisionedThroughput")),
            stream_view: p.pointer("/StreamSpecification/StreamViewType").and_then(Value::as_str).map(str::to_owned),
            ttl_attribute: ttl
                .filter(|t| t.get("Enabled").is_some_and(|e| e == true || e == "true"))
                .and_then(|t| t.get("AttributeName"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            gsis: p.get("GlobalSecondaryIndexes").and_then(Value::as_array).cloned().unwrap_or_default(),
            lsis: p.get("LocalSecondaryIndexes").and_then(Value::as_array).cloned().unwrap_or_default(),
        })
    }

    fn from_simple(p: &Value) -> anyhow::Result<Self> {
        let name = p.pointer("/PrimaryKey/Name").and_then(Value::as_str).unwrap_or("id").to_owned();
        let kind = match p.pointer("/PrimaryKey/Type").and_then(Value::as_str).unwrap_or("String") {
            "String" => "S",
            "Number" => "N",
            "Binary" => "B",
            other => bail!("SimpleTable PrimaryKey.Type {other}"),
        };
        let throughput = throughput(p.get("ProvisionedThroughput"));
        Ok(Self {
            name_property: "TableName",
            attributes: vec![(name.clone(), kind.to_owned())],
            keys: vec![(name, "HASH".to_owned())],
            billing: if throughput.is_some() { "PROVISIONED" } else { "PAY_PER_REQUEST" }.to_owned(),
            throughput,
            stream_view: None,
            ttl_attribute: None,
            gsis: vec![],
            lsis: vec![],
        })
    }
}

fn key_schema(keys: &[(String, String)]) -> anyhow::Result<Vec<ddb::KeySchemaElement>> {
    keys.iter()
        .map(|(name, kind)| {
            Ok(ddb::KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(ddb::KeyType::from(kind.as_str()))
                .build()?)
        })
        .collect()
}

fn projection(index: &Value) -> anyhow::Result<ddb::Projection> {
    let kind = index.pointer("/Projection/ProjectionType").and_then(Value::as_str).unwrap_or("ALL");
    let non_key = index
        .pointer("/Projection/NonKeyAttributes")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect());
    Ok(ddb::Projection::builder()
        .projection_type(ddb::ProjectionType::from(kind))
        .set_non_key_attributes(non_key)
        .build())
}

fn provisioned(t: Option<(i64, i64)>) -> anyhow::Result<Option<ddb::ProvisionedThroughput>> {
    t.map(|(r, w)| Ok(ddb::ProvisionedThroughput::builder().read_capacity_units(r).write_capacity_units(w).build()?))
        .transpose()
}

async fn table(ctx: &Ctx<'_>, spec: TableSpec) -> anyhow::Result<Created> {
    let client = &ctx.clients.dynamodb;
    let name = ctx.name(spec.name_property, 255);
    let status = match client.describe_table().table_name(&name).send().await {
        Ok(found) => {
            let existing: Vec<(String, String)> = found
                .table()
                .map(|t| {
                    t.key_schema()
                        .iter()
                        .map(|k| (k.attribute_name().to_owned(), k.key_type().as_str().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            if existing != spec.keys {
                bail!("table {name} exists with key schema {existing:?}, the template says {:?}", spec.keys);
            }
            Status::Exists
        }
        Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => {
            let attributes = spec
                .attributes
                .iter()
                .map(|(n, t)| {
                    Ok(ddb::AttributeDefinition::builder()
                        .attribute_name(n)
                        .attribute_type(ddb::ScalarAttributeType::from(t.as_str()))
                        .build()?)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let gsis = spec
                .gsis
                .iter()
                .map(|g| {
                    Ok(ddb::GlobalSecondaryIndex::builder()
                        .index_name(g.get("IndexName").and_then(Value::as_str).context("GSI without IndexName")?)
                        .set_key_schema(Some(key_schema(&pairs(g.get("KeySchema"), "AttributeName", "KeyType")?)?))
                        .projection(projection(g)?)
                        .set_provisioned_throughput(provisioned(throughput(g.get("ProvisionedThroughput")))?)
                        .build()?)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let lsis = spec
                .lsis
                .iter()
                .map(|l| {
                    Ok(ddb::LocalSecondaryIndex::builder()
                        .index_name(l.get("IndexName").and_then(Value::as_str).context("LSI without IndexName")?)
                        .set_key_schema(Some(key_schema(&pairs(l.get("KeySchema"), "AttributeName", "KeyType")?)?))
                        .projection(projection(l)?)
                        .build()?)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let stream = spec
                .stream_view
                .as_deref()
                .map(|v| {
                    ddb::StreamSpecification::builder()
                        .stream_enabled(true)
                        .stream_view_type(ddb::StreamViewType::from(v))
                        .build()
                })
                .transpose()?;
            client
                .create_table()
                .table_name(&name)
                .set_attribute_definitions(Some(attributes))
                .set_key_schema(Some(key_schema(&spec.keys)?))
                .billing_mode(ddb::BillingMode::from(spec.billing.as_str()))
                .set_provisioned_throughput(provisioned(spec.throughput)?)
                .set_global_secondary_indexes((!gsis.is_empty()).then_some(gsis))
                .set_local_secondary_indexes((!lsis.is_empty()).then_some(lsis))
                .set_stream_specification(stream)
                .send()
                .await
                .with_context(|| format!("CreateTable {name}"))?;
            if let Some(attribute) = &spec.ttl_attribute {
                let ttl = ddb::TimeToLiveSpecification::builder().attribute_name(attribute).enabled(true).build()?;
                client
                    .update_time_to_live()
                    .table_name(&name)
                    .time_to_live_specification(ttl)
                    .send()
                    .await
                    .with_context(|| format!("UpdateTimeToLive {name}"))?;
            }
            Status::Created
        }
        Err(e) => return Err(anyhow!(e).context(format!("DescribeTable {name}"))),
    };
    let described = client.describe_table().table_name(&name).send().await.context("DescribeTable")?;
    let table = described.table();
    let arn = table.and_then(|t| t.table_arn()).map(str::to_owned);
    let stream_arn = table.and_then(|t| t.latest_stream_arn()).map(str::to_owned);
    Ok(Some((status, resolved(name, &[("Arn", arn), ("StreamArn", stream_arn)]))))
}

// ---------------------------------------------------------------------------------------------
// SQS

const QUEUE_ATTRIBUTES: &[&str] = &[
    "DelaySeconds",
    "MaximumMessageSize",
    "MessageRetentionPeriod",
    "ReceiveMessageWaitTimeSeconds",
    "VisibilityTimeout",
    "FifoQueue",
    "ContentBasedDeduplication",
    "DeduplicationScope",
    "FifoThroughputLimit",
    "RedrivePolicy",
    "RedriveAllowPolicy",
];

async fn queue(ctx: &Ctx<'_>) -> anyhow::Result<Created> {
    let client = &ctx.clients.sqs;
    let fifo = ctx.str("FifoQueue").as_deref() == Some("true");
    let mut name = ctx.name("QueueName", if fifo { 75 } else { 80 });
    if fifo && !name.ends_with(".fifo") {
        name.push_str(".fifo");
    }
    let mut attributes = HashMap::new();
    for &attribute in QUEUE_ATTRIBUTES {
        let value = match ctx.props.get(attribute) {
            None => continue,
            // Policies are JSON documents in SQS, objects in the template.
            Some(v @ Value::Object(_)) => v.to_string(),
            Some(_) => ctx.str(attribute).unwrap_or_default(),
        };
        attributes.insert(QueueAttributeName::from(attribute), value);
    }
    let (status, url) = match client.get_queue_url().queue_name(&name).send().await {
        Ok(found) => {
            let url = found.queue_url().context("GetQueueUrl returned no URL")?.to_owned();
            // FifoQueue cannot be changed after creation; the rest is brought up to date.
            attributes.remove(&QueueAttributeName::FifoQueue);
            if !attributes.is_empty() {
                client
                    .set_queue_attributes()
                    .queue_url(&url)
                    .set_attributes(Some(attributes))
                    .send()
                    .await
                    .with_context(|| format!("SetQueueAttributes {name}"))?;
            }
            (Status::Updated, url)
        }
        Err(e) if e.as_service_error().is_some_and(|e| e.is_queue_does_not_exist()) => {
            let created = client
                .create_queue()
                .queue_name(&name)
                .set_attributes((!attributes.is_empty()).then_some(attributes))
                .send()
                .await
                .with_context(|| format!("CreateQueue {name}"))?;
            (Status::Created, created.queue_url().context("CreateQueue returned no URL")?.to_owned())
        }
        Err(e) => return Err(anyhow!(e).context(format!("GetQueueUrl {name}"))),
    };
    let arn = client
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .context("GetQueueAttributes")?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned();
    Ok(Some((status, resolved(url, &[("Arn", arn), ("QueueName", Some(name))]))))
}

// ---------------------------------------------------------------------------------------------
// EventBridge

async fn event_bus(ctx: &Ctx<'_>) -> anyhow::Result<Created> {
    let client = &ctx.clients.events;
    let name = ctx.name("Name", 256);
    let status = match client.create_event_bus().name(&name).send().await {
        Ok(_) => Status::Created,
        Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_already_exists_exception()) => Status::Exists,
        Err(e) => return Err(anyhow!(e).context(format!("CreateEventBus {name}"))),
    };
    let arn =
        client.describe_event_bus().name(&name).send().await.context("DescribeEventBus")?.arn().map(str::to_owned);
    Ok(Some((status, resolved(name.clone(), &[("Arn", arn), ("Name", Some(name))]))))
}

fn json_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

async fn rule(ctx: &Ctx<'_>) -> anyhow::Result<Created> {
    let client = &ctx.clients.events;
    let name = ctx.name("Name", 64);
    let bus = ctx.str("EventBusName");
    // PutRule creates or updates alike: ask first, to report which it was.
    let existed = client.describe_rule().name(&name).set_event_bus_name(bus.clone()).send().await.is_ok();
    let put = client
        .put_rule()
        .name(&name)
        .set_event_bus_name(bus.clone())
        .set_event_pattern(json_string(ctx.props.get("EventPattern")))
        .set_schedule_expression(ctx.str("ScheduleExpression"))
        .set_description(ctx.str("Description"))
        .set_role_arn(ctx.str("RoleArn"))
        .set_state(ctx.str("State").map(|s| eb::RuleState::from(s.as_str())))
        .send()
        .await
        .with_context(|| format!("PutRule {name}"))?;
    let targets = ctx.props.get("Targets").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if !targets.is_empty() {
        let built = targets.iter().map(target).collect::<anyhow::Result<Vec<_>>>()?;
        let result = client
            .put_targets()
            .rule(&name)
            .set_event_bus_name(bus.clone())
            .set_targets(Some(built))
            .send()
            .await
            .with_context(|| format!("PutTargets {name}"))?;
        if result.failed_entry_count() > 0 {
            bail!("PutTargets {name}: {:?}", result.failed_entries());
        }
    }
    // Ref of a rule on a custom bus is `bus|rule`, as in CloudFormation.
    let reference = match bus.as_deref() {
        Some(b) if b != "default" => format!("{}|{name}", b.rsplit('/').next().unwrap_or(b)),
        _ => name,
    };
    let status = if existed { Status::Updated } else { Status::Created };
    Ok(Some((status, resolved(reference, &[("Arn", put.rule_arn().map(str::to_owned))]))))
}

fn target(t: &Value) -> anyhow::Result<eb::Target> {
    let s = |k: &str| t.get(k).and_then(Value::as_str).map(str::to_owned);
    let i = |v: Option<&Value>| v.and_then(|x| x.as_i64().or_else(|| x.as_str()?.parse().ok())).map(|n| n as i32);
    let sqs = t
        .pointer("/SqsParameters/MessageGroupId")
        .and_then(Value::as_str)
        .map(|g| eb::SqsParameters::builder().message_group_id(g).build());
    let dlq = t
        .pointer("/DeadLetterConfig/Arn")
        .and_then(Value::as_str)
        .map(|a| eb::DeadLetterConfig::builder().arn(a).build());
    let retry = t.get("RetryPolicy").map(|r| {
        eb::RetryPolicy::builder()
            .set_maximum_retry_attempts(i(r.get("MaximumRetryAttempts")))
            .set_maximum_event_age_in_seconds(i(r.get("MaximumEventAgeInSeconds")))
            .build()
    });
    let transformer = match t.get("InputTransformer") {
        None => None,
        Some(x) => Some(
            eb::InputTransformer::builder()
                .set_input_paths_map(
                    x.get("InputPathsMap")
                        .and_then(Value::as_object)
                        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect()),
                )
                .input_template(x.get("InputTemplate").and_then(Value::as_str).context("InputTemplate missing")?)
                .build()?,
        ),
    };
    Ok(eb::Target::builder()
        .id(s("Id").context("target without Id")?)
        .arn(s("Arn").context("target without Arn")?)
        .set_input(s("Input"))
        .set_input_path(s("InputPath"))
        .set_input_transformer(transformer)
        .set_role_arn(s("RoleArn"))
        .set_sqs_parameters(sqs)
        .set_dead_letter_config(dlq)
        .set_retry_policy(retry)
        .build()?)
}

async fn archive(ctx: &Ctx<'_>) -> anyhow::Result<Created> {
    let client = &ctx.clients.events;
    let name = ctx.name("ArchiveName", 48);
    let source = ctx.str("SourceArn").context("Archive without SourceArn")?;
    let retention = ctx.str("RetentionDays").map(|d| d.parse::<i32>()).transpose().context("RetentionDays")?;
    let status = match client
        .create_archive()
        .archive_name(&name)
        .event_source_arn(&source)
        .set_event_pattern(json_string(ctx.props.get("EventPattern")))
        .set_description(ctx.str("Description"))
        .set_retention_days(retention)
        .send()
        .await
    {
        Ok(_) => Status::Created,
        Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_already_exists_exception()) => Status::Exists,
        Err(e) => return Err(anyhow!(e).context(format!("CreateArchive {name}"))),
    };
    let arn = client
        .describe_archive()
        .archive_name(&name)
        .send()
        .await
        .context("DescribeArchive")?
        .archive_arn()
        .map(str::to_owned);
    Ok(Some((status, resolved(name.clone(), &[("Arn", arn), ("ArchiveName", Some(name))]))))
}

// ---------------------------------------------------------------------------------------------
// Step Functions

/// Replaces `${key}` in every string of an ASL definition, as DefinitionSubstitutions do.
fn substitute(value: &mut Value, substitutions: &BTreeMap<String, String>) {
    match value {
        Value::String(s) if s.contains("${") => {
            for (key, replacement) in substitutions {
                *s = s.replace(&format!("${{{key}}}"), replacement);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| substitute(v, substitutions)),
        Value::Object(map) => map.values_mut().for_each(|v| substitute(v, substitutions)),
        _ => {}
    }
}

async fn state_machine(ctx: &Ctx<'_>) -> anyhow::Result<Created> {
    let client = &ctx.clients.sfn;
    let name = ctx.str("Name").or_else(|| ctx.str("StateMachineName")).unwrap_or_else(|| ctx.generated_name(80));
    let mut definition = if let Some(d) = ctx.props.get("Definition") {
        d.clone()
    } else if let Some(text) = ctx.str("DefinitionString") {
        serde_json::from_str(&text).context("DefinitionString is not JSON")?
    } else if let Some(uri) = ctx.str("DefinitionUri") {
        let path = ctx.template.base_dir().join(&uri);
        let text = std::fs::read_to_string(&path).with_context(|| format!("DefinitionUri {}", path.display()))?;
        let yaml: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        yaml_to_json(yaml)?
    } else {
        bail!("state machine {} has no local definition (DefinitionS3Location is not supported)", ctx.id);
    };
    let substitutions: BTreeMap<String, String> = ctx
        .props
        .get("DefinitionSubstitutions")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned))).collect())
        .unwrap_or_default();
    substitute(&mut definition, &substitutions);
    let definition = definition.to_string();
    let role = ctx.str("Role").or_else(|| ctx.str("RoleArn")).unwrap_or_else(|| {
        format!("arn:aws:iam::{}:role/{}-{}", ctx.options.account_id, ctx.options.stack_name, ctx.id)
    });
    let kind = ctx.str("Type").or_else(|| ctx.str("StateMachineType")).unwrap_or_else(|| "STANDARD".into());
    // Create is idempotent for an identical definition, so existence is checked first to report
    // honestly, and an existing machine gets the template's definition.
    let arn = ctx.arn("states", &format!("stateMachine:{name}"));
    let status = match client.describe_state_machine().state_machine_arn(&arn).send().await {
        Ok(_) => {
            client
                .update_state_machine()
                .state_machine_arn(&arn)
                .definition(&definition)
                .role_arn(&role)
                .send()
                .await
                .with_context(|| format!("UpdateStateMachine {name}"))?;
            Status::Updated
        }
        Err(e) if e.as_service_error().is_some_and(|e| e.is_state_machine_does_not_exist()) => {
            let created = client
                .create_state_machine()
                .name(&name)
                .definition(&definition)
                .role_arn(&role)
                .r#type(aws_sdk_sfn::types::StateMachineType::from(kind.as_str()))
                .send()
                .await
                .with_context(|| format!("CreateStateMachine {name}"))?;
            if created.state_machine_arn() != arn {
                bail!("state machine {name} was created as {}, expected {arn}", created.state_machine_arn());
            }
            Status::Created
        }
        Err(e) => return Err(anyhow!(e).context(format!("DescribeStateMachine {name}"))),
    };
    Ok(Some((status, resolved(arn.clone(), &[("Arn", Some(arn)), ("Name", Some(name))]))))
}

// ---------------------------------------------------------------------------------------------
// CloudWatch

async fn alarm(ctx: &Ctx<'_>) -> anyhow::Result<Created> {
    use aws_sdk_cloudwatch::types::{ComparisonOperator, Dimension, StandardUnit, Statistic};
    let client = &ctx.clients.cloudwatch;
    let name = ctx.name("AlarmName", 255);
    let number =
        |k: &str| ctx.str(k).map(|v| v.parse::<f64>()).transpose().with_context(|| format!("{k} is not a number"));
    let whole = |k: &str| {
        ctx.str(k).map(|v| v.parse::<i32>()).transpose().with_context(|| format!("{k} is not a whole number"))
    };
    let dimensions = ctx.props.get("Dimensions").and_then(Value::as_array).map(|ds| {
        ds.iter()
            .map(|d| {
                let s = |k: &str| d.get(k).and_then(Value::as_str).map(str::to_owned);
                Dimension::builder().set_name(s("Name")).set_value(s("Value")).build()
            })
            .collect()
    });
    let existed = client
        .describe_alarms()
        .alarm_names(&name)
        .send()
        .await
        .context("DescribeAlarms")?
        .metric_alarms()
        .iter()
        .any(|a| a.alarm_name() == Some(name.as_str()));
    client
        .put_metric_alarm()
        .alarm_name(&name)
        .set_alarm_description(ctx.str("AlarmDescription"))
        .set_namespace(ctx.str("Namespace"))
        .set_metric_name(ctx.str("MetricName"))
        .set_dimensions(dimensions)
        .set_statistic(ctx.str("Statistic").map(|s| Statistic::from(s.as_str())))
        .set_period(whole("Period")?)
        .set_evaluation_periods(whole("EvaluationPeriods")?)
        .set_threshold(number("Threshold")?)
        .set_comparison_operator(ctx.str("ComparisonOperator").map(|c| ComparisonOperator::from(c.as_str())))
        .set_treat_missing_data(ctx.str("TreatMissingData"))
        .set_datapoints_to_alarm(whole("DatapointsToAlarm")?)
        .set_unit(ctx.str("Unit").map(|u| StandardUnit::from(u.as_str())))
        .set_extended_statistic(ctx.str("ExtendedStatistic"))
        // The actions are what makes an alarm reach someone: LocalStack publishes a state change
        // to the SNS topics named here, as CloudWatch does.
        .set_actions_enabled(ctx.str("ActionsEnabled").map(|b| b == "true"))
        .set_alarm_actions(ctx.strings("AlarmActions")?)
        .set_ok_actions(ctx.strings("OKActions")?)
        .set_insufficient_data_actions(ctx.strings("InsufficientDataActions")?)
        .send()
        .await
        .with_context(|| format!("PutMetricAlarm {name}"))?;
    let arn = ctx.arn("cloudwatch", &format!("alarm:{name}"));
    let status = if existed { Status::Updated } else { Status::Created };
    Ok(Some((status, resolved(name, &[("Arn", Some(arn))]))))
}

/// A dashboard: its body as resolved (`Sub`), put with `PutDashboard`. Its widgets read the
/// metrics the functions' EMF lines become locally (see `lambda::emf`).
async fn dashboard(ctx: &Ctx<'_>) -> anyhow::Result<Created> {
    let client = &ctx.clients.cloudwatch;
    let name = ctx.name("DashboardName", 255);
    let body = ctx.str("DashboardBody").context("DashboardBody is missing")?;
    let existed = client.get_dashboard().dashboard_name(&name).send().await.is_ok();
    client
        .put_dashboard()
        .dashboard_name(&name)
        .dashboard_body(body)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!(aws_sdk_cloudwatch::error::DisplayErrorContext(&e).to_string()))
        .with_context(|| format!("PutDashboard {name}"))?;
    // Dashboards are global: no region in the ARN.
    let arn = format!("arn:aws:cloudwatch::{}:dashboard/{name}", ctx.options.account_id);
    let status = if existed { Status::Updated } else { Status::Created };
    Ok(Some((status, resolved(name, &[("DashboardArn", Some(arn))]))))
}

// ---------------------------------------------------------------------------------------------
// SNS

/// Protocols whose endpoint the emulators can deliver to; the others (email, https, sms…) name
/// something outside this machine.
const LOCAL_PROTOCOLS: &[&str] = &["sqs"];

async fn topic(ctx: &Ctx<'_>) -> anyhow::Result<Created> {
    let client = &ctx.clients.sns;
    let fifo = ctx.str("FifoTopic").as_deref() == Some("true");
    let mut name = ctx.name("TopicName", if fifo { 251 } else { 256 });
    if fifo && !name.ends_with(".fifo") {
        name.push_str(".fifo");
    }
    let arn = ctx.arn("sns", &name);
    let existed = client.get_topic_attributes().topic_arn(&arn).send().await.is_ok();
    let mut attributes = HashMap::new();
    for attribute in ["DisplayName", "FifoTopic", "ContentBasedDeduplication"] {
        if let Some(value) = ctx.str(attribute) {
            attributes.insert(attribute.to_owned(), value);
        }
    }
    // CreateTopic returns the existing topic when the attributes match; FifoTopic cannot change.
    let created = client
        .create_topic()
        .name(&name)
        .set_attributes((!attributes.is_empty()).then_some(attributes))
        .send()
        .await
        .with_context(|| format!("CreateTopic {name}"))?;
    let arn = created.topic_arn().map_or(arn, str::to_owned);
    // Inline subscriptions, as the topic's `Subscription` property declares them.
    for inline in ctx.props.get("Subscription").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
        let field =
            |k: &str| inline.get(k).and_then(Value::as_str).with_context(|| format!("Subscription without {k}"));
        subscribe(ctx, &arn, field("Protocol")?, field("Endpoint")?, HashMap::new()).await?;
    }
    let status = if existed { Status::Exists } else { Status::Created };
    Ok(Some((status, resolved(arn.clone(), &[("TopicArn", Some(arn)), ("TopicName", Some(name))]))))
}

async fn subscription(ctx: &Ctx<'_>) -> anyhow::Result<Created> {
    let topic = ctx.str("TopicArn").context("Subscription without TopicArn")?;
    let protocol = ctx.str("Protocol").context("Subscription without Protocol")?;
    let endpoint = ctx.str("Endpoint").context("Subscription without Endpoint")?;
    let mut attributes = HashMap::new();
    for attribute in ["RawMessageDelivery", "FilterPolicy", "FilterPolicyScope", "RedrivePolicy"] {
        match ctx.props.get(attribute) {
            None => {}
            // Policies are JSON documents in SNS, objects in the template.
            Some(v @ Value::Object(_)) => {
                attributes.insert(attribute.to_owned(), v.to_string());
            }
            Some(_) => {
                attributes.insert(attribute.to_owned(), ctx.str(attribute).unwrap_or_default());
            }
        }
    }
    Ok(Some(subscribe(ctx, &topic, &protocol, &endpoint, attributes).await?))
}

/// Subscribes an endpoint the emulators can deliver to; any other is recorded and skipped with a
/// log line, since nothing here could receive it (and a confirmation mail would go nowhere).
async fn subscribe(
    ctx: &Ctx<'_>,
    topic: &str,
    protocol: &str,
    endpoint: &str,
    attributes: HashMap<String, String>,
) -> anyhow::Result<(Status, Resolved)> {
    if !LOCAL_PROTOCOLS.contains(&protocol) {
        tracing::warn!(
            resource = ctx.id,
            protocol,
            endpoint,
            topic,
            "subscription not created locally: nothing here can receive it"
        );
        let reference = format!("{topic}:{}-local", ctx.id);
        let reason = format!("a {protocol} subscription cannot be delivered locally (endpoint {endpoint})");
        return Ok((Status::Local(reason), resolved(reference, &[])));
    }
    let client = &ctx.clients.sns;
    let existing = client
        .list_subscriptions_by_topic()
        .topic_arn(topic)
        .send()
        .await
        .with_context(|| format!("ListSubscriptionsByTopic {topic}"))?;
    let existed =
        existing.subscriptions().iter().any(|s| s.protocol() == Some(protocol) && s.endpoint() == Some(endpoint));
    // Subscribe returns the existing subscription for the same protocol and endpoint.
    let subscribed = client
        .subscribe()
        .topic_arn(topic)
        .protocol(protocol)
        .endpoint(endpoint)
        .return_subscription_arn(true)
        .set_attributes((!attributes.is_empty()).then_some(attributes))
        .send()
        .await
        .with_context(|| format!("Subscribe {protocol} {endpoint} to {topic}"))?;
    let arn = subscribed.subscription_arn().context("Subscribe returned no SubscriptionArn")?.to_owned();
    let status = if existed { Status::Exists } else { Status::Created };
    Ok((status, resolved(arn, &[])))
}

// ---------------------------------------------------------------------------------------------
// CloudWatch Logs

/// A log group (the functions' own ones receive their logs from the local Lambda service).
async fn log_group(ctx: &Ctx<'_>) -> anyhow::Result<Created> {
    let client = &ctx.clients.logs;
    let name = ctx.name("LogGroupName", 512);
    let status = match client.create_log_group().log_group_name(&name).send().await {
        Ok(_) => Status::Created,
        Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_already_exists_exception()) => Status::Exists,
        Err(e) => return Err(anyhow!(aws_sdk_cloudwatchlogs::error::DisplayErrorContext(&e).to_string())),
    };
    if let Some(days) = ctx.str("RetentionInDays") {
        let days: i32 = days.parse().with_context(|| format!("RetentionInDays {days}"))?;
        client
            .put_retention_policy()
            .log_group_name(&name)
            .retention_in_days(days)
            .send()
            .await
            .map_err(|e| anyhow!(aws_sdk_cloudwatchlogs::error::DisplayErrorContext(&e).to_string()))?;
    }
    let arn = ctx.arn("logs", &format!("log-group:{name}:*"));
    Ok(Some((status, resolved(name, &[("Arn", Some(arn))]))))
}
