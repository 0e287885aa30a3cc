//! The external services over HTTP, as in production: the payment gateway, the carrier and the
//! notifier are HTTP APIs (locally, the provider simulator), called with the step's idempotency
//! key as the `Idempotency-Key` header, as payment APIs take it, so a retried call has one
//! effect. Base URLs come from the environment; the API key is a SecureString in SSM Parameter
//! Store (its name in `PROVIDER_API_KEY_PARAMETER`), read once per instance at init, never an
//! environment variable. Nothing here knows it may be talking to a simulator.
//!
//! What an answer means, once: `2xx` is done; `402` / `422` are the provider's business answers
//! (declined, rejected, undeliverable), final for that key; anything else (`5xx`, `429`, a
//! timeout, no connection) is [`Unavailable`]: the call may succeed later.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::config::{ConfigError, Vars, process_env, required};
use crate::domain::money::Money;
use crate::domain::order::Address;
use crate::domain::services::{
    Carrier, ChargeOutcome, Notifier, NotifyOutcome, PaymentGateway, ShipmentOutcome, Unavailable,
};

/// How long one call may take unless `PROVIDER_TIMEOUT_MS` says otherwise: well inside the
/// functions' 10 s, so a hung provider costs a retry, not the invocation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// One provider's HTTP API: its base URL, the client (one per instance: connections are kept
/// between invocations) and the credentials.
#[derive(Debug, Clone)]
pub struct Provider {
    service: &'static str,
    base_url: String,
    api_key: Option<String>,
    client: reqwest::Client,
}

/// An answer that is not a success but means something to the caller.
enum Answer<T> {
    Done(T),
    /// A business answer (`402`, `422`): its `reason`.
    Refused(String),
}

/// The providers' API key: the SecureString parameter named by `PROVIDER_API_KEY_PARAMETER`
/// (none when that is unset: a provider without credentials, as the simulator can run).
/// Read in the init phase, so once per instance; a key that cannot be read fails the init with
/// the reason, and Lambda tries again on the next invocation.
pub async fn api_key(sdk: &aws_config::SdkConfig, vars: Vars<'_>) -> Result<Option<String>, ConfigError> {
    let Some(name) = vars("PROVIDER_API_KEY_PARAMETER") else { return Ok(None) };
    let invalid = |reason: String| ConfigError::Invalid { name: "PROVIDER_API_KEY_PARAMETER", reason };
    let answer = aws_sdk_ssm::Client::new(sdk)
        .get_parameter()
        .name(&name)
        .with_decryption(true)
        .send()
        .await
        .map_err(|e| invalid(format!("{name}: {}", aws_sdk_ssm::error::DisplayErrorContext(&e))))?;
    let value = answer.parameter.and_then(|p| p.value).filter(|v| !v.trim().is_empty());
    value.map(Some).ok_or_else(|| invalid(format!("{name} has no value")))
}

impl Provider {
    /// `url_variable` (the base URL) and `PROVIDER_TIMEOUT_MS`; `api_key` from [`api_key`].
    pub fn from_vars(
        service: &'static str,
        url_variable: &str,
        api_key: Option<String>,
        vars: Vars<'_>,
    ) -> Result<Self, ConfigError> {
        let base_url = required(vars, url_variable)?.trim_end_matches('/').to_owned();
        let timeout = match vars("PROVIDER_TIMEOUT_MS") {
            None => DEFAULT_TIMEOUT,
            Some(ms) => Duration::from_millis(ms.parse().map_err(|_| ConfigError::Invalid {
                name: "PROVIDER_TIMEOUT_MS",
                reason: "expected whole milliseconds".into(),
            })?),
        };
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(1)))
            .build()
            .map_err(|e| ConfigError::Invalid { name: "PROVIDER_TIMEOUT_MS", reason: e.to_string() })?;
        Ok(Self { service, base_url, api_key, client })
    }

    fn unavailable(&self, message: impl Into<String>) -> Unavailable {
        Unavailable { service: self.service, message: message.into() }
    }

    /// One call, timed into `ProviderLatency` under `operation`.
    async fn post<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        path: &str,
        key: &str,
        body: &Value,
    ) -> Result<Answer<T>, Unavailable> {
        let started = std::time::Instant::now();
        let answer = self.call(path, key, body).await;
        crate::metrics::provider_latency(operation, started.elapsed());
        if let Err(e) = &answer {
            tracing::warn!(provider = self.service, operation, error = %e.message, "provider call failed");
        }
        answer
    }

    async fn call<T: DeserializeOwned>(&self, path: &str, key: &str, body: &Value) -> Result<Answer<T>, Unavailable> {
        let mut request =
            self.client.post(format!("{}{path}", self.base_url)).header("Idempotency-Key", key).json(body);
        if let Some(api_key) = &self.api_key {
            request = request.bearer_auth(api_key);
        }
        let response = request.send().await.map_err(|e| {
            let what = if e.is_timeout() { "timed out" } else { "unreachable" };
            self.unavailable(format!("POST {path} {what}: {e}"))
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|e| self.unavailable(format!("POST {path}: body lost: {e}")))?;
        match status.as_u16() {
            200..=299 => serde_json::from_str(&text)
                .map(Answer::Done)
                .map_err(|e| self.unavailable(format!("POST {path}: unexpected answer ({e}): {text}"))),
            402 | 422 => {
                let reason = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["reason"].as_str().map(str::to_owned))
                    .unwrap_or(text);
                Ok(Answer::Refused(reason))
            }
            code => Err(self.unavailable(format!("POST {path} answered {code}: {text}"))),
        }
    }
}

/// The payment gateway at `PAYMENT_PROVIDER_URL`.
#[derive(Debug, Clone)]
pub struct HttpPaymentGateway(pub Provider);

impl HttpPaymentGateway {
    /// In Lambda: `PAYMENT_PROVIDER_URL`, and the API key from SSM.
    pub async fn from_env(sdk: &aws_config::SdkConfig) -> Result<Self, ConfigError> {
        let key = api_key(sdk, &process_env).await?;
        Provider::from_vars("payment gateway", "PAYMENT_PROVIDER_URL", key, &process_env).map(Self)
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Charged {
    payment_id: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Refunded {
    refund_id: String,
}

impl PaymentGateway for HttpPaymentGateway {
    async fn charge(&self, key: &str, amount: Money, payment_token: &str) -> Result<ChargeOutcome, Unavailable> {
        let body = json!({ "amount": amount, "paymentToken": payment_token });
        Ok(match self.0.post::<Charged>("charge", "/v1/charges", key, &body).await? {
            Answer::Done(charged) => ChargeOutcome::Charged { payment_id: charged.payment_id },
            Answer::Refused(reason) => ChargeOutcome::Declined { reason },
        })
    }

    async fn refund(&self, key: &str, payment_id: &str, amount: Money) -> Result<String, Unavailable> {
        let body = json!({ "paymentId": payment_id, "amount": amount });
        match self.0.post::<Refunded>("refund", "/v1/refunds", key, &body).await? {
            Answer::Done(refunded) => Ok(refunded.refund_id),
            // A refund has no business "no": a refusal is the gateway failing to do it.
            Answer::Refused(reason) => Err(self.0.unavailable(format!("refund of {payment_id} refused: {reason}"))),
        }
    }
}

/// The carrier at `CARRIER_URL`.
#[derive(Debug, Clone)]
pub struct HttpCarrier(pub Provider);

impl HttpCarrier {
    /// In Lambda: `CARRIER_URL`, and the API key from SSM.
    pub async fn from_env(sdk: &aws_config::SdkConfig) -> Result<Self, ConfigError> {
        let key = api_key(sdk, &process_env).await?;
        Provider::from_vars("carrier", "CARRIER_URL", key, &process_env).map(Self)
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Shipped {
    shipment_id: String,
    carrier: String,
}

impl Carrier for HttpCarrier {
    async fn create_shipment(&self, key: &str, address: &Address, items: u32) -> Result<ShipmentOutcome, Unavailable> {
        let body = json!({ "address": address, "items": items });
        Ok(match self.0.post::<Shipped>("createShipment", "/v1/shipments", key, &body).await? {
            Answer::Done(s) => ShipmentOutcome::Created { shipment_id: s.shipment_id, carrier: s.carrier },
            Answer::Refused(reason) => ShipmentOutcome::Rejected { reason },
        })
    }

    async fn cancel_shipment(&self, key: &str, shipment_id: &str) -> Result<(), Unavailable> {
        let path = format!("/v1/shipments/{}/cancel", percent_encoding::utf8_percent_encode(shipment_id, ID));
        match self.0.post::<Value>("cancelShipment", &path, key, &json!({})).await? {
            Answer::Done(_) => Ok(()),
            Answer::Refused(reason) => Err(self.0.unavailable(format!("cancelling {shipment_id} refused: {reason}"))),
        }
    }
}

/// What may not appear raw in a path segment.
const ID: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

/// The notifier at `NOTIFIER_URL`.
#[derive(Debug, Clone)]
pub struct HttpNotifier(pub Provider);

impl HttpNotifier {
    /// In Lambda: `NOTIFIER_URL`, and the API key from SSM.
    pub async fn from_env(sdk: &aws_config::SdkConfig) -> Result<Self, ConfigError> {
        let key = api_key(sdk, &process_env).await?;
        Provider::from_vars("notifier", "NOTIFIER_URL", key, &process_env).map(Self)
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sent {
    message_id: String,
}

impl Notifier for HttpNotifier {
    async fn notify(&self, key: &str, customer_id: &str, message: &str) -> Result<NotifyOutcome, Unavailable> {
        let body = json!({ "customerId": customer_id, "message": message });
        Ok(match self.0.post::<Sent>("notify", "/v1/messages", key, &body).await? {
            Answer::Done(sent) => NotifyOutcome::Sent { message_id: sent.message_id },
            Answer::Refused(reason) => NotifyOutcome::Undeliverable { reason },
        })
    }
}
