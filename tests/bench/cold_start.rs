//! Cold-start benchmark: every function of the template and a bare `lambda_runtime` binary
//! (`tests/bare-lambda`, the baseline), built with the same release profile, each started cold
//! in the local Lambda service N times, side by side in one run. The figures are the service's
//! own `REPORT` figures: `Init Duration` (spawn to the runtime's first `next`) and `Max Memory
//! Used` (the process's peak RSS), after a trivial event (no AWS call).
//!
//!     scripts/env.sh up && cargo bench -p system-tests --bench cold_start [-- --runs 40]
//!
//! `LOCAL_LAMBDA_BINARIES=<dir>` measures prebuilt binaries instead (`<dir>/<crate>` or
//! `<dir>/<crate>/bootstrap`, the baseline as `bare-lambda`); `COLD_START_ZIPS=<dir>` adds the
//! size of `<dir>/<crate>/bootstrap.zip` (what `cargo lambda build --output-format zip` leaves)
//! as a column. Under `cargo test` (no `--bench` argument) it runs at smoke size, on dev binaries.
//! Figures are from a shared 2-core machine: compare the columns, not absolutes with AWS.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use local_env::lambda::{Faults, InvokeOptions, LambdaService, binaries};
use local_env::{Options, Template};
use serde_json::json;
use system_tests::{LocalAws, unique, workspace_root};

const BARE: &str = "bare-lambda";
const BARE_ID: &str = "BareLambdaBaseline";

/// A trivial event for each function: answered without an AWS call, so the process does no
/// more than its init and the runtime's first round trip.
fn trivial_event(crate_name: &str) -> serde_json::Value {
    match crate_name {
        // An HTTP API request for no route: refused before the event store or DynamoDB.
        "place-order" | "query-api" => json!({ "rawPath": "/", "requestContext": { "http": { "method": "GET" } } }),
        BARE => json!({ "ping": 1 }),
        // SQS batches and DynamoDB stream batches, empty.
        _ => json!({ "Records": [] }),
    }
}

struct Row {
    crate_name: String,
    init_ms: Vec<f64>,
    rss_mb: u64,
    binary_bytes: u64,
    zip_bytes: Option<u64>,
    errors: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|a| a == "--bench");
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(if benching { 20 } else { 1 });
    let only: Option<Vec<String>> =
        std::env::var("COLD_START_ONLY").ok().map(|s| s.split(',').map(str::trim).map(str::to_owned).collect());

    // The system provisioned under its own stack name, so every function has its variables.
    let aws = LocalAws::load().await;
    let template = Template::load(&workspace_root().join("template.yaml"))?;
    // Its providers: a simulator asking for a key kept in SSM, which the functions that call a
    // provider read at init (so their cold start includes that read, as on AWS).
    let stack_name = unique("c");
    let key_parameter = format!("{stack_name}-provider-api-key");
    let key = unique("key-");
    local_env::providers::put_api_key(&aws.ssm(), &key_parameter, &key).await?;
    let binary = local_env::providers::simulator_binary(&workspace_root(), None)?;
    let journal = std::env::temp_dir().join(format!("provider-simulator-{stack_name}.jsonl"));
    let mut providers = local_env::providers::SimulatorProcess::start(&binary, 0, Some(key), &journal).await?;
    let mut parameter_overrides = HashMap::from([("ProviderApiKeyParameter".to_owned(), key_parameter.clone())]);
    local_env::providers::point_at(&template, &providers.url(), &mut parameter_overrides);
    let options =
        Options { stack_name, region: aws.var("AWS_REGION"), account_id: "000000000000".into(), parameter_overrides };
    let mut stack = local_env::provision(&template, &options, &aws.provisioning_clients()).await?;
    anyhow::ensure!(stack.failed().is_empty() && stack.unresolved.is_empty(), "{}", local_env::report(&stack));
    // The baseline, as one more function of the stack (no variables of its own).
    stack.function_properties.insert(BARE_ID.to_owned(), json!({ "CodeUri": "tests/bare-lambda/" }));
    if let Some(only) = &only {
        stack.function_properties.retain(|id, props| {
            let crate_name = props["CodeUri"].as_str().unwrap_or_default().trim_end_matches('/').rsplit('/').next();
            id == BARE_ID || crate_name.is_some_and(|c| only.iter().any(|o| o == c))
        });
    }
    let mut crates: Vec<String> = stack
        .function_properties
        .values()
        .filter_map(|p| p["CodeUri"].as_str()?.trim_end_matches('/').rsplit('/').next().map(str::to_owned))
        .collect();
    crates.sort();
    crates.dedup();

    // Under `cargo test`, the dev binaries the other tests use: a smoke run need not pay for a
    // release build of the SDK.
    let profile = benching.then_some("release");
    eprintln!("building {} binaries with the {} profile…", crates.len(), profile.unwrap_or("dev"));
    let built = binaries::build(&workspace_root(), &crates, profile)?;
    let mut lambda_options = local_env::lambda::Options::new(&stack);
    lambda_options.log_dir = workspace_root().join(".local/logs").join(&stack.stack_name);
    lambda_options.aws_env =
        aws.vars.iter().filter(|(k, _)| k.starts_with("AWS_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let service = LambdaService::new(&stack, &built, lambda_options, None)?;

    let functions: Vec<(String, String)> =
        service.specs().iter().map(|s| (s.logical_id.clone(), s.crate_name.clone())).collect();
    for (id, _) in &functions {
        service.set_faults(id, Faults { cold_start: true, ..Faults::default() })?;
    }
    let zips = std::env::var_os("COLD_START_ZIPS").filter(|d| !d.is_empty());
    let mut rows: BTreeMap<String, Row> = functions
        .iter()
        .map(|(id, crate_name)| {
            let binary = &built[crate_name];
            let zip_bytes = zips
                .as_ref()
                .and_then(|dir| std::fs::metadata(Path::new(dir).join(crate_name).join("bootstrap.zip")).ok())
                .map(|m| m.len());
            let row = Row {
                crate_name: crate_name.clone(),
                init_ms: Vec::new(),
                rss_mb: 0,
                binary_bytes: std::fs::metadata(binary).map(|m| m.len()).unwrap_or(0),
                zip_bytes,
                errors: 0,
            };
            (id.clone(), row)
        })
        .collect();

    // Round-robin, one cold start at a time: each function sees the same machine load.
    eprintln!("{runs} cold starts of each of {} functions…", functions.len());
    for _ in 0..runs {
        for (id, crate_name) in &functions {
            let payload = trivial_event(crate_name).to_string();
            let invoked = service.invoke(id, payload, &InvokeOptions::default()).await?;
            let row = rows.get_mut(id).expect("row");
            if let Some(init) = invoked.report.init_ms {
                row.init_ms.push(init);
            }
            row.rss_mb = row.rss_mb.max(invoked.report.max_memory_used_mb);
            if invoked.report.status.is_some() {
                row.errors += 1;
                eprintln!("{id}: {}\n{}", invoked.report.line(), invoked.log_tail);
            }
        }
    }
    service.shutdown().await;
    providers.stop().await;
    let _ = std::fs::remove_file(providers.journal());
    let _ = std::fs::remove_file(providers.log());
    let _ = aws.ssm().delete_parameter().name(&key_parameter).send().await;

    let bare_p50 = {
        let mut bare = rows[BARE_ID].init_ms.clone();
        bare.sort_by(f64::total_cmp);
        percentile(&bare, 50.0)
    };
    let mut ordered: Vec<&Row> = rows.values().collect();
    ordered.sort_by_key(|r| (r.crate_name != BARE, r.crate_name.clone()));
    println!();
    println!(
        "cold starts: {runs} per function, release profile, {} ({})",
        std::env::consts::ARCH,
        if std::env::var_os("LOCAL_LAMBDA_BINARIES").is_some() { "prebuilt" } else { "built by cargo" }
    );
    print!("{:<26} {:>9} {:>9} {:>8} {:>9} {:>10}", "function", "init p50", "init p95", "x bare", "peak RSS", "binary");
    if zips.is_some() {
        print!(" {:>10}", "arm64 zip");
    }
    println!();
    for row in ordered {
        let mut init = row.init_ms.clone();
        init.sort_by(f64::total_cmp);
        let p50 = percentile(&init, 50.0);
        print!(
            "{:<26} {:>6.2} ms {:>6.2} ms {:>7.2}x {:>6} MB {:>7.2} MB",
            row.crate_name,
            p50,
            percentile(&init, 95.0),
            p50 / bare_p50,
            row.rss_mb,
            mb(row.binary_bytes),
        );
        if zips.is_some() {
            match row.zip_bytes {
                Some(bytes) => print!(" {:>7.2} MB", mb(bytes)),
                None => print!(" {:>10}", "-"),
            }
        }
        if row.errors > 0 {
            print!("  ({} failed)", row.errors);
        }
        println!();
    }
    let failed: usize = rows.values().map(|r| r.errors).sum();
    anyhow::ensure!(failed == 0, "{failed} invocations failed (see above)");
    Ok(())
}
