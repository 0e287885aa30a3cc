//! The local AWS environment, derived from `template.yaml`: no second copy of the
//! infrastructure. `local-env provision` creates the template's resources on the emulators
//! (DynamoDB Local, LocalStack) and writes what local processes need into `.local/`.

pub mod authorizer;
pub mod demo;
pub mod envfile;
pub mod filter;
pub mod http;
pub mod issuer;
pub mod lambda;
pub mod meter;
pub mod observe;
pub mod operations;
pub mod providers;
pub mod provision;
pub mod runner;
pub mod scenario;
pub mod template;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

pub use provision::{Clients, Options, Stack, Status, provision};
pub use template::Template;

/// The HTTP client of the local tools (the demo, the scenarios, the provider simulator's health;
/// the tests): plain HTTP on the loopback, 30 s per request, no connection kept for another
/// request, since callers may each run on a runtime of their own.
pub fn http_client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(30));
        client.build().expect("an HTTP client")
    })
}

/// Variables passed through from the provisioning environment: credentials, region, endpoints.
pub fn passthrough_env() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("AWS_ENDPOINT_URL")
                || matches!(
                    k.as_str(),
                    "AWS_REGION" | "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" | "AWS_SESSION_TOKEN"
                )
        })
        .collect()
}

/// Writes `stack.json` (everything resolved) and `aws.env` (what a process needs) to `out`.
pub fn write_outputs(stack: &Stack, out: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    let json = serde_json::to_string_pretty(stack).map_err(std::io::Error::other)?;
    std::fs::write(out.join("stack.json"), json)?;
    let mut env = passthrough_env();
    env.insert("STACK_NAME".into(), stack.stack_name.clone());
    env.extend(stack.environment.clone());
    // What the operators' command line (`ops`) needs besides the tables.
    if let Some(saga) = stack.outputs.get("OrderSagaArn") {
        env.insert("ORDER_SAGA_ARN".into(), saga.clone());
    }
    std::fs::write(out.join("aws.env"), envfile::render(&env))
}

/// A human-readable summary, one line a resource; what was not created is named.
pub fn report(stack: &Stack) -> String {
    let mut lines = Vec::new();
    for o in &stack.outcomes {
        let status = match &o.status {
            Status::Created => "created".to_owned(),
            Status::Updated => "updated".to_owned(),
            Status::Exists => "exists".to_owned(),
            Status::Local(why) => format!("local stand-in ({why})"),
            Status::Skipped(why) => format!("skipped ({why})"),
            Status::Unsupported => "NOT CREATED: resource type not supported locally".to_owned(),
            Status::Failed(e) => format!("FAILED: {e}"),
        };
        let mut line = format!("  {:<28} {:<34} {status}", o.logical_id, o.kind);
        if let Some(id) = &o.physical_id {
            line.push_str(&format!("\n  {:<28} -> {id}", ""));
        }
        if !o.ignored.is_empty() {
            line.push_str(&format!("\n  {:<28} (no local effect: {})", "", o.ignored.join(", ")));
        }
        lines.push(line);
    }
    let unsupported: Vec<String> =
        stack.unsupported().iter().map(|o| format!("{} ({})", o.logical_id, o.kind)).collect();
    if !unsupported.is_empty() {
        lines.push(format!("Not created locally: {}", unsupported.join(", ")));
    }
    for problem in &stack.unresolved {
        lines.push(format!("Unresolved: {problem}"));
    }
    lines.join("\n")
}
