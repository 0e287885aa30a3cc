//! The local provisioner: `template.yaml` (and a fixture with every supported type) provisioned
//! on the emulators, checked through the services' own behaviour.

use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use local_env::{Options, Stack, Status, Template};
use serde_json::{Value, json};
use system_tests::{LocalAws, unique, workspace_root};

async fn provision(aws: &LocalAws, template: &str, stack_name: &str) -> Stack {
    let template = Template::load(&workspace_root().join(template)).expect("template loads");
    let options = Options {
        stack_name: stack_name.to_owned(),
        region: aws.var("AWS_REGION"),
        account_id: "000000000000".into(),
        parameter_overrides: Default::default(),
    };
    local_env::provision(&template, &options, &aws.provisioning_clients()).await.expect("provisions")
}

fn status<'a>(stack: &'a Stack, logical_id: &str) -> &'a Status {
    &stack.outcomes.iter().find(|o| o.logical_id == logical_id).unwrap_or_else(|| panic!("{logical_id}")).status
}

async fn receive_one(sqs: &aws_sdk_sqs::Client, url: &str) -> Option<aws_sdk_sqs::types::Message> {
    for _ in 0..10 {
        let got = sqs.receive_message().queue_url(url).wait_time_seconds(1).send().await.expect("receive");
        if let Some(m) = got.messages.and_then(|m| m.into_iter().next()) {
            return Some(m);
        }
    }
    None
}

#[tokio::test]
async fn the_project_template_provisions_with_nothing_left_out() {
    // Given the project's own template, When it is provisioned under a fresh stack name
    let aws = LocalAws::load().await;
    let stack_name = unique("p");
    let stack = provision(&aws, "template.yaml", &stack_name).await;

    // Then every resource exists locally, and the event store's tables are as declared
    assert!(stack.failed().is_empty() && stack.unsupported().is_empty(), "{}", local_env::report(&stack));
    assert!(stack.unresolved.is_empty(), "{:?}", stack.unresolved);
    let events_table = &stack.environment["EVENTS_TABLE"];
    assert_eq!(events_table, &format!("{stack_name}-events"));
    let table = aws.dynamodb().describe_table().table_name(events_table).send().await.expect("table exists");
    let stream = table.table().and_then(|t| t.stream_specification()).expect("events table has a stream");
    assert_eq!(stream.stream_view_type().map(|v| v.as_str()), Some("NEW_IMAGE"));
    assert_eq!(
        stack.outputs["EventsTableStreamArn"],
        table.table().and_then(|t| t.latest_stream_arn()).unwrap_or_default()
    );
    let ttl = aws
        .dynamodb()
        .describe_time_to_live()
        .table_name(&stack.environment["COMMANDS_TABLE"])
        .send()
        .await
        .expect("ttl");
    assert_eq!(ttl.time_to_live_description().and_then(|t| t.attribute_name()), Some("expiresAt"));
    // No endpoint given: the alarm topic exists, its subscription is left out by its condition
    assert_eq!(status(&stack, "AlarmTopic"), &Status::Created);
    assert_eq!(status(&stack, "AlarmSubscription"), &Status::Skipped("condition HasAlarmSubscription is false".into()));
    aws.remove_alarms_and_queues(&stack).await;
}

#[tokio::test]
async fn every_supported_type_is_created_and_behaves_and_the_rest_is_named() {
    let aws = LocalAws::load().await;
    let stack_name = unique("f");
    let stack = provision(&aws, "tests/fixtures/provisioning.yaml", &stack_name).await;
    let report = local_env::report(&stack);

    // Nothing failed; the insight rule is reported by name as not created; stand-ins are marked;
    // what its condition leaves out is skipped
    assert!(stack.failed().is_empty(), "{report}");
    assert_eq!(status(&stack, "Insights"), &Status::Unsupported);
    assert!(report.contains("Not created locally: Insights (AWS::CloudWatch::InsightRule)"), "{report}");
    // The dashboard is put with its body resolved
    assert_eq!(status(&stack, "Board"), &Status::Created);
    let board = aws.cloudwatch().get_dashboard().dashboard_name(&stack.resources["Board"].reference).send().await;
    let body = board.expect("the dashboard exists").dashboard_body().unwrap_or_default().to_owned();
    assert!(body.contains(&format!("{stack_name}-work")), "{body}");
    assert_eq!(status(&stack, "ProductionOnly"), &Status::Skipped("condition IsProduction is false".into()));
    assert!(!stack.resources.contains_key("ProductionOnly"));
    // The alarm watches the DLQ's depth on CloudWatch and notifies the topic, by its ARN
    assert_eq!(status(&stack, "WorkAlarm"), &Status::Created);
    let alarms = aws.cloudwatch().describe_alarms().alarm_names(&stack.resources["WorkAlarm"].reference).send().await;
    let alarm = alarms.expect("describe alarms").metric_alarms().first().cloned().expect("the alarm exists");
    assert_eq!(alarm.metric_name(), Some("ApproximateNumberOfMessagesVisible"));
    assert_eq!(alarm.dimensions()[0].value(), Some(format!("{stack_name}-work-dlq").as_str()));
    assert_eq!(alarm.threshold(), Some(0.0));
    let topic_arn = stack.resources["Alerts"].reference.clone();
    assert_eq!(topic_arn, format!("arn:aws:sns:{}:000000000000:{stack_name}-alerts", aws.var("AWS_REGION")));
    assert_eq!(alarm.alarm_actions(), std::slice::from_ref(&topic_arn));
    assert_eq!(alarm.ok_actions(), std::slice::from_ref(&topic_arn));

    // Topic: what is published reaches its SQS subscriber (raw and filtered, as subscribed); the e-mail
    // subscription is recorded, not made; the topic policy is a stand-in
    assert_eq!(status(&stack, "Alerts"), &Status::Created);
    assert_eq!(status(&stack, "AlertsToInbox"), &Status::Created);
    assert!(matches!(status(&stack, "AlertsByMail"), Status::Local(why) if why.contains("email")), "{report}");
    assert!(matches!(status(&stack, "AlertsPolicy"), Status::Local(_)));
    let subscriptions = aws.sns().list_subscriptions_by_topic().topic_arn(&topic_arn).send().await.expect("list");
    assert_eq!(subscriptions.subscriptions().len(), 1, "{subscriptions:?}");
    let page = aws_sdk_sns::types::MessageAttributeValue::builder()
        .data_type("String")
        .string_value("page")
        .build()
        .expect("attribute");
    let publish = aws.sns().publish().topic_arn(&topic_arn).message("paged").message_attributes("kind", page);
    publish.send().await.expect("publish");
    let inbox = receive_one(&aws.sqs(), &stack.resources["AlertsInbox"].reference).await.expect("delivered");
    assert_eq!(inbox.body(), Some("paged"));
    assert!(matches!(status(&stack, "Worker"), Status::Local(_)));
    assert!(matches!(status(&stack, "WorkerRole"), Status::Local(_)));

    // Table: GSI and stream as declared
    let table = aws.dynamodb().describe_table().table_name(format!("{stack_name}-ledger")).send().await.expect("table");
    let table = table.table().expect("description");
    assert_eq!(table.global_secondary_indexes()[0].index_name(), Some("byGsi1"));
    assert_eq!(
        table.stream_specification().and_then(|s| s.stream_view_type()).map(|v| v.as_str()),
        Some("NEW_AND_OLD_IMAGES")
    );

    // Queue: the redrive policy points at the DLQ with the parameter's maxReceiveCount
    let sqs = aws.sqs();
    let work_url = stack.environment["WORK_QUEUE_URL"].clone();
    let dlq_url = stack.resources["WorkDlq"].reference.clone();
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&work_url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .expect("attributes");
    let attrs = attrs.attributes().expect("attributes");
    let redrive: Value = serde_json::from_str(&attrs[&QueueAttributeName::RedrivePolicy]).expect("json");
    assert_eq!(redrive["deadLetterTargetArn"], json!(stack.resources["WorkDlq"].attributes["Arn"]));
    assert_eq!(redrive["maxReceiveCount"].to_string().trim_matches('"'), "3");
    assert_eq!(attrs[&QueueAttributeName::VisibilityTimeout], "60");

    // Rule: an event matching the pattern reaches the queue; one that does not, does not
    let bus = stack.environment["BUS_NAME"].clone();
    let entry = |detail_type: &str| {
        aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
            .event_bus_name(&bus)
            .source("orders")
            .detail_type(detail_type)
            .detail(json!({ "kind": detail_type }).to_string())
            .build()
    };
    let put = aws
        .eventbridge()
        .put_events()
        .entries(entry("Ignored"))
        .entries(entry("OrderPlaced"))
        .send()
        .await
        .expect("put");
    assert_eq!(put.failed_entry_count(), 0);
    let delivered = receive_one(&sqs, &work_url).await.expect("matching event delivered");
    let body: Value = serde_json::from_str(delivered.body().unwrap_or_default()).expect("event json");
    assert_eq!(body["detail"]["kind"], "OrderPlaced");
    sqs.delete_message()
        .queue_url(&work_url)
        .receipt_handle(delivered.receipt_handle().unwrap_or_default())
        .send()
        .await
        .expect("delete");
    let stray = sqs.receive_message().queue_url(&work_url).wait_time_seconds(1).send().await.expect("receive");
    assert!(stray.messages().is_empty(), "the non-matching event must not be routed: {:?}", stray.messages());

    // Redrive: a message received maxReceiveCount times without being deleted moves to the DLQ
    sqs.send_message().queue_url(&work_url).message_body("poison").send().await.expect("send");
    for _ in 0..3 {
        let got = sqs
            .receive_message()
            .queue_url(&work_url)
            .visibility_timeout(0)
            .wait_time_seconds(2)
            .send()
            .await
            .expect("receive");
        assert_eq!(got.messages().len(), 1, "still on the work queue");
    }
    let _ = sqs.receive_message().queue_url(&work_url).visibility_timeout(0).wait_time_seconds(1).send().await;
    let dead = receive_one(&sqs, &dlq_url).await.expect("moved to the DLQ");
    assert_eq!(dead.body(), Some("poison"));

    // State machine: its definition got the queue URL substituted, and an execution uses it
    let sfn = aws.sfn();
    let machine = stack.resources["Flow"].reference.clone();
    let exec =
        sfn.start_execution().state_machine_arn(&machine).input(r#"{"hello":"flow"}"#).send().await.expect("start");
    let mut execution_status = String::new();
    for _ in 0..40 {
        let d = sfn.describe_execution().execution_arn(exec.execution_arn()).send().await.expect("describe");
        execution_status = d.status().as_str().to_owned();
        if execution_status != "RUNNING" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(execution_status, "SUCCEEDED");
    let sent = receive_one(&sqs, &work_url).await.expect("the state machine sent to the substituted URL");
    assert_eq!(serde_json::from_str::<Value>(sent.body().unwrap_or_default()).expect("json"), json!({"hello": "flow"}));

    // Environment, per-function variables and outputs are resolved
    assert_eq!(stack.functions["Worker"]["OWN_QUEUE_ARN"], stack.resources["WorkQueue"].attributes["Arn"]);
    assert_eq!(stack.functions["Worker"]["WORK_QUEUE_URL"], work_url);
    assert_eq!(stack.outputs["WorkQueueArn"], stack.resources["WorkQueue"].attributes["Arn"]);
    assert_eq!(stack.function_properties["Worker"]["Handler"], "bootstrap");
    let archive =
        aws.eventbridge().describe_archive().archive_name(&stack.resources["BusArchive"].reference).send().await;
    assert_eq!(archive.expect("archive").event_source_arn(), Some(stack.resources["Bus"].attributes["Arn"].as_str()));

    // And provisioning again changes nothing and fails nowhere
    let again = provision(&aws, "tests/fixtures/provisioning.yaml", &stack_name).await;
    assert!(again.failed().is_empty(), "{}", local_env::report(&again));
    assert_eq!(status(&again, "Ledger"), &Status::Exists);
    assert_eq!(status(&again, "Bus"), &Status::Exists);
    assert_eq!(status(&again, "Flow"), &Status::Updated);
    assert_eq!(status(&stack, "OrdersRule"), &Status::Created);
    assert_eq!(status(&again, "OrdersRule"), &Status::Updated);
    assert_eq!(again.resources["WorkQueue"].reference, work_url);
    assert_eq!(status(&again, "Alerts"), &Status::Exists);
    assert_eq!(status(&again, "AlertsToInbox"), &Status::Exists);
    assert_eq!(again.resources["Alerts"].reference, topic_arn);
    aws.remove_alarms_and_queues(&again).await;
}
