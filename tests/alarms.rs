//! The alarms reach someone: `template.yaml` provisioned with its alarm topic's subscription
//! pointed at an SQS queue, and one of its alarms driven into ALARM by a real metric.
//!
//! What LocalStack 4.9.2 does (its source, not guessed): SQS publishes every queue's
//! `ApproximateNumberOfMessagesVisible` to CloudWatch every 60 s
//! (`SQS_CLOUDWATCH_METRICS_REPORT_INTERVAL`, services/sqs/provider.py, `CloudwatchPublishWorker`),
//! but not `ApproximateAgeOfOldestMessage`; nothing publishes Lambda or API Gateway metrics here.
//! CloudWatch evaluates a metric alarm when it is put and then every `Period` x
//! `EvaluationPeriods` seconds (services/cloudwatch/alarm_scheduler.py, `schedule_metric_alarm`),
//! and publishes each change of state to the SNS topics of its `AlarmActions` / `OKActions`
//! (services/cloudwatch/provider_v2.py, `set_alarm_state`). So a DLQ depth alarm (60 s x 1) is
//! the one the emulators can drive for real: it fires within about two minutes of a message
//! landing in its DLQ.

use std::time::{Duration, Instant};

use aws_sdk_sqs::types::QueueAttributeName;
use local_env::{Options, Stack, Status, Template};
use serde_json::Value;
use system_tests::{LocalAws, unique, workspace_root};

/// An SNS notification as SQS receives it (not raw): the alarm's own JSON is in `Message`.
struct Notification {
    topic_arn: String,
    alarm: Value,
}

async fn provision_subscribed(aws: &LocalAws, stack_name: &str, inbox_arn: &str) -> Stack {
    let template = Template::load(&workspace_root().join("template.yaml")).expect("template loads");
    let options = Options {
        stack_name: stack_name.to_owned(),
        region: aws.var("AWS_REGION"),
        account_id: "000000000000".into(),
        parameter_overrides: [
            ("AlarmSubscriptionEndpoint".to_owned(), inbox_arn.to_owned()),
            ("AlarmSubscriptionProtocol".to_owned(), "sqs".to_owned()),
        ]
        .into(),
    };
    local_env::provision(&template, &options, &aws.provisioning_clients()).await.expect("provisions")
}

/// Receives notifications until `done` says so or the deadline passes; returns all received.
async fn receive_until(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    deadline: Instant,
    done: impl Fn(&[Notification]) -> bool,
) -> Vec<Notification> {
    let mut received = Vec::new();
    while !done(&received) && Instant::now() < deadline {
        let wait = deadline.saturating_duration_since(Instant::now()).as_secs().clamp(1, 20) as i32;
        let got = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(wait)
            // Received once: nothing is deleted, the queue goes at the end.
            .visibility_timeout(600)
            .send()
            .await
            .expect("receive");
        for message in got.messages() {
            let envelope: Value = serde_json::from_str(message.body().unwrap_or_default()).expect("SNS envelope");
            let alarm = serde_json::from_str(envelope["Message"].as_str().unwrap_or_default()).expect("alarm JSON");
            received
                .push(Notification { topic_arn: envelope["TopicArn"].as_str().unwrap_or_default().to_owned(), alarm });
        }
    }
    received
}

fn reported(notifications: &[Notification], alarm: &str, state: &str) -> bool {
    notifications.iter().any(|n| n.alarm["AlarmName"] == alarm && n.alarm["NewStateValue"] == state)
}

#[tokio::test]
async fn a_message_in_a_dead_letter_queue_pages_through_the_alarm_topic() {
    let started = Instant::now();
    // Given the template provisioned under a fresh name, its alarm topic subscribed by a queue
    let aws = LocalAws::load().await;
    let sqs = aws.sqs();
    let stack_name = unique("a");
    let inbox = sqs.create_queue().queue_name(format!("{stack_name}-pager")).send().await.expect("inbox");
    let inbox_url = inbox.queue_url().expect("inbox URL").to_owned();
    let inbox_arn = sqs
        .get_queue_attributes()
        .queue_url(&inbox_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("inbox attributes")
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("inbox ARN");
    let stack = provision_subscribed(&aws, &stack_name, &inbox_arn).await;
    assert!(stack.failed().is_empty(), "{}", local_env::report(&stack));
    let outcome = |id: &str| stack.outcomes.iter().find(|o| o.logical_id == id).map(|o| o.status.clone());
    assert_eq!(outcome("AlarmSubscription"), Some(Status::Created));
    let topic_arn = stack.resources["AlarmTopic"].reference.clone();
    // (An alarm that ignores missing data keeps its first state, INSUFFICIENT_DATA, until its
    // metric has a datum: the unresolved dead letters' levels, reported on change.)
    let template = Template::load(&workspace_root().join("template.yaml")).expect("template loads");
    let ignores_missing_data =
        |id: &str| template.resources.get(id).is_some_and(|r| r.properties["TreatMissingData"] == "ignore");
    let alarms: Vec<String> = stack
        .outcomes
        .iter()
        .filter(|o| o.kind == "AWS::CloudWatch::Alarm" && !ignores_missing_data(&o.logical_id))
        .filter_map(|o| o.physical_id.clone())
        .collect();
    let depth_alarm = stack.resources["SagaStarterDlqDepthAlarm"].reference.clone();

    // Then every alarm's first evaluation (no data yet: OK) reaches the inbox through the topic
    let first = receive_until(&sqs, &inbox_url, Instant::now() + Duration::from_secs(30), |got| {
        alarms.iter().all(|a| reported(got, a, "OK"))
    })
    .await;
    let silent: Vec<&String> = alarms.iter().filter(|a| !reported(&first, a, "OK")).collect();
    assert!(silent.is_empty(), "alarms whose OK did not reach the topic's subscriber: {silent:?}");
    assert!(first.iter().all(|n| n.topic_arn == topic_arn));

    // When a message waits in the saga starter's DLQ (as a record that kept failing would)
    let dlq_url = stack.resources["SagaStarterDlq"].reference.clone();
    sqs.send_message().queue_url(&dlq_url).message_body("a failed record").send().await.expect("send");

    // Then, once SQS has published the depth and CloudWatch evaluated it, the inbox is paged:
    // the DLQ's alarm, now in ALARM, for the DLQ's queue
    let paged = receive_until(&sqs, &inbox_url, Instant::now() + Duration::from_secs(150), |got| {
        reported(got, &depth_alarm, "ALARM")
    })
    .await;
    let page = paged
        .iter()
        .find(|n| n.alarm["AlarmName"] == depth_alarm.as_str() && n.alarm["NewStateValue"] == "ALARM")
        .unwrap_or_else(|| panic!("no ALARM of {depth_alarm} within 150 s (got {})", paged.len()));
    assert_eq!(page.topic_arn, topic_arn);
    assert_eq!(page.alarm["OldStateValue"], "OK");
    assert_eq!(page.alarm["Trigger"]["MetricName"], "ApproximateNumberOfMessagesVisible");
    let dlq_name = stack.resources["SagaStarterDlq"].attributes["QueueName"].as_str();
    assert_eq!(page.alarm["Trigger"]["Dimensions"][0]["value"], dlq_name);
    // And it was a real evaluation of the metric, not a state set by hand: the datapoint is there
    let described = aws.cloudwatch().describe_alarms().alarm_names(&depth_alarm).send().await.expect("describe");
    let alarm = described.metric_alarms().first().expect("the alarm");
    let reason: Value = serde_json::from_str(alarm.state_reason_data().unwrap_or("{}")).expect("reason data");
    assert!(
        reason["recentDatapoints"].as_array().is_some_and(|d| d.iter().any(|v| v.as_f64() >= Some(1.0))),
        "{reason}"
    );
    // No other alarm fired: only the DLQ holds anything
    let others: Vec<_> = paged
        .iter()
        .filter(|n| n.alarm["NewStateValue"] == "ALARM" && n.alarm["AlarmName"] != depth_alarm.as_str())
        .map(|n| n.alarm["AlarmName"].clone())
        .collect();
    assert!(others.is_empty(), "{others:?}");

    aws.remove_alarms_and_queues(&stack).await;
    sqs.delete_queue().queue_url(&inbox_url).send().await.expect("delete the inbox");
    eprintln!("alarm test took {:?}", started.elapsed());
}
