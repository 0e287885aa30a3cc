//! Step Functions as the saga steps' [`TaskCallback`]: `SendTaskSuccess` / `SendTaskFailure`
//! for a task token.

use serde_json::Value;

use crate::lambda::steps::{CallbackError, Delivery, TaskCallback};

/// A callback error saying the task has ended: AWS answers `TaskTimedOut` or
/// `TaskDoesNotExist`, LocalStack `InvalidToken`. Matched on the SDK's typed variants.
trait TaskClosed {
    fn task_closed(&self) -> bool;
}

impl TaskClosed for aws_sdk_sfn::operation::send_task_success::SendTaskSuccessError {
    fn task_closed(&self) -> bool {
        self.is_task_timed_out() || self.is_task_does_not_exist() || self.is_invalid_token()
    }
}

impl TaskClosed for aws_sdk_sfn::operation::send_task_failure::SendTaskFailureError {
    fn task_closed(&self) -> bool {
        self.is_task_timed_out() || self.is_task_does_not_exist() || self.is_invalid_token()
    }
}

/// A redelivered command finds its task ended, and that is fine: nothing to answer.
fn closed_or<E: TaskClosed + std::error::Error + 'static, R: std::fmt::Debug>(
    result: Result<(), aws_sdk_sfn::error::SdkError<E, R>>,
) -> Result<Delivery, CallbackError> {
    match result {
        Ok(()) => Ok(Delivery::Delivered),
        Err(e) if e.as_service_error().is_some_and(TaskClosed::task_closed) => Ok(Delivery::AlreadyClosed),
        Err(e) => Err(CallbackError(aws_sdk_sfn::error::DisplayErrorContext(&e).to_string())),
    }
}

impl TaskCallback for aws_sdk_sfn::Client {
    async fn succeed(&self, token: &str, output: &Value) -> Result<Delivery, CallbackError> {
        closed_or(self.send_task_success().task_token(token).output(output.to_string()).send().await.map(|_| ()))
    }

    async fn fail(&self, token: &str, error: &str, cause: &str) -> Result<Delivery, CallbackError> {
        // Step Functions limits the cause to 32,768 characters.
        let cause: String = cause.chars().take(32_000).collect();
        closed_or(self.send_task_failure().task_token(token).error(error).cause(cause).send().await.map(|_| ()))
    }
}
