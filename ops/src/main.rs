//! Operators' command line. It calls AWS directly with the usual credentials and the stack's
//! table names from the environment (`EVENTS_TABLE`, `COMMANDS_TABLE`, `SNAPSHOTS_TABLE`,
//! `READ_MODEL_TABLE`), so it works the same against a deployed stack and against the local
//! environment (`--env-file .local/aws.env`, written by `scripts/env.sh up`).
//!
//! ```text
//! cargo run -p ops -- --env-file .local/aws.env dead-letters list --status parked
//! cargo run -p ops -- --env-file .local/aws.env dead-letters show <id>
//! cargo run -p ops -- --env-file .local/aws.env dead-letters redrive <id> --by ana
//! cargo run -p ops -- --env-file .local/aws.env dead-letters discard <id> --by ana --note "test order"
//! cargo run -p ops -- --env-file .local/aws.env orders retry-compensations <order-id>
//! cargo run -p ops -- --env-file .local/aws.env orders resolve <order-id> --note "refunded by hand"
//! ```
//!
//! Every action is an event on the dead letter's stream, naming who took it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use handle_dead_letters::{DeadLetterHandler, SnsNotifier, SqsQueues, StreamReplayer};
use shared::adapters::dynamodb::readmodels::ReadModelStore;
use shared::adapters::dynamodb::{DynamoEventStore, EventStoreConfig};
use shared::aggregate::Repository;
use shared::domain::dead_letter::Status;
use shared::readmodel::dead_letters::{DeadLetterView, dead_letter_key};
use shared::retry::RetryPolicy;

#[derive(Parser)]
#[command(name = "ops", about = "Operate the order saga: dead letters.")]
struct Cli {
    /// A file of KEY='value' lines to load into the environment first (`.local/aws.env`).
    #[arg(long, global = true)]
    env_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Dead letters: what failed, why, and what was done about it.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Orders flagged for manual action (a compensation kept failing).
    #[command(subcommand)]
    Orders(Orders),
}

#[derive(Subcommand)]
enum Orders {
    /// Runs the order's compensations again (after fixing the cause) in a new saga execution.
    RetryCompensations {
        order_id: String,
        #[arg(long, env = "USER")]
        by: String,
        /// The order saga's state machine.
        #[arg(long, env = "ORDER_SAGA_ARN")]
        saga: String,
    },
    /// Marks a flagged order settled by hand (final), saying how.
    Resolve {
        order_id: String,
        #[arg(long, env = "USER")]
        by: String,
        #[arg(long)]
        note: String,
    },
}

#[derive(Subcommand)]
enum DeadLetters {
    /// Lists dead letters, newest first (by status).
    List {
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Shows one dead letter: the view, its history and the original body.
    Show { id: String },
    /// Sends it back to the queue it came from, now.
    Redrive {
        id: String,
        /// Who is acting (recorded on the dead letter).
        #[arg(long, env = "USER")]
        by: String,
    },
    /// Drops it, saying why.
    Discard {
        id: String,
        #[arg(long, env = "USER")]
        by: String,
        #[arg(long)]
        note: String,
    },
    /// Marks it dealt with (by hand, or by a rebuild), saying how.
    Resolve {
        id: String,
        #[arg(long, env = "USER")]
        by: String,
        #[arg(long)]
        note: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum StatusArg {
    Pending,
    Redriven,
    Parked,
    Discarded,
    Resolved,
}

impl From<StatusArg> for Status {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Pending => Status::Pending,
            StatusArg::Redriven => Status::Redriven,
            StatusArg::Parked => Status::Parked,
            StatusArg::Discarded => Status::Discarded,
            StatusArg::Resolved => Status::Resolved,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(file) = &cli.env_file {
        load_env_file(file)?;
    }
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let models = ReadModelStore::from_vars(dynamodb.clone(), &shared::config::process_env)?;
    let handler = DeadLetterHandler {
        repo: Repository::new(DynamoEventStore::new(dynamodb, EventStoreConfig::from_env()?)),
        queues: SqsQueues::new(aws_sdk_sqs::Client::new(&sdk)),
        // Operators act; nobody needs telling.
        notifier: SnsNotifier { client: aws_sdk_sns::Client::new(&sdk), topic_arn: String::new() },
        tasks: aws_sdk_sfn::Client::new(&sdk),
        replayer: StreamReplayer {
            streams: aws_sdk_dynamodbstreams::Client::new(&sdk),
            lambda: aws_sdk_lambda::Client::new(&sdk),
            region: sdk.region().map(ToString::to_string).unwrap_or_default(),
        },
        policy: RetryPolicy { max_attempts: 0, base_delay: Duration::ZERO, max_delay: Duration::ZERO },
    };
    let command = match cli.command {
        Command::DeadLetters(command) => command,
        Command::Orders(Orders::RetryCompensations { order_id, by, saga }) => {
            let sfn = aws_sdk_sfn::Client::new(&sdk);
            let execution = handler.retry_compensations(&order_id, &by, &sfn, &saga).await?;
            println!("{order_id}: compensations running again in {execution}");
            return Ok(());
        }
        Command::Orders(Orders::Resolve { order_id, by, note }) => {
            handler.resolve_order(&order_id, &by, &note).await?;
            println!("{order_id}: resolved by {by}");
            return Ok(());
        }
    };
    match command {
        DeadLetters::List { status, limit } => {
            let found = models.dead_letters(status.map(Status::from), limit).await?;
            println!(
                "{:<38} {:<10} {:<11} {:<28} {:<5} QUEUE / REASON",
                "ID", "STATUS", "FAILURE", "LAST SEEN", "SEEN"
            );
            for d in &found {
                let queue = d.dead_letter_queue.rsplit(':').next().unwrap_or_default();
                let failure = d.failure.map(|f| format!("{f:?}")).unwrap_or_default();
                let reason: String = d.reason.chars().take(100).collect();
                println!(
                    "{:<38} {:<10} {:<11} {:<28} {:<5} {queue}: {reason}",
                    d.dead_letter_id,
                    d.status.as_str(),
                    failure,
                    d.last_seen,
                    d.times_seen
                );
            }
            eprintln!("{} dead letter(s)", found.len());
        }
        DeadLetters::Show { id } => {
            let state = handler.load(&id).await?;
            let view = models.get::<DeadLetterView>(&dead_letter_key(&id)).await?.map(|(v, _)| v);
            let shown = serde_json::json!({
                "deadLetter": state,
                "history": view.map(|v| v.history),
            });
            println!("{}", serde_json::to_string_pretty(&shown)?);
        }
        DeadLetters::Redrive { id, by } => {
            let outcome = handler.redrive_by_operator(&id, &by).await?;
            println!("{outcome:?}");
        }
        DeadLetters::Discard { id, by, note } | DeadLetters::Resolve { id, by, note } if note.trim().is_empty() => {
            bail!("{id}: --note must say why (by {by})")
        }
        DeadLetters::Discard { id, by, note } => {
            let state = handler.settle_by_operator(&id, &by, true, &note).await?;
            println!("{id}: {}", state.status.as_str());
        }
        DeadLetters::Resolve { id, by, note } => {
            let state = handler.settle_by_operator(&id, &by, false, &note).await?;
            println!("{id}: {}", state.status.as_str());
        }
    }
    Ok(())
}

/// `KEY='value'` lines (as `scripts/env.sh` and `local-env provision` write them), `#` comments.
fn load_env_file(path: &PathBuf) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let Some((key, value)) = line.split_once('=') else { bail!("{}: not KEY=value: {line}", path.display()) };
        let value = value.trim_matches('\'').trim_matches('"');
        // SAFETY: single-threaded at this point: before the runtime's first task touches the environment.
        unsafe { std::env::set_var(key.trim(), value) };
    }
    Ok(())
}
