//! `local-env`: the local AWS environment's command line (`--help` for each subcommand).
//!
//! - `provision` creates the template's resources on the emulators and writes `.local/`;
//! - `run` builds every function's binary and runs it in the local Lambda service, fed from its
//!   event sources as Lambda would, with the HTTP API, the Invoke API, the OIDC issuer and the
//!   provider simulator; `--demo` places the sample orders and reports, `--scenario` replays a
//!   payment provider fault (`local_env::scenario`);
//! - `rebuild` recomputes every read model from the event store.
//!
//! Endpoints and credentials come from the standard AWS variables (`AWS_ENDPOINT_URL*`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use local_env::lambda::{LambdaService, binaries, intercept, invoke_api};
use local_env::meter::{Bill, Meter};
use local_env::runner::{Runner, RunnerClients};
use local_env::scenario::Scenario;
use local_env::{Clients, Options, Template};

#[derive(Parser)]
#[command(
    name = "local-env",
    about = "The local AWS environment, derived from template.yaml: provisions the emulators and runs the functions.",
    after_help = "Endpoints and credentials come from the standard AWS variables (AWS_ENDPOINT_URL*, AWS_REGION…): \
                  `scripts/env.sh env` prints them, `.local/aws.env` holds them once provisioned.",
    subcommand_required = true,
    arg_required_else_help = true,
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Creates the template's resources on the emulators and writes `<out>/stack.json` and
    /// `<out>/aws.env`.
    ///
    /// Fails if a resource failed or a value could not be resolved (and, with --strict, if a
    /// resource type is not supported locally).
    Provision(ProvisionArgs),
    /// Builds every function's binary and runs it in the local Lambda service, fed from its
    /// event sources as Lambda would.
    ///
    /// With --demo, places the sample orders of events/place-order/ (plus --orders more),
    /// reports and exits. With --scenario (a demo too) it replays a payment provider fault
    /// instead: a burst of --orders happy-path orders (30 for an outage, 20 otherwise) while the
    /// gateway is down for --outage-seconds (30), slow, or flaky; it prints the outcome table and
    /// fails if an order was lost, charged twice, cancelled or flagged.
    #[command(after_help = RUN_ENVIRONMENT)]
    Run(RunArgs),
    /// Recomputes every read model from the event store into the read model table (or another
    /// one, to compare).
    Rebuild(RebuildArgs),
}

const RUN_ENVIRONMENT: &str = "Environment:
  LOCAL_API_PORT           the HTTP API, behind its JWT authorizer (default 3000)
  LOCAL_ISSUER_PORT        the local OIDC issuer the authorizer trusts (default 9400)
  LOCAL_LAMBDA_PORT        Lambda's Invoke API (default 9001)
  PROVIDER_SIMULATOR_PORT  the provider simulator (default 4700)
  LOCAL_LAMBDA_BINARIES    a directory of prebuilt function binaries (e.g. target/lambda)
  LOCAL_FUNCTION_LOGS      `stderr` prints every function's log lines too
  RUST_LOG                 local-env's own log level (default warn)";

#[derive(Args)]
struct ProvisionArgs {
    /// The SAM template.
    #[arg(long, value_name = "FILE", default_value = "template.yaml")]
    template: PathBuf,
    /// Where stack.json and aws.env are written.
    #[arg(long, value_name = "DIR", default_value = ".local")]
    out: PathBuf,
    /// The stack's name.
    #[arg(long, value_name = "NAME", env = "STACK_NAME", default_value = "order-saga")]
    stack_name: String,
    /// Template parameters.
    #[arg(long, value_name = "K=V", num_args = 0.., value_parser = key_value)]
    parameter_overrides: Vec<(String, String)>,
    /// Fails if a resource type is not supported locally.
    #[arg(long)]
    strict: bool,
}

/// `K=V`, split at the first `=`.
fn key_value(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or_else(|| format!("{text} is not K=V"))?;
    Ok((k.to_owned(), v.to_owned()))
}

#[derive(Args)]
struct RunArgs {
    /// The provisioned stack (what `provision` wrote).
    #[arg(long, value_name = "FILE", default_value = ".local/stack.json")]
    stack: PathBuf,
    /// Places the sample orders (and --orders more), reports and exits.
    #[arg(long)]
    demo: bool,
    /// Happy-path orders placed besides the samples (default 20), or the scenario's burst.
    #[arg(long, value_name = "N")]
    orders: Option<usize>,
    /// Builds the functions' binaries with the release profile.
    #[arg(long)]
    release: bool,
    /// Replays a payment provider fault instead of the samples.
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(Scenario::NAMES))]
    scenario: Option<String>,
    /// How long the outage scenario's gateway is down (default 30).
    #[arg(long, value_name = "S")]
    outage_seconds: Option<f64>,
}

#[derive(Args)]
struct RebuildArgs {
    /// The provisioned stack (what `provision` wrote).
    #[arg(long, value_name = "FILE", default_value = ".local/stack.json")]
    stack: PathBuf,
    /// The table to write the read models to (default: the stack's READ_MODEL_TABLE).
    #[arg(long, value_name = "NAME")]
    target_table: Option<String>,
}

/// The stack `provision` wrote.
fn load_stack(path: &Path) -> anyhow::Result<local_env::Stack> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {} (run `scripts/env.sh up` first)", path.display()))?;
    serde_json::from_str(&text).context("parsing the stack")
}

async fn provision(args: ProvisionArgs) -> anyhow::Result<bool> {
    // Real accounts are deployed with `sam deploy`; this tool only ever targets emulators.
    if !std::env::vars().any(|(k, _)| k.starts_with("AWS_ENDPOINT_URL")) {
        bail!("no AWS_ENDPOINT_URL* is set: local-env provisions emulators only (see `scripts/env.sh env`)");
    }
    let template = Template::load(&args.template)?;
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let region = config.region().map(ToString::to_string).unwrap_or_else(|| "us-east-1".into());
    let account_id = std::env::var("AWS_ACCOUNT_ID").unwrap_or_else(|_| "000000000000".into());
    // The providers are the simulator `local-env run` starts, unless the caller names others.
    let mut overrides = args.parameter_overrides.into_iter().collect();
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

async fn run(args: RunArgs) -> anyhow::Result<bool> {
    let RunArgs { stack, mut demo, orders, release, scenario, outage_seconds } = args;
    let profile = release.then_some("release");
    // A scenario is a demo: it places its orders, reports and exits.
    let scenario = scenario.map(|name| Scenario::named(&name, orders, outage_seconds)).transpose()?;
    demo |= scenario.is_some();
    let extra = orders.unwrap_or(20);
    let run_started = time::OffsetDateTime::now_utc();
    let stack = load_stack(&stack)?;
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
            api: api.as_ref().zip(issuer.as_ref()).map(|(a, issuer)| local_env::demo::Api { addr: a.addr(), issuer }),
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

/// Recomputes every read model from the event store into the read model table (or another one).
async fn rebuild(args: RebuildArgs) -> anyhow::Result<bool> {
    let stack = load_stack(&args.stack)?;
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let events_table = stack.environment.get("EVENTS_TABLE").context("no EVENTS_TABLE")?;
    let table = match args.target_table {
        Some(t) => t,
        None => stack.environment.get("READ_MODEL_TABLE").context("no READ_MODEL_TABLE")?.clone(),
    };
    let store = shared::adapters::dynamodb::readmodels::ReadModelStore::new(dynamodb.clone(), table.clone());
    let written = shared::adapters::dynamodb::readmodels::rebuild(&dynamodb, events_table, &store).await?;
    println!("Rebuilt read models from {events_table} into {table}: {written:?}");
    Ok(true)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Quiet by default: the demo prints its own report; RUST_LOG=info shows every handler's logs.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let result = match cli.command {
        Command::Provision(args) => provision(args).await,
        Command::Run(args) => run(args).await,
        Command::Rebuild(args) => rebuild(args).await,
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("local-env").chain(args.iter().copied())).map(|cli| cli.command)
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn provision_reads_what_env_sh_and_the_readme_pass() {
        // Given env.sh's and the README's provisioning command lines
        let Ok(Command::Provision(args)) = parse(&["provision", "--template", "template.yaml", "--out", ".local"])
        else {
            panic!("provision")
        };
        assert_eq!((args.template, args.out), ("template.yaml".into(), ".local".into()));
        assert!(!args.strict && args.parameter_overrides.is_empty());

        // When overrides follow --parameter-overrides, with flags after them and the flag again
        let line = [
            "provision",
            "--stack-name",
            "s",
            "--parameter-overrides",
            "A=1",
            "Url=http://x/?q=1",
            "--strict",
            "--parameter-overrides",
            "B=",
        ];
        let Ok(Command::Provision(args)) = parse(&line) else { panic!("provision") };

        // Then every K=V is kept, split at its first `=`
        let overrides: Vec<(&str, &str)> =
            args.parameter_overrides.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(overrides, [("A", "1"), ("Url", "http://x/?q=1"), ("B", "")]);
        assert!(args.strict);
        assert_eq!(args.stack_name, "s");
        assert!(parse(&["provision", "--parameter-overrides", "novalue"]).is_err());
        assert!(parse(&["provision", "--unknown"]).is_err());
    }

    #[test]
    fn run_reads_what_run_sh_and_the_readme_pass() {
        // Given run.sh's command lines (`run --demo "$@"`)
        let Ok(Command::Run(args)) = parse(&["run", "--demo"]) else { panic!("run") };
        assert!(args.demo && !args.release);
        assert_eq!(
            (args.stack, args.orders, args.scenario, args.outage_seconds),
            (".local/stack.json".into(), None, None, None)
        );

        // When a scenario is asked for, with its burst and window
        let line = ["run", "--demo", "--scenario", "outage", "--outage-seconds", "12.5", "--orders", "40", "--release"];
        let Ok(Command::Run(args)) = parse(&line) else { panic!("run") };

        // Then each is read, and a scenario that does not exist is refused
        assert_eq!(
            (args.scenario.as_deref(), args.outage_seconds, args.orders),
            (Some("outage"), Some(12.5), Some(40))
        );
        assert!(args.release);
        assert!(parse(&["run", "--scenario", "meteor"]).is_err());
        assert!(parse(&["run", "--orders", "many"]).is_err());
        let Ok(Command::Run(args)) = parse(&["run", "--stack", "a.json", "--stack", "b.json"]) else { panic!("run") };
        assert_eq!(args.stack, PathBuf::from("b.json"), "the last one counts");
    }

    #[test]
    fn rebuild_reads_its_target_table() {
        let Ok(Command::Rebuild(args)) = parse(&["rebuild", "--target-table", "T"]) else { panic!("rebuild") };
        assert_eq!((args.stack, args.target_table.as_deref()), (".local/stack.json".into(), Some("T")));
        assert!(parse(&[]).is_err(), "a subcommand is required");
    }
}
