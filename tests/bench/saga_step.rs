//! Saga step against the emulator's floor, side by side in one run.
//!
//! The saga: the whole system (the stack `scripts/env.sh up` provisioned, every function its own
//! release binary in the local Lambda service, fed by the local runner from the stream positions
//! `local-env run` keeps); an
//! order placed through the place-order binary runs its happy path, five callback steps.
//!
//! The floor: the saga's own state machine definition with every queue pointed at one floor
//! queue, answered by a bare responder (one long-polling receiver that sends `SendTaskSuccess`
//! and deletes, nothing else). Same emulators, same definition, same input; only the worker
//! differs, so the ratio is what our step (runner, Lambda invoke, handler, event store) adds to
//! what LocalStack's SQS and Step Functions cost on their own.
//!
//! A step's time is Step Functions' own: task state entered to task state exited, from the
//! execution history. Rounds alternate which side runs first.
//!
//!     scripts/env.sh up && cargo bench -p system-tests --bench saga_step [-- --rounds 20]
//!
//! Under `cargo test` (no `--bench` argument) it runs one round on the dev binaries and checks
//! that both sides succeed through the five steps.

use std::collections::BTreeMap;
use std::time::Duration;

use local_env::observe::{history, quantile, task_durations, wait_for_saga};
use serde_json::{Value, json};
use system_tests::saga::SagaEnv;
use system_tests::{unique, workspace_root};
use tokio::task::JoinHandle;

/// The floor definition: the saga's, with every `${...QueueUrl}` substitution set to `queue_url`.
fn floor_definition(queue_url: &str) -> String {
    let mut text = std::fs::read_to_string(workspace_root().join("statemachine/order-saga.asl.json"))
        .expect("statemachine/order-saga.asl.json");
    while let Some(start) = text.find("${") {
        let end = start + text[start..].find('}').expect("a closed substitution");
        assert!(text[start..end].ends_with("QueueUrl"), "unexpected substitution {}", &text[start..=end]);
        text.replace_range(start..=end, queue_url);
    }
    text
}

/// The bare responder: long-polls the floor queue and answers every task at once.
fn respond(sqs: aws_sdk_sqs::Client, sfn: aws_sdk_sfn::Client, queue_url: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let request = sqs.receive_message().queue_url(&queue_url).max_number_of_messages(10).wait_time_seconds(20);
            let received = match request.send().await {
                Ok(received) => received,
                Err(e) => {
                    eprintln!("floor responder: ReceiveMessage: {}", aws_sdk_sqs::error::DisplayErrorContext(&e));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            for message in received.messages() {
                let body: Value = serde_json::from_str(message.body().unwrap_or_default()).unwrap_or_default();
                let Some(token) = body["taskToken"].as_str() else {
                    eprintln!("floor responder: no task token in {:?}", message.body());
                    continue;
                };
                let output = json!({ "step": body["step"] }).to_string();
                if let Err(e) = sfn.send_task_success().task_token(token).output(output).send().await {
                    eprintln!("floor responder: SendTaskSuccess: {}", aws_sdk_sfn::error::DisplayErrorContext(&e));
                }
                let handle = message.receipt_handle().unwrap_or_default();
                if let Err(e) = sqs.delete_message().queue_url(&queue_url).receipt_handle(handle).send().await {
                    eprintln!("floor responder: DeleteMessage: {}", aws_sdk_sqs::error::DisplayErrorContext(&e));
                }
            }
        }
    })
}

#[derive(Default)]
struct Side {
    /// Step name -> its times, seconds.
    steps: BTreeMap<String, Vec<f64>>,
    all: Vec<f64>,
    executions: Vec<f64>,
}

impl Side {
    fn add(&mut self, durations: &[(String, f64)], execution: f64) {
        for (name, seconds) in durations {
            self.steps.entry(name.clone()).or_default().push(*seconds);
            self.all.push(*seconds);
        }
        self.executions.push(execution);
    }
}

fn ms(seconds: f64) -> f64 {
    seconds * 1000.0
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|a| a == "--bench");
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 20 } else { 1 });

    // Given the system running, and the floor beside it on the same emulators: benching, on the
    // provisioned stack (fresh DynamoDB Local tables are slower) with release binaries; as a
    // smoke test, on a stack of its own.
    let env = if benching {
        system_tests::use_release_binaries();
        SagaEnv::start_provisioned().await
    } else {
        SagaEnv::start().await
    };
    let sqs = env.aws.sqs();
    let floor_queue = sqs
        .create_queue()
        .queue_name(unique("saga-floor"))
        .send()
        .await
        .expect("floor queue")
        .queue_url
        .expect("floor queue url");
    let floor_arn = env
        .sfn
        .create_state_machine()
        .name(unique("saga-floor"))
        .definition(floor_definition(&floor_queue))
        .role_arn("arn:aws:iam::000000000000:role/saga-floor")
        .send()
        .await
        .expect("floor state machine")
        .state_machine_arn;
    let responder = respond(sqs.clone(), env.sfn.clone(), floor_queue.clone());

    let (mut saga, mut floor) = (Side::default(), Side::default());
    let started = std::time::Instant::now();
    for round in 0..rounds {
        // Each order its own customer: the per-customer rate limit is not what is measured.
        let mut order = env.sample("happy-path");
        order["customerId"] = json!(unique("cust-"));
        for side in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            // When one order runs through the saga, or the same input through the floor.
            let finished = if side == 0 {
                let id = env.place(order.clone()).await;
                env.finished(&id).await
            } else {
                let name = unique("floor");
                let input = json!({
                    "order": order, "correlationId": name, "traceHeader": null, "results": {}, "compensations": {},
                });
                env.sfn
                    .start_execution()
                    .state_machine_arn(&floor_arn)
                    .name(&name)
                    .input(input.to_string())
                    .send()
                    .await
                    .expect("floor StartExecution");
                wait_for_saga(&env.sfn, &floor_arn, &name, Duration::from_secs(90)).await.expect("floor ends")
            };
            // Then it succeeds through the five happy-path steps, and its steps are timed.
            assert_eq!(
                finished.status, "SUCCEEDED",
                "{} {:?} {:?}",
                finished.execution_arn, finished.error, finished.cause
            );
            let durations = task_durations(&history(&env.sfn, &finished.execution_arn).await.expect("history"));
            let names: Vec<&str> = durations.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names,
                ["ReserveInventory", "ChargePayment", "CreateShipment", "SendNotification", "CompleteOrder"],
                "{}",
                finished.execution_arn
            );
            let side = if side == 0 { &mut saga } else { &mut floor };
            side.add(&durations, finished.stopped_at - finished.started_at);
        }
    }
    responder.abort();
    let elapsed = started.elapsed();

    println!("\nSaga step vs floor: {rounds} rounds, each one happy-path saga and one floor execution ({elapsed:.0?})");
    println!(
        "{:<18} {:>10} {:>10} {:>7} {:>10} {:>10}",
        "step (ms)", "saga p50", "floor p50", "ratio", "saga p90", "floor p90"
    );
    let row = |name: &str, ours: &[f64], theirs: &[f64]| {
        let (o50, t50) = (quantile(ours, 0.5), quantile(theirs, 0.5));
        println!(
            "{name:<18} {:>10.0} {:>10.0} {:>7.2} {:>10.0} {:>10.0}",
            ms(o50),
            ms(t50),
            o50 / t50,
            ms(quantile(ours, 0.9)),
            ms(quantile(theirs, 0.9))
        );
    };
    for (name, ours) in &saga.steps {
        row(name, ours, floor.steps.get(name).map_or(&[][..], Vec::as_slice));
    }
    row("every step", &saga.all, &floor.all);
    row("execution", &saga.executions, &floor.executions);
    println!("target: every step's p50 ratio at or under 1.20");

    env.stop().await;
}
