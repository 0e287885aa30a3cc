//! The external services over HTTP, as in production: the payment gateway, the carrier and the
//! notifier are HTTP APIs (locally, the provider simulator), called with the step's idempotency
//! key as the `Idempotency-Key` header, as payment APIs take it, so a retried call has one
//! effect. Base URLs come from the environment; the API key is a SecureString in SSM Parameter
//! Store (its name in `PROVIDER_API_KEY_PARAMETER`), read once per instance, by its first call
//! (not in the init phase), never an environment variable, and read again when the provider
//! answers `401` (the key was rotated: see [`Credentials`]). Nothing here knows it may be talking to a simulator.
//!
//! What an answer means, once: `2xx` is done; `402` / `422` are the provider's business answers
//! (declined, rejected, undeliverable), final for that key; anything else (`5xx`, `429`, a
//! timeout, no connection) is [`Unavailable`]: the call may succeed later.
//!
//! Every call goes through the per-instance guards of [`crate::resilience`], in
//! [`Provider::post`]: the bulkhead (`PROVIDER_MAX_CONCURRENCY` requests in flight, else
//! [`Why::BulkheadFull`] at once, never sent), an adaptive timeout over the whole call (from the
//! operation's recent p99, under `PROVIDER_TIMEOUT_MS`, within the invocation's
//! [`Deadline::current`]; else [`Why::TimedOut`], or [`Why::NoTimeLeft`] unsent), and a hedge
//! after the recent p95 (`PROVIDER_HEDGING=off` turns it off). Around all of it, the provider's
//! circuit breaker shared by every instance ([`crate::resilience::breaker`]; [`Why::CircuitOpen`]
//! while it is open).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::adapters::dynamodb::SharedBreaker;
use crate::config::{ConfigError, Vars, process_env, required};
use crate::deadline::Deadline;
use crate::domain::money::Money;
use crate::domain::order::Address;
use crate::domain::services::{
    Carrier, ChargeOutcome, Notifier, NotifyOutcome, PaymentGateway, RefundOutcome, ShipmentOutcome, Unavailable, Why,
};
use crate::resilience::breaker::{Admission, BreakerPolicy, Outcome as BreakerOutcome};
use crate::resilience::bulkhead::{self, Bulkhead};
use crate::resilience::hedge::{Hedging, hedged};
use crate::resilience::timeout::{AdaptiveTimeout, Latencies};

/// The longest one call may take unless `PROVIDER_TIMEOUT_MS` says otherwise (the ceiling of
/// the adaptive timeout): well inside the functions' 10 s, so a hung provider costs a retry,
/// not the invocation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// One provider's HTTP API: its base URL, the client (one per instance: connections are kept
/// between invocations) and the credentials.
#[derive(Debug, Clone)]
pub struct Provider {
    service: &'static str,
    base_url: String,
    credentials: Credentials,
    client: reqwest::Client,
    /// Shared by the clones: one bulkhead and one latency record per instance.
    guards: Arc<Guards>,
    /// The provider's circuit breaker, shared with every instance that calls it (none: off).
    breaker: Option<Arc<SharedBreaker>>,
}

/// What every call of one provider goes through, per instance.
#[derive(Debug)]
struct Guards {
    bulkhead: Bulkhead,
    timeout: AdaptiveTimeout,
    hedging: Hedging,
    latencies: Latencies,
}

/// An answer that is not a success but means something to the caller.
enum Answer<T> {
    Done(T),
    /// A business answer (`402`, `422`): its `reason`.
    Refused(String),
}

/// One request's answer, before the credentials had their say.
enum Reply<T> {
    Answer(Answer<T>),
    /// `401`: the key sent (none: no key) was refused; its answer's text.
    Unauthorized(Option<String>, String),
}

/// Fetches the API key from where it is kept (SSM Parameter Store in Lambda).
pub type KeyFetch = Arc<dyn Fn() -> BoxFuture<'static, Result<Option<String>, String>> + Send + Sync>;

/// The shortest time between two fetches of the key after refusals: a key that stays wrong
/// costs one SSM read per instance this often, not one per call.
pub const KEY_REFETCH_INTERVAL: Duration = Duration::from_secs(5);

/// The providers' API key, cached per instance (shared by the clones). When the provider
/// refuses it (`401`: rotated since this instance read it), it is fetched again and the call
/// made once more with the new key; calls refused at the same time share one fetch.
///
/// Read from its parameter ([`credentials`]), the key is read by the first call, not in the init
/// phase: an SSM client and its round trip were most of a cold start's init. A read that failed
/// is made again by the next call.
#[derive(Clone)]
pub struct Credentials {
    key: Arc<RwLock<Option<String>>>,
    fetch: Option<KeyFetch>,
    fetched: Arc<tokio::sync::Mutex<Option<Instant>>>,
    /// Whether the key is still to be read (by the next call).
    unread: Arc<tokio::sync::Mutex<bool>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = if self.current().is_some() { "<redacted>" } else { "<none>" };
        f.debug_struct("Credentials").field("key", &key).field("refetches", &self.fetch.is_some()).finish()
    }
}

impl Credentials {
    /// A key that never changes (or none).
    pub fn fixed(key: Option<String>) -> Self {
        Self { key: Arc::new(RwLock::new(key)), fetch: None, fetched: Arc::default(), unread: Arc::default() }
    }

    /// `key`, fetched again with `fetch` when the provider refuses it.
    pub fn refetched(key: Option<String>, fetch: KeyFetch) -> Self {
        Self { fetch: Some(fetch), ..Self::fixed(key) }
    }

    /// The key `fetch` reads, read by the first call ([`Self::ready`]) and again when the
    /// provider refuses it.
    pub fn read_on_first_call(fetch: KeyFetch) -> Self {
        Self { unread: Arc::new(tokio::sync::Mutex::new(true)), ..Self::refetched(None, fetch) }
    }

    /// Reads the key if it is still to be read (calls at the same time share the read); at once
    /// after that. A read that failed is made again by the next call, its error returned.
    pub async fn ready(&self) -> Result<(), String> {
        let mut unread = self.unread.lock().await;
        let Some(fetch) = self.fetch.as_ref().filter(|_| *unread) else { return Ok(()) };
        let key = fetch().await?;
        *self.key.write().unwrap_or_else(|p| p.into_inner()) = key;
        *unread = false;
        Ok(())
    }

    /// The key calls are sent with now.
    pub fn current(&self) -> Option<String> {
        self.key.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// After `refused` was refused: the key to try instead, if there is another one (set by a
    /// concurrent call's fetch, or fetched now, unless one was fetched very recently).
    async fn renewed(&self, refused: Option<&str>) -> Option<String> {
        let mut fetched = self.fetched.lock().await;
        let current = self.current();
        if current.as_deref() != refused {
            return current;
        }
        let fetch = self.fetch.as_ref()?;
        if fetched.is_some_and(|at| at.elapsed() < KEY_REFETCH_INTERVAL) {
            return None;
        }
        *fetched = Some(Instant::now());
        match fetch().await {
            Ok(Some(key)) if Some(key.as_str()) != refused => {
                tracing::warn!("the provider refused the API key: using the one now in the parameter store");
                *self.key.write().unwrap_or_else(|p| p.into_inner()) = Some(key.clone());
                Some(key)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "fetching the provider API key again failed");
                None
            }
        }
    }
}

async fn read_key(ssm: &aws_sdk_ssm::Client, name: &str) -> Result<String, String> {
    let answer = ssm
        .get_parameter()
        .name(name)
        .with_decryption(true)
        .send()
        .await
        .map_err(|e| format!("{name}: {}", aws_sdk_ssm::error::DisplayErrorContext(&e)))?;
    let value = answer.parameter.and_then(|p| p.value).filter(|v| !v.trim().is_empty());
    value.ok_or_else(|| format!("{name} has no value"))
}

/// The providers' API key: the SecureString parameter named by `PROVIDER_API_KEY_PARAMETER`,
/// read by the first call ([`Credentials::read_on_first_call`], its SSM client made then too)
/// and again when the provider refuses it; none when the variable is unset (a provider without
/// credentials, as the simulator can run).
pub fn credentials(sdk: &aws_config::SdkConfig, vars: Vars<'_>) -> Credentials {
    let Some(name) = vars("PROVIDER_API_KEY_PARAMETER") else { return Credentials::fixed(None) };
    let ssm = crate::adapters::aws::LazyClient::new(sdk, aws_sdk_ssm::Client::new);
    let fetch: KeyFetch = Arc::new(move || {
        let (ssm, name) = (ssm.clone(), name.clone());
        Box::pin(async move { read_key(&ssm, &name).await.map(Some) })
    });
    Credentials::read_on_first_call(fetch)
}

/// `name`'s circuit breaker, its state in `COMMANDS_TABLE`, its policy from `BREAKER_*` (see
/// [`BreakerPolicy::from_vars`]); none when `BREAKER_FAILURE_THRESHOLD` is 0.
pub fn breaker(sdk: &aws_config::SdkConfig, name: &str, vars: Vars<'_>) -> Result<Option<SharedBreaker>, ConfigError> {
    let Some(policy) = BreakerPolicy::from_vars(vars)? else { return Ok(None) };
    let table = required(vars, "COMMANDS_TABLE")?;
    Ok(SharedBreaker::in_table(aws_sdk_dynamodb::Client::new(sdk), &table, name, Some(policy)))
}

impl Provider {
    /// `url_variable` (the base URL), `PROVIDER_TIMEOUT_MS` (the timeout's ceiling),
    /// `PROVIDER_MAX_CONCURRENCY` (the bulkhead, [`bulkhead::DEFAULT_MAX_CONCURRENCY`]) and
    /// `PROVIDER_HEDGING` (`on`, the default, or `off`); a fixed `api_key` (in Lambda, [`credentials`]).
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
        let max_concurrency = match vars("PROVIDER_MAX_CONCURRENCY") {
            None => bulkhead::DEFAULT_MAX_CONCURRENCY,
            Some(n) => n.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| ConfigError::Invalid {
                name: "PROVIDER_MAX_CONCURRENCY",
                reason: "expected a whole number above 0".into(),
            })?,
        };
        let hedging = match vars("PROVIDER_HEDGING").as_deref().map(str::trim) {
            None | Some("on") => true,
            Some("off") => false,
            Some(_) => {
                return Err(ConfigError::Invalid { name: "PROVIDER_HEDGING", reason: "expected on or off".into() });
            }
        };
        let guards = Guards {
            bulkhead: Bulkhead::new(max_concurrency, bulkhead::WAIT),
            timeout: AdaptiveTimeout::new(timeout),
            hedging: Hedging::new(hedging),
            latencies: Latencies::default(),
        };
        let credentials = Credentials::fixed(api_key);
        Ok(Self { service, base_url, credentials, client, guards: Arc::new(guards), breaker: None })
    }

    /// In Lambda: the base URL in `url_variable`, the API key from SSM ([`credentials`]), and the
    /// circuit breaker `breaker_name` ([`breaker`]); everything else from the process's variables.
    pub fn from_env(
        sdk: &aws_config::SdkConfig,
        service: &'static str,
        url_variable: &str,
        breaker_name: &str,
    ) -> Result<Self, ConfigError> {
        let credentials = credentials(sdk, &process_env);
        let provider = Self::from_vars(service, url_variable, None, &process_env)?.with_credentials(credentials);
        Ok(provider.with_breaker(breaker(sdk, breaker_name, &process_env)?))
    }

    /// Calls are sent with `credentials`' key.
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// Calls go through `breaker` (see [`crate::resilience::breaker`]).
    pub fn with_breaker(mut self, breaker: Option<SharedBreaker>) -> Self {
        self.breaker = breaker.map(Arc::new);
        self
    }

    fn unavailable(&self, message: impl Into<String>) -> Unavailable {
        Unavailable::new(self.service, Why::Failed, message)
    }

    fn refused_key(&self, path: &str, text: &str) -> Unavailable {
        self.unavailable(format!("POST {path} answered 401: the API key was refused ({text})"))
    }

    /// One logical call (where it starts and ends: hedged requests are inside), timed into
    /// `ProviderLatency` under `operation` when it was made.
    async fn post<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        path: &str,
        key: &str,
        body: &Value,
    ) -> Result<Answer<T>, Unavailable> {
        // Before the breaker: a key that cannot be read says nothing about the provider.
        if let Err(e) = self.credentials.ready().await {
            let message = format!("POST {path} not sent: the API key could not be read: {e}");
            return Err(Unavailable::new(self.service, Why::NoCredentials, message));
        }
        let permit = match &self.breaker {
            None => None,
            Some(breaker) => match breaker.admit().await {
                Admission::Call(permit) => Some(permit),
                Admission::Refuse { retry_after } => {
                    crate::metrics::call_short_circuited(breaker.name());
                    let message = format!("POST {path} not sent: the {} circuit breaker is open", breaker.name());
                    return Err(Unavailable::new(self.service, Why::CircuitOpen, message).retry_after(retry_after));
                }
            },
        };
        let started = std::time::Instant::now();
        let answer = match self.guarded(operation, path, key, body).await {
            Ok(Reply::Answer(answer)) => Ok(answer),
            Ok(Reply::Unauthorized(refused, text)) => match self.credentials.renewed(refused.as_deref()).await {
                // Rotated: once more with the new key; refused again, it is a failure like any other.
                Some(_) => match self.guarded(operation, path, key, body).await {
                    Ok(Reply::Answer(answer)) => Ok(answer),
                    Ok(Reply::Unauthorized(_, text)) => Err(self.refused_key(path, &text)),
                    Err(e) => Err(e),
                },
                None => Err(self.refused_key(path, &text)),
            },
            Err(e) => Err(e),
        };
        if let (Some(breaker), Some(permit)) = (&self.breaker, permit) {
            match &answer {
                // Never sent (the bulkhead): nothing learnt about the provider.
                Err(e) if e.not_called() => {}
                Err(_) => breaker.record(permit, BreakerOutcome::Failed).await,
                Ok(_) => breaker.record(permit, BreakerOutcome::Answered).await,
            }
        }
        // (A call refused before it was made has no latency to tell.)
        if !answer.as_ref().is_err_and(Unavailable::not_called) {
            crate::metrics::provider_latency(operation, started.elapsed());
        }
        if let Err(e) = &answer {
            tracing::warn!(provider = self.service, operation, why = ?e.why, error = %e.message, "provider call failed");
        }
        answer
    }

    /// The call within the bulkhead, bounded by its adaptive timeout, hedged when slow.
    async fn guarded<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        path: &str,
        key: &str,
        body: &Value,
    ) -> Result<Reply<T>, Unavailable> {
        let guards = &*self.guards;
        let Some(_permit) = guards.bulkhead.enter().await else {
            let message =
                format!("POST {path} not sent: {} requests in flight on this instance", guards.bulkhead.size());
            return Err(Unavailable::new(self.service, Why::BulkheadFull, message));
        };
        let recent = guards.latencies.recent(operation);
        let Some(timeout) = guards.timeout.timeout(&recent, Deadline::current().remaining()) else {
            // Not sent: nothing happened at the provider, and nothing is learnt about it.
            let message = format!("POST {path} not sent: no time left before the invocation's deadline");
            return Err(Unavailable::new(self.service, Why::NoTimeLeft, message));
        };
        let delay = guards.hedging.delay(&recent).filter(|delay| *delay < timeout);
        let hedge = move || {
            let permit = guards.bulkhead.try_enter();
            if permit.is_some() {
                crate::metrics::provider_hedge(operation);
                tracing::debug!(
                    provider = self.service,
                    operation,
                    after_ms = delay.map(|d| d.as_millis() as u64),
                    "hedging a slow call"
                );
            }
            permit
        };
        let call = hedged(delay, move || self.call(operation, path, key, body), hedge);
        match tokio::time::timeout(timeout, call).await {
            Ok(call) => call.answer,
            Err(_) => Err(Unavailable::new(
                self.service,
                Why::TimedOut,
                format!("POST {path} timed out: no answer within {} ms", timeout.as_millis()),
            )),
        }
    }

    /// One request; its latency goes into the operation's window (see
    /// [`crate::resilience::timeout`]).
    async fn call<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        path: &str,
        key: &str,
        body: &Value,
    ) -> Result<Reply<T>, Unavailable> {
        let mut request =
            self.client.post(format!("{}{path}", self.base_url)).header("Idempotency-Key", key).json(body);
        let api_key = self.credentials.current();
        if let Some(api_key) = &api_key {
            request = request.bearer_auth(api_key);
        }
        let sample = self.guards.latencies.sample(operation);
        let response = match request.send().await {
            Ok(response) => {
                sample.answered();
                response
            }
            Err(e) => {
                let (why, what) = if e.is_timeout() {
                    (Why::TimedOut, "timed out")
                } else {
                    sample.failed();
                    (Why::Failed, "unreachable")
                };
                return Err(Unavailable::new(self.service, why, format!("POST {path} {what}: {e}")));
            }
        };
        let status = response.status();
        let text = response.text().await.map_err(|e| self.unavailable(format!("POST {path}: body lost: {e}")))?;
        match status.as_u16() {
            200..=299 => serde_json::from_str(&text)
                .map(|done| Reply::Answer(Answer::Done(done)))
                .map_err(|e| self.unavailable(format!("POST {path}: unexpected answer ({e}): {text}"))),
            402 | 422 => {
                let reason = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["reason"].as_str().map(str::to_owned))
                    .unwrap_or(text);
                Ok(Reply::Answer(Answer::Refused(reason)))
            }
            401 => Ok(Reply::Unauthorized(api_key, text)),
            code => Err(self.unavailable(format!("POST {path} answered {code}: {text}"))),
        }
    }
}

/// The payment gateway at `PAYMENT_PROVIDER_URL`.
#[derive(Debug, Clone)]
pub struct HttpPaymentGateway(pub Provider);

impl HttpPaymentGateway {
    /// In Lambda: `PAYMENT_PROVIDER_URL`, the API key from SSM, the `payment-gateway` breaker.
    pub fn from_env(sdk: &aws_config::SdkConfig) -> Result<Self, ConfigError> {
        Provider::from_env(sdk, "payment gateway", "PAYMENT_PROVIDER_URL", "payment-gateway").map(Self)
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

    async fn void_charge(&self, key: &str, charge_key: &str) -> Result<ChargeOutcome, Unavailable> {
        let body = json!({ "chargeKey": charge_key });
        Ok(match self.0.post::<Charged>("voidCharge", "/v1/charges/void", key, &body).await? {
            Answer::Done(charged) => ChargeOutcome::Charged { payment_id: charged.payment_id },
            Answer::Refused(reason) => ChargeOutcome::Declined { reason },
        })
    }

    async fn refund(&self, key: &str, payment_id: &str, amount: Money) -> Result<RefundOutcome, Unavailable> {
        let body = json!({ "paymentId": payment_id, "amount": amount });
        Ok(match self.0.post::<Refunded>("refund", "/v1/refunds", key, &body).await? {
            Answer::Done(refunded) => RefundOutcome::Refunded { refund_id: refunded.refund_id },
            Answer::Refused(reason) => RefundOutcome::Refused { reason },
        })
    }
}

/// The carrier at `CARRIER_URL`.
#[derive(Debug, Clone)]
pub struct HttpCarrier(pub Provider);

impl HttpCarrier {
    /// In Lambda: `CARRIER_URL`, the API key from SSM, the `carrier` breaker.
    pub fn from_env(sdk: &aws_config::SdkConfig) -> Result<Self, ConfigError> {
        Provider::from_env(sdk, "carrier", "CARRIER_URL", "carrier").map(Self)
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
    /// In Lambda: `NOTIFIER_URL`, the API key from SSM, the `notifier` breaker.
    pub fn from_env(sdk: &aws_config::SdkConfig) -> Result<Self, ConfigError> {
        Provider::from_env(sdk, "notifier", "NOTIFIER_URL", "notifier").map(Self)
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
