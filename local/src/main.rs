//! `local-env provision [--template template.yaml] [--out .local] [--stack-name NAME]
//!  [--parameter-overrides K=V ...] [--strict]`: creates the template's resources on the emulators.
//!
//! `local-env run [--stack .local/stack.json] [--demo] [--orders N] [--release]
//!  [--scenario outage|slow|flaky [--outage-seconds S]]`: builds every function's binary and runs
//! it in the local Lambda service (the Runtime API, as Lambda runs it), fed from its event sources
//! as Lambda would; with `--demo`, places the sample orders of `events/place-order/` (plus N
//! more), reports and exits. With `--scenario` (a demo too) it replays a payment provider fault
//! instead (`local_env::scenario`): a burst of N happy-path orders (default 30 for an outage, 20
//! otherwise) while the gateway is down for S seconds (default 30), slow, or flaky; prints the
//! outcome table and fails if an order was lost, charged twice, cancelled or flagged.
//!
//! While it runs, the template's HTTP API routes are served on 127.0.0.1:`LOCAL_API_PORT`
//! (default 3000), behind their JWT authorizer, which trusts the local OIDC issuer served on
//! 127.0.0.1:`LOCAL_ISSUER_PORT` (default 9400, `local_env::issuer`); Lambda's Invoke API on
//! 127.0.0.1:`LOCAL_LAMBDA_PORT` (default 9001). `LOCAL_FUNCTION_LOGS=stderr` also prints every
//! function's log lines.
//!
//! Endpoints and credentials come from the standard AWS variables (`AWS_ENDPOINT_URL*`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use std::path::Path;

use anyhow::{Context, bail};
use local_env::lambda::{LambdaService, binaries, intercept, invoke_api};
use local_env::meter::{Bill, Meter};
use local_env::runner::{Runner, RunnerClients};
use local_env::{Clients, Options, Template};

struct Args {
    template: PathBuf,
    out: PathBuf,
    stack_name: String,
    overrides: HashMap<String, String>,
    strict: bool,
}

const USAGE: &str = "usage: local-env provision [--template F] [--out DIR] [--stack-name N] [--parameter-overrides K=V ...] [--strict]\n       local-env run [--stack .local/stack.json] [--demo] [--orders N] [--release] [--scenario outage|slow|flaky [--outage-seconds S]]\n       local-env rebuild [--stack .local/stack.json] [--target-table NAME]";

fn parse_args(mut argv: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let mut args = Args {
        template: "template.yaml".into(),
        out: ".local".into(),
        stack_name: std::env::var("STACK_NAME").unwrap_or_else(|_| "order-saga".into()),
        overrides: HashMap::new(),
        strict: false,
    };
    let mut overriding = false;
    while let Some(arg) = argv.next() {
        let mut value = || argv.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--template" => args.template = value()?.into(),
            "--out" => args.out = value()?.into(),
            "--stack-name" => args.stack_name = value()?,
            "--strict" => args.strict = true,
            "--parameter-overrides" => overriding = true,
            kv if overriding && kv.contains('=') => {
                let (k, v) = kv.split_once('=').context("K=V")?;
                args.overrides.insert(k.to_owned(), v.to_owned());
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

async fn provision(argv: impl Iterator<Item = String>) -> anyhow::Result<bool> {
    let args = parse_args(argv)?;
    // Real accounts are deployed with `sam deploy`; this tool only ever targets emulators.
    if !std::env::vars().any(|(k, _)| k.starts_with("AWS_ENDPOINT_URL")) {
        bail!("no AWS_ENDPOINT_URL* is set: local-env provisions emulators only (see `scripts/env.sh env`)");
    }
    let template = Template::load(&args.template)?;
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let region = config.region().map(ToString::to_string).unwrap_or_else(|| "us-east-1".into());
    let account_id = std::env::var("AWS_ACCOUNT_ID").unwrap_or_else(|_| "000000000000".into());
    // The providers are the simulator `local-env run` starts, unless the caller names others.
    let mut overrides = args.overrides;
    let simulator_url = format!("http://127.0.0.1:{}", local_env::providers::port()?);
    local_env::providers::point_at(&template, &simulator_url, &mut overrides);
    // The HTTP API trusts the issuer `local-env run` serves, unless the caller names another.
    local_env::issuer::point_at(&template, &local_env::issuer::url(local_env::issuer::port()?), &mut overrides);
    let options = Options { stack_name: args.stack_name, region, account_id, parameter_overrides: overrides };
    let stack = local_env::provision(&template, &options, &Clients::new(&config)).await?;
    // The providers' API key: made once, kept in SSM as on AWS (where it is made by hand).
    if let Some(name) = local_env::providers::api_key_parameter(&stack) {
        local_env::providers::ensure_api_key(&aws_sdk_ssm::Client::new(&config), &name).await?;
        println!("Providers' API key: SSM SecureString {name}");
    }
    println!("Provisioned stack {} from {}:\n{}", stack.stack_name, args.template.display(), local_env::report(&stack));
    local_env::write_outputs(&stack, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    println!("Wrote {0}/stack.json and {0}/aws.env", args.out.display());
    let strict_ok = !args.strict || stack.unsupported().is_empty();
    Ok(strict_ok && stack.failed().is_empty() && stack.unresolved.is_empty())
}

fn port(var: &str, default: u16) -> anyhow::Result<u16> {
    match std::env::var(var) {
        Ok(p) if !p.trim().is_empty() => p.trim().parse().with_context(|| format!("{var}={p}")),
        _ => Ok(default),
    }
}

async fn run(mut argv: impl Iterator<Item = String>) -> anyhow::Result<bool> {
    let (mut stack_path, mut demo, mut extra, mut profile) = (PathBuf::from(".local/stack.json"), false, None, None);
    let (mut scenario, mut outage_seconds) = (None, None);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--stack" => stack_path = argv.next().context("--stack needs a path")?.into(),
            "--demo" => demo = true,
            "--orders" => extra = Some(argv.next().context("--orders needs a number")?.parse().context("--orders")?),
            "--release" => profile = Some("release"),
            "--scenario" => scenario = Some(argv.next().context("--scenario needs outage, slow or flaky")?),
            "--outage-seconds" => {
                let seconds: f64 =
                    argv.next().context("--outage-seconds needs a number")?.parse().context("--outage-seconds")?;
                outage_seconds = Some(seconds);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    // A scenario is a demo: it places its orders, reports and exits.
    let scenario =
        scenario.map(|name| local_env::scenario::Scenario::named(&name, extra, outage_seconds)).transpose()?;
    demo |= scenario.is_some();
    let extra = extra.unwrap_or(20);
    let run_started = time::OffsetDateTime::now_utc();
    let text = std::fs::read_to_string(&stack_path)
        .with_context(|| format!("reading {} (run `scripts/env.sh up` first)", stack_path.display()))?;
    let stack: local_env::Stack = serde_json::from_str(&text).context("parsing the stack")?;
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;

    let mut options = local_env::lambda::Options::new(&stack);
    // The functions reach Lambda (the dead-letter handler replays a skipped stream batch by
    // invoking its consumer) at this service's own Invoke API.
    let lambda_port = port("LOCAL_LAMBDA_PORT", invoke_api::DEFAULT_PORT)?;
    options.aws_env.insert("AWS_ENDPOINT_URL_LAMBDA".into(), format!("http://127.0.0.1:{lambda_port}"));
    // Every request of the functions and of the SQS pollers goes through the cost meter.
    let meter = Arc::new(Meter::default());
    let metered = |env: &BTreeMap<String, String>, service: &str| {
        env.get(&format!("AWS_ENDPOINT_URL_{service}")).or(env.get("AWS_ENDPOINT_URL")).cloned()
    };
    let meter_proxies =
        intercept::endpoints(options.aws_env.iter_mut().map(|(k, v)| (k.as_str(), v)), meter.clone()).await?;
    let mut sqs = aws_sdk_sqs::config::Builder::from(&sdk);
    sqs.set_endpoint_url(metered(&options.aws_env, "SQS"));
    let mut logs = aws_sdk_cloudwatchlogs::config::Builder::from(&sdk);
    logs.set_endpoint_url(metered(&options.aws_env, "CLOUDWATCH_LOGS"));
    let (sqs, logs) =
        (aws_sdk_sqs::Client::from_conf(sqs.build()), aws_sdk_cloudwatchlogs::Client::from_conf(logs.build()));
    options.echo_logs = std::env::var("LOCAL_FUNCTION_LOGS").is_ok_and(|v| v == "stderr");
    let specs = local_env::lambda::FunctionSpec::all(&stack, options.default_concurrency)?;
    let mut crates: Vec<String> = specs.iter().map(|s| s.crate_name.clone()).collect();
    crates.sort();
    crates.dedup();
    println!("Building {} function binaries ({} profile)…", crates.len(), profile.unwrap_or("dev"));
    let built = binaries::build(&std::env::current_dir()?, &crates, profile)?;
    let log_dir = options.log_dir.clone();
    let service = LambdaService::new(&stack, &built, options, Some(logs))?;
    let lambda_api = invoke_api::serve(service.clone(), ([127, 0, 0, 1], lambda_port).into()).await?;
    println!(
        "Lambda service: {} functions, Invoke API on {} (logs in {}/)",
        specs.len(),
        lambda_api.url(),
        log_dir.display()
    );

    // The providers the functions call (the stack's provider URLs point at this port): the
    // simulator's own process, its journal started fresh for this run.
    let simulator_port = local_env::providers::port()?;
    let simulator_addr: std::net::SocketAddr = ([127, 0, 0, 1], simulator_port).into();
    let mut simulator = if local_env::providers::answering(simulator_addr).await {
        // One already serves that port (a second run, or one started by hand): use it.
        eprintln!("local-env: not starting the provider simulator, using what is on port {simulator_port}");
        None
    } else {
        // It asks for the key the functions read from SSM, as a real provider would.
        let api_key = match local_env::providers::api_key_parameter(&stack) {
            Some(name) => local_env::providers::api_key(&aws_sdk_ssm::Client::new(&sdk), &name).await?,
            None => None,
        };
        let binary = local_env::providers::simulator_binary(&std::env::current_dir()?, None)?;
        let journal = Path::new(".local/provider-simulator.jsonl");
        match std::fs::remove_file(journal) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", journal.display()));
            }
            _ => {}
        }
        match local_env::providers::SimulatorProcess::start(&binary, simulator_port, api_key, journal).await {
            Ok(simulator) => {
                println!(
                    "Provider simulator on {} (control: {0}/control/behaviour, ledger: {0}/control/ledger; \
                     journal {}, logs {})",
                    simulator.url(),
                    simulator.journal().display(),
                    simulator.log().display()
                );
                Some(simulator)
            }
            // Taken meanwhile, say: use what is there.
            Err(e) => {
                eprintln!(
                    "local-env: not serving the provider simulator, using what is on port {simulator_port}: {e:#}"
                );
                None
            }
        }
    };

    let clients = RunnerClients { sqs, streams: aws_sdk_dynamodbstreams::Client::new(&sdk) };
    // Stream positions survive the run, as an event source mapping's do: the next run does not
    // replay (and republish, restart) what this one handled.
    let checkpoints = Path::new(".local/runner").join(format!("{}-positions.json", stack.stack_name));
    let runner = Runner::new(&stack, clients, service.clone())?.with_checkpoints(checkpoints);
    for mapping in runner.mappings() {
        println!("  runs {mapping}");
    }
    for skipped in runner.skipped() {
        println!("  skips {skipped}");
    }
    let running = runner.start();
    // The issuer the HTTP API trusts, if it is the local one (its URL is fixed at provisioning).
    let issuer_port = local_env::issuer::port()?;
    let issuer = if local_env::issuer::trusted_by(&stack, &local_env::issuer::url(issuer_port)) {
        let issuer = local_env::issuer::Issuer::start(([127, 0, 0, 1], issuer_port).into()).await?;
        println!(
            "OIDC issuer on {0} (a token: curl -s -X POST {0}/token -d '{{\"sub\":\"cust-42\"}}'; \
             an operator's: add \"scope\":\"{1}\")",
            issuer.url(),
            local_env::issuer::DEFAULT_OPERATOR_SCOPE
        );
        Some(issuer)
    } else {
        None
    };
    let api =
        match local_env::http::serve(&stack, service.clone(), ([127, 0, 0, 1], port("LOCAL_API_PORT", 3000)?).into())
            .await
        {
            Ok(api) => {
                println!("HTTP API on {}", api.url());
                for route in api.routes() {
                    println!("  serves {route}");
                }
                for skipped in api.skipped() {
                    println!("  skips {skipped}");
                }
                Some(api)
            }
            // The demo does not need it; a plain run is for using it.
            Err(e) if demo => {
                eprintln!("local-env: not serving the HTTP API: {e:#}");
                None
            }
            Err(e) => {
                running.stop().await;
                service.shutdown().await;
                return Err(e);
            }
        };
    let outcome = if let Some(scenario) = &scenario {
        let target = local_env::scenario::Target {
            stack: &stack,
            service: &service,
            dynamodb: aws_sdk_dynamodb::Client::new(&sdk),
            sfn: aws_sdk_sfn::Client::new(&sdk),
            simulator: simulator_addr,
            samples: PathBuf::from("events/place-order"),
        };
        println!("\nScenario {}: {}…", scenario.name(), scenario.describe());
        Some(replay(&target, scenario).await)
    } else if demo {
        let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
        let sfn = aws_sdk_sfn::Client::new(&sdk);
        let samples = Path::new("events/place-order");
        Some(
            local_env::demo::run(
                &stack,
                &service,
                &dynamodb,
                &sfn,
                samples,
                extra,
                api.as_ref().zip(issuer.as_ref()).map(|(a, issuer)| local_env::demo::Api { addr: a.addr(), issuer }),
            )
            .await,
        )
    } else {
        println!("Running; Ctrl-C stops.");
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
        None
    };
    // What the functions wrote last (a final step's metrics) is shipped and extracted first.
    if outcome.is_some() {
        service.flush_logs().await;
    }
    let operations =
        if outcome.is_some() { Some(local_env::operations::gather(&stack, &sdk, run_started).await) } else { None };
    if let Some(api) = api {
        api.stop().await;
    }
    running.stop().await;
    lambda_api.stop();
    service.shutdown().await;
    if let Some(simulator) = simulator.as_mut() {
        simulator.stop().await;
    }
    meter_proxies.iter().for_each(|p| p.abort());
    let Some(outcome) = outcome else { return Ok(true) };
    let outcome = outcome?;
    let stats = service.stats();
    println!("\n{}", local_env::demo::function_report(&stats));
    println!("\n{}", Bill::new(outcome.orders, &meter.usage(), &stats, outcome.transitions).report());
    operations.iter().for_each(|o| println!("\n{}", local_env::operations::render(o)));
    Ok(outcome.ok)
}

/// Plays a fault scenario on the running system and prints its outcome table; ok if every order
/// completed, charged once.
async fn replay(
    target: &local_env::scenario::Target<'_>,
    scenario: &local_env::scenario::Scenario,
) -> anyhow::Result<local_env::demo::Outcome> {
    let report = local_env::scenario::run(target, scenario, "this run").await?;
    let title = format!("\nScenario {}: {}", scenario.name(), scenario.describe());
    println!("{}", local_env::scenario::table(&title, &[&report]));
    let problems = report.problems();
    for problem in &problems {
        println!("✗ {problem}");
    }
    let ok = report.ok();
    println!(
        "{}",
        if ok {
            "No order lost, charged twice, cancelled or flagged: every order completed."
        } else {
            "SOME ORDERS WERE LOST, CHARGED TWICE, CANCELLED OR FLAGGED."
        }
    );
    Ok(local_env::demo::Outcome { ok, orders: scenario.orders, transitions: report.transitions })
}

/// `local-env rebuild [--stack .local/stack.json] [--target-table NAME]`: recomputes every read
/// model from the event store into the read model table (or another one, to compare).
async fn rebuild(mut argv: impl Iterator<Item = String>) -> anyhow::Result<bool> {
    let (mut stack_path, mut target) = (PathBuf::from(".local/stack.json"), None);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--stack" => stack_path = argv.next().context("--stack needs a path")?.into(),
            "--target-table" => target = Some(argv.next().context("--target-table needs a name")?),
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let text = std::fs::read_to_string(&stack_path).with_context(|| format!("reading {}", stack_path.display()))?;
    let stack: local_env::Stack = serde_json::from_str(&text).context("parsing the stack")?;
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let events_table = stack.environment.get("EVENTS_TABLE").context("no EVENTS_TABLE")?;
    let table = match target {
        Some(t) => t,
        None => stack.environment.get("READ_MODEL_TABLE").context("no READ_MODEL_TABLE")?.clone(),
    };
    let store = shared::readmodel::store::ReadModelStore::new(dynamodb.clone(), table.clone());
    let written = shared::readmodel::store::rebuild(&dynamodb, events_table, &store).await?;
    println!("Rebuilt read models from {events_table} into {table}: {written:?}");
    Ok(true)
}

#[tokio::main]
async fn main() -> ExitCode {
    // Quiet by default: the demo prints its own report; RUST_LOG=info shows every handler's logs.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let mut argv = std::env::args().skip(1);
    let result = match argv.next().as_deref() {
        Some("provision") => provision(argv).await,
        Some("run") => run(argv).await,
        Some("rebuild") => rebuild(argv).await,
        _ => Err(anyhow::anyhow!(USAGE)),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("local-env: {e:#}");
            ExitCode::FAILURE
        }
    }
}
