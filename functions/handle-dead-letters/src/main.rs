use std::time::Duration;

use aws_lambda_events::event::sqs::SqsEvent;
use handle_dead_letters::{DeadLetterHandler, SnsNotifier, SqsQueues, StreamReplayer};
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use shared::adapters::dynamodb::{DynamoEventStore, EventStoreConfig};
use shared::aggregate::Repository;
use shared::config::{process_env, required};
use shared::deadline::Deadline;
use shared::retry::RetryPolicy;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let sdk = shared::adapters::aws::sdk_config().await;
    let number =
        |name: &str, default: u64| required(&process_env, name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let handler = DeadLetterHandler {
        repo: Repository::new(DynamoEventStore::new(
            aws_sdk_dynamodb::Client::new(&sdk),
            EventStoreConfig::from_env()?,
        )),
        queues: SqsQueues::new(aws_sdk_sqs::Client::new(&sdk)),
        notifier: SnsNotifier {
            client: aws_sdk_sns::Client::new(&sdk),
            topic_arn: required(&process_env, "NOTIFICATION_TOPIC_ARN")?,
        },
        tasks: aws_sdk_sfn::Client::new(&sdk),
        replayer: StreamReplayer {
            streams: aws_sdk_dynamodbstreams::Client::new(&sdk),
            lambda: aws_sdk_lambda::Client::new(&sdk),
            region: sdk.region().map(ToString::to_string).unwrap_or_default(),
        },
        policy: RetryPolicy {
            max_attempts: number("AUTOMATIC_REDRIVES", 3) as u32,
            base_delay: Duration::from_secs(number("REDRIVE_BASE_DELAY_SECONDS", 30)),
            max_delay: Duration::from_secs(900),
        },
    };
    let handler = &handler;
    run(service_fn(|event: LambdaEvent<SqsEvent>| async move {
        let deadline = Deadline::from_epoch_millis(event.context.deadline);
        Ok::<_, Error>(handler.handle(event.payload, deadline).await)
    }))
    .await
}
