//! Watching sagas from outside: an order's execution (named by the order id), its outcome and
//! the steps it ran, read from Step Functions' own history.

use std::time::{Duration, Instant};

use anyhow::Context;
use aws_sdk_sfn::types::{ExecutionStatus, HistoryEventType};

#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub execution_arn: String,
    pub status: String,
    pub error: Option<String>,
    pub cause: Option<String>,
    /// Seconds since the epoch, with milliseconds.
    pub started_at: f64,
    pub stopped_at: f64,
}

/// The execution ARN for an order: executions are named by order id.
pub fn execution_arn(state_machine_arn: &str, order_id: &str) -> String {
    format!("{}:{order_id}", state_machine_arn.replacen(":stateMachine:", ":execution:", 1))
}

fn seconds(t: &aws_sdk_sfn::primitives::DateTime) -> f64 {
    t.secs() as f64 + f64::from(t.subsec_nanos()) / 1e9
}

/// Waits until the order's saga has started and ended, or `timeout` passes.
pub async fn wait_for_saga(
    sfn: &aws_sdk_sfn::Client,
    state_machine_arn: &str,
    order_id: &str,
    timeout: Duration,
) -> anyhow::Result<Finished> {
    let arn = execution_arn(state_machine_arn, order_id);
    let deadline = Instant::now() + timeout;
    loop {
        match sfn.describe_execution().execution_arn(&arn).send().await {
            Ok(d) if *d.status() != ExecutionStatus::Running => {
                return Ok(Finished {
                    execution_arn: arn,
                    status: d.status().as_str().to_owned(),
                    error: d.error().map(str::to_owned),
                    cause: d.cause().map(str::to_owned),
                    started_at: seconds(d.start_date()),
                    stopped_at: d.stop_date().map_or(0.0, seconds),
                });
            }
            Ok(_) => {}
            // Not started yet: the saga starter has not read the event from the stream.
            Err(e) if e.as_service_error().is_some_and(|e| e.is_execution_does_not_exist()) => {}
            Err(e) => return Err(anyhow::anyhow!(aws_sdk_sfn::error::DisplayErrorContext(&e).to_string())),
        }
        if Instant::now() >= deadline {
            anyhow::bail!("the saga for {order_id} did not finish within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An execution's history, every page.
pub async fn history(
    sfn: &aws_sdk_sfn::Client,
    execution_arn: &str,
) -> anyhow::Result<Vec<aws_sdk_sfn::types::HistoryEvent>> {
    let mut events = Vec::new();
    let mut token = None;
    loop {
        let page = sfn
            .get_execution_history()
            .execution_arn(execution_arn)
            .set_next_token(token)
            .max_results(1000)
            .send()
            .await
            .context("GetExecutionHistory")?;
        events.extend(page.events);
        token = page.next_token;
        if token.is_none() {
            return Ok(events);
        }
    }
}

/// The task states the saga entered, in order (steps and compensations).
pub fn saga_steps(history: &[aws_sdk_sfn::types::HistoryEvent]) -> Vec<String> {
    history
        .iter()
        .filter(|e| *e.r#type() == HistoryEventType::TaskStateEntered)
        .filter_map(|e| e.state_entered_event_details().map(|d| d.name().to_owned()))
        .collect()
}

/// Each task state's time, entered to exited, in seconds, in the order the states ran: what a
/// step costs, from the command sent to its answer applied, in Step Functions' own clock.
pub fn task_durations(history: &[aws_sdk_sfn::types::HistoryEvent]) -> Vec<(String, f64)> {
    let mut entered: Option<(String, f64)> = None;
    let mut steps = Vec::new();
    for e in history {
        match e.r#type() {
            HistoryEventType::TaskStateEntered => {
                entered = e.state_entered_event_details().map(|d| (d.name().to_owned(), seconds(e.timestamp())));
            }
            HistoryEventType::TaskStateExited => {
                if let (Some((name, at)), Some(d)) = (entered.take(), e.state_exited_event_details())
                    && d.name() == name
                {
                    steps.push((name, seconds(e.timestamp()) - at));
                }
            }
            _ => {}
        }
    }
    steps
}

/// The state transitions Step Functions bills a Standard execution for: one per state entered.
pub fn transitions(history: &[aws_sdk_sfn::types::HistoryEvent]) -> u64 {
    history.iter().filter(|e| e.r#type().as_str().ends_with("StateEntered")).count() as u64
}

/// The value at quantile `q` (0..=1) of `values`, nearest-rank.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execution_arns_are_named_by_order() {
        assert_eq!(
            execution_arn("arn:aws:states:us-east-1:000000000000:stateMachine:s-order-saga", "ord-1"),
            "arn:aws:states:us-east-1:000000000000:execution:s-order-saga:ord-1"
        );
    }

    #[test]
    fn task_durations_pair_each_task_state_with_its_exit() {
        use aws_sdk_sfn::primitives::DateTime;
        use aws_sdk_sfn::types::{HistoryEvent, StateEnteredEventDetails, StateExitedEventDetails};
        let at = |ms: i64| DateTime::from_millis(ms);
        let entered = |name: &str, ms| {
            HistoryEvent::builder()
                .r#type(HistoryEventType::TaskStateEntered)
                .timestamp(at(ms))
                .id(ms)
                .state_entered_event_details(StateEnteredEventDetails::builder().name(name).build().unwrap())
                .build()
                .unwrap()
        };
        let exited = |name: &str, ms| {
            HistoryEvent::builder()
                .r#type(HistoryEventType::TaskStateExited)
                .timestamp(at(ms))
                .id(ms)
                .state_exited_event_details(StateExitedEventDetails::builder().name(name).build().unwrap())
                .build()
                .unwrap()
        };
        let scheduled =
            HistoryEvent::builder().r#type(HistoryEventType::TaskScheduled).timestamp(at(1_100)).id(1).build().unwrap();
        let history = [
            entered("Reserve", 1_000),
            scheduled,
            exited("Reserve", 1_450),
            entered("Charge", 1_460),
            exited("Charge", 2_060),
        ];

        let steps = task_durations(&history);

        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].0, "Reserve");
        assert!((steps[0].1 - 0.45).abs() < 1e-9, "{steps:?}");
        assert_eq!(steps[1].0, "Charge");
        assert!((steps[1].1 - 0.6).abs() < 1e-9, "{steps:?}");
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
    }
}
