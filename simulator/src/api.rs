//! The HTTP surface: the providers' endpoints (auth, idempotency, fault injection, ledger) and the
//! control endpoints.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Config;
use crate::behaviour::{BehaviourRequest, Behaviours, OutageMode};
use crate::ledger::Ledger;
use crate::model::{Answer, Operation};
use crate::rules::{self, Unavailable};

/// One slot per (operation, idempotency key). Its async lock makes concurrent duplicates queue
/// behind the first call, which then finds the stored answer instead of acting a second time.
type Slot = Arc<tokio::sync::Mutex<Option<Answer>>>;

pub(crate) struct Sim {
    /// Rotated at run time on `PUT /control/api-key`, as a provider's dashboard rotates it.
    api_key: Mutex<Option<String>>,
    behaviours: Behaviours,
    ledger: Ledger,
    answers: Mutex<HashMap<(Operation, String), Slot>>,
    /// Flips to true on stop: held requests give up rather than delay the graceful shutdown.
    shutdown: watch::Receiver<bool>,
}

type Shared = State<Arc<Sim>>;

/// The service; with a journal, what it answered before is replayed into it first.
pub(crate) fn router(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<Router> {
    let (kept, replayed) = match &config.journal {
        Some(path) => Ledger::journaled(path)?,
        None => (Ledger::default(), Vec::new()),
    };
    let answers = replayed
        .into_iter()
        .map(|(operation, key, answer)| ((operation, key), Arc::new(tokio::sync::Mutex::new(Some(answer)))))
        .collect();
    let sim = Sim {
        api_key: Mutex::new(config.api_key),
        behaviours: Behaviours::default(),
        ledger: kept,
        answers: Mutex::new(answers),
        shutdown,
    };
    Ok(Router::new()
        .route("/v1/charges", post(charge))
        .route("/v1/charges/void", post(void_charge))
        .route("/v1/refunds", post(refund))
        .route("/v1/shipments", post(create_shipment))
        .route("/v1/shipments/{id}/cancel", post(cancel_shipment))
        .route("/v1/messages", post(notify))
        .route("/control/ledger", get(ledger).delete(clear_ledger))
        .route("/control/api-key", axum::routing::put(rotate_api_key))
        .route("/control/behaviour", get(behaviours).put(set_behaviour).delete(clear_behaviours))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .with_state(Arc::new(sim)))
}

async fn charge(State(sim): Shared, headers: HeaderMap, body: Bytes) -> Answer {
    sim.call(Operation::Charge, &headers, parse(&body), rules::charge).await
}

/// Settles a charge by its key without charging: the charge's stored answer if it was made (or
/// declined); otherwise the key is voided (a `422` stored as the charge's answer), so a charge
/// still on its way with that key is answered "voided" and never made. One slot, the charge's:
/// the void and the charge cannot both happen.
async fn void_charge(State(sim): Shared, headers: HeaderMap, body: Bytes) -> Answer {
    let request = parse::<rules::VoidRequest>(&body);
    let mut headers = headers;
    if let Ok((_, void)) = &request {
        match axum::http::HeaderValue::from_str(&void.charge_key) {
            Ok(key) => {
                headers.insert("idempotency-key", key);
            }
            Err(_) => return Answer::error(StatusCode::BAD_REQUEST, "chargeKey is not a valid key"),
        }
    }
    sim.call(Operation::Charge, &headers, request, rules::void_charge).await
}

async fn refund(State(sim): Shared, headers: HeaderMap, body: Bytes) -> Answer {
    sim.call(Operation::Refund, &headers, parse(&body), rules::refund).await
}

async fn create_shipment(State(sim): Shared, headers: HeaderMap, body: Bytes) -> Answer {
    sim.call(Operation::CreateShipment, &headers, parse(&body), rules::create_shipment).await
}

async fn cancel_shipment(State(sim): Shared, Path(id): Path<String>, headers: HeaderMap) -> Answer {
    // The body, if any, carries nothing: the ledger records the path's shipment id instead.
    let request = Ok((json!({"shipmentId": id}), id));
    sim.call(Operation::CancelShipment, &headers, request, |_, id: &String| rules::cancel_shipment(id)).await
}

async fn notify(State(sim): Shared, headers: HeaderMap, body: Bytes) -> Answer {
    sim.call(Operation::Notify, &headers, parse(&body), rules::notify).await
}

/// The body as recorded in the ledger, and typed for the rules; a 400 answer if malformed.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<(Value, T), Answer> {
    let invalid = |e: serde_json::Error| Answer::error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}"));
    let value: Value = serde_json::from_slice(body).map_err(invalid)?;
    let typed = T::deserialize(&value).map_err(invalid)?;
    Ok((value, typed))
}

impl Sim {
    async fn call<T>(
        &self,
        operation: Operation,
        headers: &HeaderMap,
        request: Result<(Value, T), Answer>,
        rule: impl FnOnce(&str, &T) -> Result<Answer, Unavailable>,
    ) -> Answer {
        let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).filter(|k| !k.is_empty());
        self.ledger.call(operation, key);
        let (answer, outcome) = match self.answer(operation, headers, key, request, rule).await {
            Ok((answer, outcome)) => (answer, outcome),
            Err(answer) => (answer, "rejected"),
        };
        tracing::info!(operation = operation.name(), key, status = answer.status.as_u16(), outcome, "call");
        answer
    }

    /// The answer and how it came about; `Err` for answers given before any effect could happen.
    async fn answer<T>(
        &self,
        operation: Operation,
        headers: &HeaderMap,
        key: Option<&str>,
        request: Result<(Value, T), Answer>,
        rule: impl FnOnce(&str, &T) -> Result<Answer, Unavailable>,
    ) -> Result<(Answer, &'static str), Answer> {
        self.authorize(headers)?;
        let key = key.ok_or_else(|| Answer::error(StatusCode::BAD_REQUEST, "missing Idempotency-Key header"))?;
        let (body, request) = request?;
        self.disrupt(operation).await?;

        let slot = {
            let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
            answers.entry((operation, key.to_owned())).or_default().clone()
        };
        let mut stored = slot.lock().await;
        if let Some(answer) = stored.as_ref() {
            self.ledger.duplicate(operation, key);
            return Ok((answer.clone(), "duplicate"));
        }
        match rule(key, &request) {
            Ok(answer) => {
                // Journaled before it is given: an answer given is an answer kept.
                if let Err(e) = self.ledger.record(operation, key, body, &answer) {
                    tracing::error!(error = %e, operation = operation.name(), key, "journal write failed");
                    return Ok((Answer::unavailable(format!("journal write failed: {e}")), "unavailable"));
                }
                *stored = Some(answer.clone());
                Ok((answer, "done"))
            }
            // Not stored: the provider failed, a retry with the same key may succeed.
            Err(Unavailable(message)) => Ok((Answer::unavailable(message), "unavailable")),
        }
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), Answer> {
        let Some(expected) = self.api_key.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return Ok(()) };
        let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        match given.and_then(|v| v.strip_prefix("Bearer ")) {
            Some(token) if token == expected.as_str() => Ok(()),
            _ => Err(Answer::error(StatusCode::UNAUTHORIZED, "missing or invalid API key")),
        }
    }

    /// Applies the operation's behaviour: outage, then latency, then random errors.
    async fn disrupt(&self, operation: Operation) -> Result<(), Answer> {
        let Some(behaviour) = self.behaviours.for_operation(operation) else { return Ok(()) };
        if let Some(outage) = behaviour.active_outage() {
            match outage.mode {
                OutageMode::Unavailable => return Err(Answer::unavailable("simulated outage")),
                // Held to the window's end, then served as usual: a late answer, as from a
                // provider that stalled. A caller that gave up has gone, and this future with it.
                OutageMode::Timeout => self.hold_until(outage.until).await?,
            }
        }
        if let Some(latency) = behaviour.latency {
            self.hold_until(Instant::now() + latency.sample()).await?;
        }
        if behaviour.error_rate.is_some_and(|rate| fastrand::f64() < rate) {
            return Err(Answer::unavailable("simulated failure"));
        }
        Ok(())
    }

    async fn hold_until(&self, deadline: Instant) -> Result<(), Answer> {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => Ok(()),
            _ = shutdown.wait_for(|stopping| *stopping) => Err(Answer::unavailable("shutting down")),
        }
    }
}

#[derive(Deserialize)]
struct LedgerQuery {
    contains: Option<String>,
}

async fn ledger(State(sim): Shared, Query(query): Query<LedgerQuery>) -> impl IntoResponse {
    Json(sim.ledger.view(query.contains.as_deref()))
}

/// Forgets entries, counts and stored answers (the journal's too): a fresh provider, e.g.
/// between benchmark runs.
async fn clear_ledger(State(sim): Shared) -> Result<StatusCode, Answer> {
    sim.answers.lock().unwrap_or_else(|p| p.into_inner()).clear();
    sim.ledger
        .clear()
        .map_err(|e| Answer::error(StatusCode::INTERNAL_SERVER_ERROR, format!("clearing the journal: {e}")))?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ApiKey {
    api_key: String,
}

/// Rotates the API key: calls with the old one are refused (`401`) from now on.
async fn rotate_api_key(State(sim): Shared, Json(key): Json<ApiKey>) -> Result<StatusCode, Answer> {
    if key.api_key.trim().is_empty() {
        return Err(Answer::error(StatusCode::BAD_REQUEST, "apiKey is empty"));
    }
    *sim.api_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(key.api_key);
    Ok(StatusCode::NO_CONTENT)
}

async fn behaviours(State(sim): Shared) -> impl IntoResponse {
    Json(json!({"behaviours": sim.behaviours.views()}))
}

async fn set_behaviour(State(sim): Shared, body: Bytes) -> Answer {
    let request: BehaviourRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return Answer::error(StatusCode::BAD_REQUEST, format!("invalid behaviour: {e}")),
    };
    match sim.behaviours.set(request) {
        Ok(view) => Answer { status: StatusCode::OK, body: serde_json::to_value(view).unwrap_or_default() },
        Err(message) => Answer::error(StatusCode::BAD_REQUEST, message),
    }
}

async fn clear_behaviours(State(sim): Shared) -> impl IntoResponse {
    sim.behaviours.clear();
    Json(json!({"behaviours": []}))
}
