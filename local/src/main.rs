//! `local-env provision [--template template.yaml] [--out .local] [--stack-name NAME]
//!  [--parameter-overrides K=V ...] [--strict]`
//!
//! Endpoints and credentials come from the standard AWS variables (`AWS_ENDPOINT_URL*`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use local_env::{Clients, Options, Template};

struct Args {
    template: PathBuf,
    out: PathBuf,
    stack_name: String,
    overrides: HashMap<String, String>,
    strict: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut argv = std::env::args().skip(1);
    match argv.next().as_deref() {
        Some("provision") => {}
        other => bail!(
            "usage: local-env provision [--template F] [--out DIR] [--stack-name N] [--parameter-overrides K=V ...] [--strict] (got {other:?})"
        ),
    }
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

async fn run() -> anyhow::Result<bool> {
    let args = parse_args()?;
    // Real accounts are deployed with `sam deploy`; this tool only ever targets emulators.
    if !std::env::vars().any(|(k, _)| k.starts_with("AWS_ENDPOINT_URL")) {
        bail!("no AWS_ENDPOINT_URL* is set: local-env provisions emulators only (see `scripts/env.sh env`)");
    }
    let template = Template::load(&args.template)?;
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let region = config.region().map(ToString::to_string).unwrap_or_else(|| "us-east-1".into());
    let account_id = std::env::var("AWS_ACCOUNT_ID").unwrap_or_else(|_| "000000000000".into());
    let options = Options { stack_name: args.stack_name, region, account_id, parameter_overrides: args.overrides };
    let stack = local_env::provision(&template, &options, &Clients::new(&config)).await?;
    println!("Provisioned stack {} from {}:\n{}", stack.stack_name, args.template.display(), local_env::report(&stack));
    local_env::write_outputs(&stack, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    println!("Wrote {0}/stack.json and {0}/aws.env", args.out.display());
    let strict_ok = !args.strict || stack.unsupported().is_empty();
    Ok(strict_ok && stack.failed().is_empty() && stack.unresolved.is_empty())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("local-env: {e:#}");
            ExitCode::FAILURE
        }
    }
}
