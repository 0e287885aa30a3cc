//! What the SQS pollers and the stream readers share: the stop signal, backoff, logging of SDK
//! errors and of tasks that ended abnormally, and invoking a function with Lambda's event.

use std::future::Future;
use std::time::Duration;

use shared::retry::RetryPolicy;
use tokio::sync::watch;
use tokio::task::JoinError;
use tracing::{debug, error, warn};

use super::Invoke;

/// The stop signal, as each task sees it.
#[derive(Clone)]
pub(super) struct Stop(pub(super) watch::Receiver<bool>);

impl Stop {
    pub(super) fn is_set(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Returns once stopped (or once the handle is gone).
    async fn wait(&mut self) {
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }

    /// Runs `f` unless stopped first: `None` means stopped.
    pub(super) async fn run<F: Future>(&mut self, f: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            _ = self.wait() => None,
            out = f => Some(out),
        }
    }

    /// Sleeps; `true` if stopped meanwhile.
    pub(super) async fn sleep(&mut self, pause: Duration) -> bool {
        self.run(tokio::time::sleep(pause)).await.is_none()
    }
}

/// How a poller backs off from a failing source: 100 ms, 200 ms, 400 ms… capped at 2 s.
const POLLER_BACKOFF: RetryPolicy =
    RetryPolicy { max_attempts: u32::MAX, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(2) };

/// The pause before retry `attempt` (from 1): half of [`POLLER_BACKOFF`]'s ceiling plus a
/// fully jittered half, so a poller of a source that keeps failing never spins.
pub(super) fn backoff(attempt: u32) -> Duration {
    POLLER_BACKOFF.ceiling(attempt.saturating_sub(1)) / 2 + POLLER_BACKOFF.delay(attempt.saturating_sub(1)) / 2
}

/// SDK errors are logged as warnings at first, then only now and then while they persist.
pub(super) fn sdk_error(mapping: &str, what: &str, attempt: u32, error: &str) {
    if attempt <= 1 || attempt.is_multiple_of(30) {
        warn!(mapping, attempt, error, "{what} failed; retrying with backoff");
    } else {
        debug!(mapping, attempt, error, "{what} failed; retrying with backoff");
    }
}

/// Logs a task (`what`: "an SQS poller", "a shard reader"…) that panicked or was cancelled.
pub(super) fn ended(mapping: &str, what: &str, result: Result<(), JoinError>) {
    if let Err(e) = result {
        error!(mapping, error = %e, "{what} ended abnormally");
    }
}

/// An SDK error, with its causes.
pub(super) fn error_text<E: std::error::Error>(error: E) -> String {
    aws_sdk_sqs::error::DisplayErrorContext(error).to_string()
}

/// The URL of the queue `name` of `account`.
pub(super) async fn queue_url(client: &aws_sdk_sqs::Client, name: &str, account: &str) -> Result<String, String> {
    let found = client.get_queue_url().queue_name(name).queue_owner_aws_account_id(account).send().await;
    found.map_err(error_text)?.queue_url.ok_or_else(|| "no QueueUrl in the response".to_owned())
}

/// Invokes `function` with Lambda's event and reads Lambda's response: an empty or `null`
/// response is a success with nothing reported; a function error or a response that is not the
/// expected JSON fails the batch.
pub(super) async fn invoke<R: serde::de::DeserializeOwned + Default>(
    functions: &dyn Invoke,
    function: &str,
    event: &impl serde::Serialize,
) -> Result<R, String> {
    let payload = serde_json::to_vec(event).map_err(|e| format!("the event does not serialize: {e}"))?;
    let response = functions.invoke(function, payload).await?;
    let text = std::str::from_utf8(&response).map_err(|_| "the response is not UTF-8".to_owned())?.trim();
    if text.is_empty() || text == "null" {
        return Ok(R::default());
    }
    serde_json::from_str(text).map_err(|e| format!("the response is not a batch response ({e}): {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= Duration::from_secs(2), "{attempt}: {d:?}");
        }
        assert!(backoff(1) <= Duration::from_millis(100));
        assert!(backoff(10) >= Duration::from_secs(1));
    }
}
