//! Cheap invariants of `template.yaml` and the state machine, checked on every test run (no
//! emulator needed). They are the checklist for a change: a new function crate, saga step, queue
//! or alarm that misses one of its places fails here, naming what is missing (docs/extending.md).

use std::collections::BTreeSet;

use local_env::Template;
use serde_json::Value;
use system_tests::workspace_root;

fn template() -> Template {
    Template::load(&workspace_root().join("template.yaml")).expect("template.yaml parses")
}

#[test]
fn every_function_resource_points_at_a_crate_with_a_binary() {
    let t = template();
    let globals = &t.globals["Function"];
    assert_eq!(globals["Runtime"], "provided.al2023");
    assert_eq!(globals["Architectures"], serde_json::json!(["arm64"]));
    let functions: Vec<_> = t.resources.values().filter(|r| r.kind == "AWS::Serverless::Function").collect();
    assert!(!functions.is_empty());
    for f in functions {
        let code_uri = f.properties["CodeUri"].as_str().unwrap_or_else(|| panic!("{}: CodeUri", f.logical_id));
        let dir = workspace_root().join(code_uri);
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml"))
            .unwrap_or_else(|_| panic!("{}: {code_uri}/Cargo.toml is missing", f.logical_id));
        let crate_name = code_uri.rsplit('/').next().unwrap_or_default();
        assert!(
            manifest.contains(&format!("name = \"{crate_name}\"")),
            "{}: the crate in {code_uri} is not named {crate_name}",
            f.logical_id
        );
        assert!(dir.join("src/main.rs").is_file(), "{}: {code_uri} has no binary (src/main.rs)", f.logical_id);
        assert!(dir.join("src/lib.rs").is_file(), "{}: {code_uri} keeps its logic in src/lib.rs", f.logical_id);
        assert_eq!(f.properties["Handler"], "bootstrap", "{}", f.logical_id);
        // SAM reads BuildMethod from the resource's Metadata, which the parser keeps apart.
        let raw = std::fs::read_to_string(workspace_root().join("template.yaml")).expect("read");
        let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&raw).expect("yaml");
        let method = &yaml["Resources"][f.logical_id.as_str()]["Metadata"]["BuildMethod"];
        assert_eq!(method.as_str(), Some("rust-cargolambda"), "{}: BuildMethod", f.logical_id);
    }
}

#[test]
fn every_function_crate_is_deployed() {
    let t = template();
    let deployed: BTreeSet<String> = t
        .resources
        .values()
        .filter(|r| r.kind == "AWS::Serverless::Function")
        .filter_map(|r| r.properties["CodeUri"].as_str().map(|u| u.trim_end_matches('/').to_owned()))
        .collect();
    for entry in std::fs::read_dir(workspace_root().join("functions")).expect("functions/") {
        let path = entry.expect("entry").path();
        if path.join("Cargo.toml").is_file() {
            let name = format!("functions/{}", path.file_name().and_then(|n| n.to_str()).unwrap_or_default());
            assert!(deployed.contains(&name), "{name} has no AWS::Serverless::Function in template.yaml");
        }
    }
}

#[test]
fn every_sqs_event_source_follows_the_aws_advice() {
    let t = template();
    let visibility_default = t.parameters["StepVisibilityTimeout"]["Default"].as_u64().expect("default");
    let timeout = t.globals["Function"]["Timeout"].as_u64().expect("global timeout");
    assert!(visibility_default >= 6 * timeout, "queue visibility must be at least 6x the function timeout");
    for f in t.resources.values().filter(|r| r.kind == "AWS::Serverless::Function") {
        for (name, event) in f.properties["Events"].as_object().into_iter().flatten() {
            if event["Type"] != "SQS" {
                continue;
            }
            let props = &event["Properties"];
            let context = format!("{}.{name}", f.logical_id);
            assert_eq!(props["FunctionResponseTypes"], serde_json::json!(["ReportBatchItemFailures"]), "{context}");
            assert!(props["ScalingConfig"]["MaximumConcurrency"] != Value::Null, "{context}: MaximumConcurrency");
            let queue = props["Queue"]["Fn::GetAtt"][0].as_str().unwrap_or_else(|| panic!("{context}: Queue"));
            let queue = &t.resources[queue].properties;
            // The dead-letter handler reads the last stop: a message it fails to handle stays on
            // its DLQ (14 days) for another try, there is no queue behind it.
            if f.logical_id != "DeadLetterHandlerFunction" {
                assert!(queue["RedrivePolicy"]["maxReceiveCount"].as_u64().is_some(), "{context}: maxReceiveCount");
            }
            assert_eq!(queue["VisibilityTimeout"], serde_json::json!({ "Ref": "StepVisibilityTimeout" }), "{context}");
        }
    }
}

/// Every task ends within its `TimeoutSeconds`, and none has `HeartbeatSeconds`: the workers
/// never send heartbeats, so a heartbeat would only be a second timeout. And LocalStack (4.9.2)
/// sets a callback task's heartbeat timer up only after the command is sent, so an answer that
/// comes back before then is lost and the task times out after `HeartbeatSeconds` (seen with a
/// fast responder: a 120 s stall in one step of about 80).
#[test]
fn every_task_of_the_saga_has_a_timeout_no_heartbeat_and_jittered_retries() {
    let asl: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("statemachine/order-saga.asl.json")).expect("asl"),
    )
    .expect("json");
    let states = asl["States"].as_object().expect("states");
    let tasks: Vec<_> = states.iter().filter(|(_, s)| s["Type"] == "Task").collect();
    assert!(tasks.len() >= 10);
    for (name, task) in tasks {
        let timeout = task["TimeoutSeconds"].as_u64().unwrap_or_else(|| panic!("{name}: TimeoutSeconds"));
        assert!((1..=120).contains(&timeout), "{name}: TimeoutSeconds {timeout}");
        assert!(task.get("HeartbeatSeconds").is_none(), "{name}: HeartbeatSeconds");
        for retry in task["Retry"].as_array().unwrap_or_else(|| panic!("{name}: Retry")) {
            assert_eq!(retry["JitterStrategy"], "FULL", "{name}");
            assert!(retry["MaxAttempts"].as_u64().is_some_and(|n| n > 0), "{name}");
        }
    }
}

/// A compensation that keeps failing does not stop the others (the saga alerts and continues):
/// its Catch records it under its own name in `$.compensationFailures` (reset when an execution
/// starts) and goes where its success goes; after the last one, a Choice flags the order if any
/// failed, and the flag and the manual-action case carry every failure.
#[test]
fn a_failed_compensation_is_recorded_and_the_next_one_still_runs() {
    let asl: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("statemachine/order-saga.asl.json")).expect("asl"),
    )
    .expect("json");
    let states = &asl["States"];
    let failures = "$.compensationFailures";
    // Reset first, on every path (a new order, or a person's retry of the compensations)
    let start = &states[asl["StartAt"].as_str().expect("StartAt")];
    assert_eq!((start["Type"].as_str(), start["ResultPath"].as_str()), (Some("Pass"), Some(failures)));
    assert_eq!(start["Result"], serde_json::json!({}));
    let compensations = ["CancelShipment", "RefundPayment", "ReleaseInventory"];
    // Where success goes on to, past a Choice that may first wait and run the step again.
    let then = |state: &Value| {
        let next = &states[state["Next"].as_str().expect("Next")];
        let waits = next["Choices"].as_array().is_some_and(|choices| {
            choices.iter().any(|c| c["Next"].as_str().is_some_and(|n| states[n]["Type"] == "Wait"))
        });
        if waits { next["Default"].clone() } else { state["Next"].clone() }
    };
    for name in compensations {
        let state = &states[name];
        let catches = state["Catch"].as_array().unwrap_or_else(|| panic!("{name}: Catch"));
        assert_eq!(catches.len(), 1, "{name}");
        assert_eq!(catches[0]["ErrorEquals"], serde_json::json!(["States.ALL"]), "{name}");
        assert_eq!(catches[0]["ResultPath"].as_str(), Some(format!("{failures}.{name}").as_str()), "{name}");
        assert_eq!(catches[0]["Next"], then(state), "{name}: a failure goes on where success goes");
    }
    assert_eq!(then(&states["CancelShipment"]), "RefundPayment");
    assert_eq!(then(&states["RefundPayment"]), "ReleaseInventory");
    let choice = &states[states["ReleaseInventory"]["Next"].as_str().expect("Next")];
    assert_eq!(choice["Type"], "Choice");
    assert_eq!(choice["Default"], "CancelOrder");
    let rules = choice["Choices"].as_array().expect("Choices");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["Next"], "FlagForManualAction");
    let checked: BTreeSet<&str> = rules[0]["Or"]
        .as_array()
        .expect("Or")
        .iter()
        .inspect(|c| assert_eq!(c["IsPresent"], true, "{c}"))
        .filter_map(|c| c["Variable"].as_str()?.strip_prefix("$.compensationFailures."))
        .collect();
    assert_eq!(checked, compensations.into_iter().collect());
    // The final steps flag at once, recording themselves the same way
    for name in ["CompleteOrder", "CancelOrder"] {
        let catch = &states[name]["Catch"][0];
        assert_eq!(catch["ResultPath"].as_str(), Some(format!("{failures}.{name}").as_str()), "{name}");
        assert_eq!(catch["Next"], "FlagForManualAction", "{name}");
    }
    // The flag step and the manual-action case get every failure
    for name in ["FlagForManualAction", "ReportManualAction"] {
        assert_eq!(states[name]["Parameters"]["MessageBody"]["failures.$"], failures, "{name}");
    }
}

fn saga_definition() -> Value {
    let text = std::fs::read_to_string(workspace_root().join("statemachine/order-saga.asl.json")).expect("asl");
    serde_json::from_str(&text).expect("json")
}

/// Where a state goes next: `Next`, a Choice's branches and `Default`, and its Catch handlers.
fn transitions(state: &Value) -> Vec<&str> {
    let choices = state["Choices"].as_array().into_iter().flatten().map(|c| &c["Next"]);
    let catches = state["Catch"].as_array().into_iter().flatten().map(|c| &c["Next"]);
    [&state["Next"], &state["Default"]].into_iter().chain(choices).chain(catches).filter_map(Value::as_str).collect()
}

/// A new step needs a task state that names it, a queue for its commands and a function that
/// consumes that queue: this fails, naming the step or task, until all are there.
#[test]
fn every_saga_step_has_a_task_state_whose_queue_a_function_consumes() {
    let t = template();
    let asl = saga_definition();
    let machine = t.resources.values().find(|r| r.kind == "AWS::Serverless::StateMachine").expect("state machine");
    let consumed: BTreeSet<&str> = t
        .resources
        .values()
        .flat_map(|f| f.properties["Events"].as_object().into_iter().flatten())
        .filter(|(_, e)| e["Type"] == "SQS")
        .filter_map(|(_, e)| e["Properties"]["Queue"]["Fn::GetAtt"][0].as_str())
        .collect();
    let mut tasked = BTreeSet::new();
    for (name, task) in asl["States"].as_object().expect("states").iter().filter(|(_, s)| s["Type"] == "Task") {
        let body = &task["Parameters"]["MessageBody"];
        let placeholder = task["Parameters"]["QueueUrl"].as_str().unwrap_or_default();
        let substitution = placeholder.trim_start_matches("${").trim_end_matches('}');
        let queue = machine.properties["DefinitionSubstitutions"][substitution]["Ref"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: {placeholder} is not a DefinitionSubstitution naming a queue"));
        assert_eq!(t.resources[queue].kind, "AWS::SQS::Queue", "{name}: {queue}");
        let sends =
            serde_json::json!({ "SQSSendMessagePolicy": { "QueueName": { "Fn::GetAtt": [queue, "QueueName"] } } });
        let policies = machine.properties["Policies"].as_array().expect("Policies");
        assert!(policies.contains(&sends), "{name}: the state machine may not send to {queue}");
        assert!(consumed.contains(queue), "{name}: no function consumes {queue}");
        let Some(step) = body["step"].as_str() else {
            // Not a step: a notice for people (the manual-action report), still consumed.
            assert!(task["Resource"].as_str().is_some_and(|r| !r.ends_with(".waitForTaskToken")), "{name}: no step");
            continue;
        };
        let step: shared::saga::Step =
            serde_json::from_value(Value::from(step)).unwrap_or_else(|e| panic!("{name}: step {step}: {e}"));
        assert_eq!(body["taskToken.$"], "$$.Task.Token", "{name}");
        tasked.insert(step.position());
    }
    for step in shared::saga::Step::ALL {
        assert!(tasked.contains(&step.position()), "{step:?} has no task state in the saga");
    }
}

/// Every transition lands on a state, every state is reached from `StartAt`, and every path
/// ends in a terminal state.
#[test]
fn every_transition_of_the_saga_lands_on_a_state_and_every_state_is_reached() {
    let asl = saga_definition();
    let states = asl["States"].as_object().expect("states");
    let mut reached = BTreeSet::new();
    let mut next = vec![asl["StartAt"].as_str().expect("StartAt")];
    while let Some(name) = next.pop() {
        let state = states.get(name).unwrap_or_else(|| panic!("a transition to {name}, which is no state"));
        if reached.insert(name) {
            let onward = transitions(state);
            let terminal = matches!(state["Type"].as_str(), Some("Succeed" | "Fail")) || state["End"] == true;
            assert!(terminal || !onward.is_empty(), "{name} goes nowhere and does not end");
            next.extend(onward);
        }
    }
    let unreached: Vec<_> = states.keys().filter(|k| !reached.contains(k.as_str())).collect();
    assert!(unreached.is_empty(), "states never reached: {unreached:?}");
}

/// The saga retries and catches only errors the steps raise (`shared::saga::errors`) or Step
/// Functions' own (`States.*`): a misspelt name would never match, silently.
#[test]
fn the_saga_retries_and_catches_only_errors_the_steps_raise() {
    let asl = saga_definition();
    for (name, state) in asl["States"].as_object().expect("states") {
        let handlers = ["Retry", "Catch"].into_iter().flat_map(|k| state[k].as_array().into_iter().flatten());
        for error in handlers.flat_map(|h| h["ErrorEquals"].as_array().expect("ErrorEquals")) {
            let error = error.as_str().unwrap_or_default();
            assert!(
                error.starts_with("States.") || shared::saga::errors::ALL.contains(&error),
                "{name}: {error} is raised by no step"
            );
        }
    }
}

/// Every queue has exactly one consumer; a work queue hands what keeps failing to a dead-letter
/// queue, and every queue without one is a last stop that the dead-letter handler reads.
#[test]
fn every_queue_is_consumed_once_and_failures_end_with_the_dead_letter_handler() {
    let t = template();
    let mut consumers: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for f in t.resources.values() {
        for (_, event) in f.properties["Events"].as_object().into_iter().flatten().filter(|(_, e)| e["Type"] == "SQS") {
            let queue = event["Properties"]["Queue"]["Fn::GetAtt"][0].as_str().expect("Queue");
            consumers.entry(queue).or_default().push(&f.logical_id);
        }
    }
    let handler = "DeadLetterHandlerFunction";
    for queue in t.resources.values().filter(|r| r.kind == "AWS::SQS::Queue") {
        let id = queue.logical_id.as_str();
        let read_by = consumers.get(id).cloned().unwrap_or_default();
        assert_eq!(read_by.len(), 1, "{id} is consumed by {read_by:?}");
        match queue.properties["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0].as_str() {
            Some(dlq) => {
                assert_eq!(t.resources[dlq].kind, "AWS::SQS::Queue", "{id}: {dlq}");
                assert_eq!(consumers.get(dlq).map(Vec::as_slice), Some(&[handler][..]), "{id}: its DLQ {dlq}");
            }
            None => assert_eq!(read_by, [handler], "{id} has no DLQ, so it must be a last stop"),
        }
    }
}

/// Every route the template gives an HTTP function reaches a handler of that function's router
/// (the local HTTP API, like API Gateway, forwards only the template's routes): a route added to
/// one and not the other is found here, not by a client's `404`.
#[tokio::test]
async fn every_http_route_of_the_template_is_routed_by_its_function() {
    use axum::body::Body;
    use shared::eventstore::InMemoryEventStore;
    use tower::ServiceExt;

    // Given each HTTP function's router, over stores no request here reaches
    let dynamodb = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::Config::builder().behavior_version(aws_config::BehaviorVersion::latest()).build(),
    );
    let models = shared::adapters::dynamodb::readmodels::ReadModelStore::new(dynamodb, "unused");
    let query = query_api::router(query_api::QueryApi::with_store(InMemoryEventStore::default(), models, "op".into()));
    let place = place_order::router(std::sync::Arc::new(place_order::PlaceOrder {
        repo: shared::aggregate::Repository::new(InMemoryEventStore::default()),
        limiter: None::<shared::ratelimit::RateLimiter<shared::ratelimit::InMemoryCounters>>,
    }));
    let t = template();
    let mut routes = 0;
    for f in t.resources.values().filter(|r| r.kind == "AWS::Serverless::Function") {
        for (name, event) in
            f.properties["Events"].as_object().into_iter().flatten().filter(|(_, e)| e["Type"] == "HttpApi")
        {
            let context = format!("{}.{name}", f.logical_id);
            let router = match f.properties["CodeUri"].as_str().map(|u| u.trim_end_matches('/')) {
                Some("functions/query-api") => query.clone(),
                Some("functions/place-order") => place.clone(),
                other => panic!("{context}: an HTTP route on {other:?}, which this test has no router for"),
            };
            let (method, path) = (&event["Properties"]["Method"], &event["Properties"]["Path"]);
            let method = method.as_str().unwrap_or_else(|| panic!("{context}: Method"));
            // Each `{parameter}` becomes a value
            let path: Vec<&str> = path.as_str().unwrap_or_else(|| panic!("{context}: Path")).split('/').collect();
            let path =
                path.iter().map(|s| if s.starts_with('{') { "Order-x" } else { s }).collect::<Vec<_>>().join("/");
            // When it is requested (without the authorizer's claims: nothing is read or written)
            let request =
                axum::http::Request::builder().method(method).uri(&path).body(Body::empty()).expect("request");
            let status = router.oneshot(request).await.expect("an answer").status().as_u16();
            // Then a handler took it: neither the router's 404 nor its 405
            assert!(status != 404 && status != 405, "{context}: {method} {path} is not routed ({status})");
            routes += 1;
        }
    }
    assert!(routes >= 5, "{routes} routes");
}

#[test]
fn every_dead_letter_queue_has_a_depth_alarm() {
    let t = template();
    // Queues that receive what failed: redrive targets, rule DLQs, stream OnFailure destinations,
    // and the manual-action queue.
    let mut dead_letter = BTreeSet::new();
    let text = serde_json::to_string(&t.resources.values().map(|r| &r.properties).collect::<Vec<_>>()).expect("json");
    for key in ["deadLetterTargetArn", "DeadLetterConfig", "Destination"] {
        for part in text.split(&format!("\"{key}\"")).skip(1) {
            if let Some(id) = part.split("\"Fn::GetAtt\":[\"").nth(1).and_then(|r| r.split('"').next()) {
                dead_letter.insert(id.to_owned());
            }
        }
    }
    dead_letter.insert("ManualActionQueue".to_owned());
    dead_letter.retain(|id| t.resources.get(id).is_some_and(|r| r.kind == "AWS::SQS::Queue"));
    assert!(dead_letter.len() >= 15, "{dead_letter:?}");
    let watched: BTreeSet<String> = t
        .resources
        .values()
        .filter(|r| {
            r.kind == "AWS::CloudWatch::Alarm" && r.properties["MetricName"] == "ApproximateNumberOfMessagesVisible"
        })
        .filter_map(|r| r.properties["Dimensions"][0]["Value"]["Fn::GetAtt"][0].as_str().map(str::to_owned))
        .collect();
    let unwatched: Vec<_> = dead_letter.difference(&watched).collect();
    assert!(unwatched.is_empty(), "dead-letter queues without a depth alarm: {unwatched:?}");
}

/// Every alarm reaches someone: its ALARM and its OK go to the one alarm topic, and the topic's
/// subscription is made only when an endpoint is given (there is none by default).
#[test]
fn every_alarm_notifies_the_alarm_topic() {
    let t = template();
    assert_eq!(t.resources["AlarmTopic"].kind, "AWS::SNS::Topic");
    let topic = serde_json::json!([{ "Ref": "AlarmTopic" }]);
    let alarms: Vec<_> = t.resources.values().filter(|r| r.kind == "AWS::CloudWatch::Alarm").collect();
    assert!(alarms.len() >= 17, "{} alarms", alarms.len());
    for alarm in alarms {
        assert_eq!(alarm.properties["AlarmActions"], topic, "{}: AlarmActions", alarm.logical_id);
        assert_eq!(alarm.properties["OKActions"], topic, "{}: OKActions", alarm.logical_id);
    }
    let subscription = &t.resources["AlarmSubscription"];
    assert_eq!(subscription.properties["TopicArn"], serde_json::json!({ "Ref": "AlarmTopic" }));
    assert_eq!(subscription.condition.as_deref(), Some("HasAlarmSubscription"));
    assert_eq!(t.parameters["AlarmSubscriptionEndpoint"]["Default"], "");
}

/// A stalled pipeline pages before anything reaches a DLQ: every stream consumer has an
/// iterator-age alarm, every queue a function consumes an age-of-oldest-message alarm, every
/// HTTP API a 5xx alarm, and the functions' errors and throttles are watched.
#[test]
fn every_stream_consumer_and_consumed_queue_has_a_stall_alarm() {
    let t = template();
    let alarms: Vec<&Value> =
        t.resources.values().filter(|r| r.kind == "AWS::CloudWatch::Alarm").map(|r| &r.properties).collect();
    // The logical ids the alarms on `metric` watch through their first dimension.
    let watched = |metric: &str| -> BTreeSet<String> {
        alarms
            .iter()
            .filter(|a| a["MetricName"] == metric)
            .filter_map(|a| {
                let value = &a["Dimensions"][0]["Value"];
                value["Ref"].as_str().or_else(|| value["Fn::GetAtt"][0].as_str()).map(str::to_owned)
            })
            .collect()
    };
    let iterator_age = watched("IteratorAge");
    // A queue with a depth alarm (a DLQ: any message pages at once) needs no age alarm as well.
    let queue_age: BTreeSet<String> = watched("ApproximateAgeOfOldestMessage")
        .union(&watched("ApproximateNumberOfMessagesVisible"))
        .cloned()
        .collect();
    let mut consumers = 0;
    for f in t.resources.values().filter(|r| r.kind == "AWS::Serverless::Function") {
        for (name, event) in f.properties["Events"].as_object().into_iter().flatten() {
            let context = format!("{}.{name}", f.logical_id);
            match event["Type"].as_str() {
                Some("DynamoDB" | "Kinesis") => {
                    assert!(iterator_age.contains(&f.logical_id), "{context}: no IteratorAge alarm");
                }
                Some("SQS") => {
                    let queue = event["Properties"]["Queue"]["Fn::GetAtt"][0].as_str().unwrap_or_default();
                    assert!(queue_age.contains(queue), "{context}: no ApproximateAgeOfOldestMessage alarm on {queue}");
                }
                _ => continue,
            }
            consumers += 1;
        }
    }
    assert!(consumers >= 14, "{consumers} consumers");
    for api in t.resources.values().filter(|r| r.kind == "AWS::Serverless::HttpApi") {
        assert!(watched("5xx").contains(&api.logical_id), "{}: no 5xx alarm", api.logical_id);
    }
    // Errors and throttles of every function: Lambda's metrics without a dimension
    for metric in ["Errors", "Throttles"] {
        let across = alarms
            .iter()
            .any(|a| a["Namespace"] == "AWS/Lambda" && a["MetricName"] == metric && a["Dimensions"].is_null());
        assert!(across, "no alarm on {metric} across the functions");
    }
}

/// The logical ids a value refers to: `Ref`, `Fn::GetAtt`, and `${Id}` / `${Id.Attr}` in `Fn::Sub`.
fn referenced(value: &Value, into: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("Ref", Value::String(id)) => {
                        into.insert(id.clone());
                    }
                    ("Fn::GetAtt", Value::Array(parts)) => {
                        into.extend(parts.first().and_then(Value::as_str).map(str::to_owned));
                    }
                    ("Fn::GetAtt", Value::String(path)) => {
                        into.extend(path.split('.').next().map(str::to_owned));
                    }
                    ("Fn::Sub", sub) => {
                        let text = sub.as_str().or_else(|| sub.get(0).and_then(Value::as_str)).unwrap_or_default();
                        for part in text.split("${").skip(1) {
                            let name = part.split(['}', '.']).next().unwrap_or_default();
                            if !name.starts_with("AWS::") && !name.is_empty() {
                                into.insert(name.to_owned());
                            }
                        }
                        referenced(sub, into);
                    }
                    _ => referenced(inner, into),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| referenced(v, into)),
        _ => {}
    }
}

/// A policy statement's actions are named one by one, and its resources are named: `*` only for
/// the calls IAM scopes by something else (a task token).
fn assert_narrow_statements(owner: &str, statements: &Value) {
    const UNSCOPED: [&str; 3] = ["states:SendTaskSuccess", "states:SendTaskFailure", "states:SendTaskHeartbeat"];
    let as_list = |v: &Value| match v {
        Value::Array(items) => items.clone(),
        Value::Null => vec![],
        other => vec![other.clone()],
    };
    for statement in as_list(statements) {
        assert_eq!(statement["Effect"], "Allow", "{owner}: {statement}");
        let actions: Vec<String> =
            as_list(&statement["Action"]).iter().filter_map(|a| a.as_str().map(str::to_owned)).collect();
        assert!(!actions.is_empty(), "{owner}: a statement without actions: {statement}");
        for action in &actions {
            assert!(!action.contains('*'), "{owner}: wildcard action {action}");
        }
        if as_list(&statement["Resource"]).iter().any(|r| r == "*") {
            assert!(actions.iter().all(|a| UNSCOPED.contains(&a.as_str())), "{owner}: Resource \"*\" for {actions:?}");
        }
        assert!(statement.get("NotAction").is_none() && statement.get("NotResource").is_none(), "{owner}");
    }
}

/// Least privilege: every function's policies are this template's managed policies, SAM policy
/// templates scoped to one resource (no CRUD bundle: it brings Scan, DeleteItem and
/// BatchWriteItem), or statements with named actions and resources; and every resource a
/// function's own policies name is one its configuration uses (its environment or its events).
#[test]
fn every_function_s_permissions_name_only_what_it_uses() {
    let t = template();
    const NARROW_TEMPLATES: [&str; 6] = [
        "SQSSendMessagePolicy",
        "SSMParameterReadPolicy",
        "SNSPublishMessagePolicy",
        "StepFunctionsExecutionPolicy",
        "EventBridgePutEventsPolicy",
        "DynamoDBReadPolicy",
    ];
    let managed: BTreeSet<&str> = t
        .resources
        .values()
        .filter(|r| r.kind == "AWS::IAM::ManagedPolicy")
        .map(|r| {
            assert_narrow_statements(&r.logical_id, &r.properties["PolicyDocument"]["Statement"]);
            r.logical_id.as_str()
        })
        .collect();
    let mut global = BTreeSet::new();
    referenced(&t.globals["Function"]["Environment"], &mut global);
    let functions: Vec<_> = t.resources.values().filter(|r| r.kind == "AWS::Serverless::Function").collect();
    for f in functions {
        let owner = f.logical_id.as_str();
        let mut used = global.clone();
        referenced(&f.properties["Environment"], &mut used);
        let mut sources = BTreeSet::new();
        referenced(&f.properties["Events"], &mut sources);
        used.extend(sources.iter().cloned());
        let policies = f.properties["Policies"].as_array().unwrap_or_else(|| panic!("{owner}: Policies"));
        for policy in policies {
            let mut names = BTreeSet::new();
            match policy.as_object().and_then(|p| p.iter().next()) {
                Some((key, Value::String(id))) if key == "Ref" => {
                    assert!(
                        managed.contains(id.as_str()),
                        "{owner}: Ref {id} is not a managed policy of this template"
                    );
                    continue;
                }
                Some((key, statements)) if key == "Statement" => {
                    assert_narrow_statements(owner, statements);
                    referenced(statements, &mut names);
                }
                Some((key, parameters)) => {
                    assert!(
                        NARROW_TEMPLATES.contains(&key.as_str()),
                        "{owner}: policy template {key} is broader than needed"
                    );
                    referenced(parameters, &mut names);
                    assert!(!names.is_empty(), "{owner}: {key} names no resource of this template");
                }
                None => panic!("{owner}: a policy that is neither a managed policy nor a statement: {policy}"),
            }
            for name in names.iter().filter(|n| t.resources.contains_key(n.as_str())) {
                // Or a function whose failures this one is handed (its mapping's OnFailure
                // destination is one of this function's sources): it acts on what they left.
                let hands_failures_here = || {
                    let mut theirs = BTreeSet::new();
                    referenced(&t.resources[name.as_str()].properties["Events"], &mut theirs);
                    theirs.iter().any(|r| sources.contains(r))
                };
                assert!(
                    used.contains(name) || hands_failures_here(),
                    "{owner}: its policy names {name}, which its environment and events do not"
                );
            }
        }
    }
}
