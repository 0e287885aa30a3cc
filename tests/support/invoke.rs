//! What a test puts between the event source mappings and the Lambda service: the functions
//! stay the real binaries; only the delivery around them is changed.

use std::future::Future;
use std::sync::Arc;

use local_env::runner::{BoxFuture, Invoke};
use serde_json::Value;

/// Every function but one: that one's events are not delivered at all.
pub struct Except {
    pub inner: Arc<dyn Invoke>,
    pub function: &'static str,
}

impl Invoke for Except {
    fn serves(&self, function: &str) -> bool {
        function != self.function && self.inner.serves(function)
    }

    fn invoke(&self, function: &str, payload: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        self.inner.invoke(function, payload)
    }
}

/// Every event delivered twice, as at-least-once delivery may: the batch item failures of both
/// deliveries are reported.
pub struct Twice(pub Arc<dyn Invoke>);

impl Invoke for Twice {
    fn serves(&self, function: &str) -> bool {
        self.0.serves(function)
    }

    fn invoke(&self, function: &str, payload: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        let (first, second) = (self.0.invoke(function, payload.clone()), self.0.invoke(function, payload));
        Box::pin(async move {
            let first = first.await?;
            let second = second.await?;
            let parse = |bytes: &[u8]| serde_json::from_slice::<Value>(bytes).unwrap_or(Value::Null);
            let (mut merged, second) = (parse(&first), parse(&second));
            let failures = |v: &Value| v["batchItemFailures"].as_array().cloned().unwrap_or_default();
            let mut all = failures(&merged);
            all.extend(failures(&second));
            if merged.is_object() {
                merged["batchItemFailures"] = Value::Array(all);
            }
            serde_json::to_vec(&merged).map_err(|e| e.to_string())
        })
    }
}

/// One function run in this process by `handle` (its payload JSON in, its response out), every
/// other one through the Lambda service: for a test that swaps a dependency of that function
/// for a faulty one.
pub struct Replace<F> {
    pub inner: Arc<dyn Invoke>,
    pub function: &'static str,
    pub handle: F,
}

impl<F, Fut> Invoke for Replace<F>
where
    F: Fn(Value) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Value, String>> + Send + 'static,
{
    fn serves(&self, function: &str) -> bool {
        function == self.function || self.inner.serves(function)
    }

    fn invoke(&self, function: &str, payload: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        if function != self.function {
            return self.inner.invoke(function, payload);
        }
        let event = serde_json::from_slice::<Value>(&payload);
        let handled = event.map(|e| (self.handle)(e));
        Box::pin(async move {
            let response = handled.map_err(|e| e.to_string())?.await?;
            serde_json::to_vec(&response).map_err(|e| e.to_string())
        })
    }
}
