//! The external providers of a local run: the provider simulator (`simulator/`), run as a
//! process of its own beside the functions ([`SimulatorProcess`]: started, killed and restarted
//! as a real provider's servers may be, durable through its journal), and the template
//! parameters that point the functions at it. On AWS those parameters are the real providers'
//! URLs; nothing in the functions knows the difference.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::lambda::binaries;
use crate::provision::Stack;
use crate::template::Template;

/// Where `local-env run` serves the simulator unless `PROVIDER_SIMULATOR_PORT` says otherwise.
pub const DEFAULT_PORT: u16 = 4700;

/// The template parameters holding each provider's base URL.
pub const URL_PARAMETERS: [&str; 3] = ["PaymentProviderUrl", "CarrierUrl", "NotifierUrl"];

/// `PROVIDER_SIMULATOR_PORT`, or [`DEFAULT_PORT`].
pub fn port() -> anyhow::Result<u16> {
    match std::env::var("PROVIDER_SIMULATOR_PORT") {
        Ok(p) if !p.trim().is_empty() => Ok(p.trim().parse()?),
        _ => Ok(DEFAULT_PORT),
    }
}

/// Points every provider URL parameter the template has, and the caller did not set, at `url`.
pub fn point_at(template: &Template, url: &str, overrides: &mut HashMap<String, String>) {
    for name in URL_PARAMETERS.into_iter().filter(|n| template.parameters.contains_key(*n)) {
        overrides.entry(name.to_owned()).or_insert_with(|| url.to_owned());
    }
}

/// The name of the SSM parameter holding the providers' API key, as the stack's functions have
/// it (`PROVIDER_API_KEY_PARAMETER`).
pub fn api_key_parameter(stack: &Stack) -> Option<String> {
    stack.functions.values().find_map(|env| env.get("PROVIDER_API_KEY_PARAMETER").cloned())
}

/// The API key in parameter `name`, if it exists.
pub async fn api_key(ssm: &aws_sdk_ssm::Client, name: &str) -> anyhow::Result<Option<String>> {
    match ssm.get_parameter().name(name).with_decryption(true).send().await {
        Ok(answer) => Ok(answer.parameter.and_then(|p| p.value)),
        Err(e) if e.as_service_error().is_some_and(|e| e.is_parameter_not_found()) => Ok(None),
        Err(e) => Err(anyhow::anyhow!("GetParameter {name}: {}", aws_sdk_ssm::error::DisplayErrorContext(&e))),
    }
}

/// The API key in parameter `name`, made (a random one, as a SecureString) when it is missing:
/// a local stack's providers have credentials as a deployed one's do.
pub async fn ensure_api_key(ssm: &aws_sdk_ssm::Client, name: &str) -> anyhow::Result<String> {
    if let Some(key) = api_key(ssm, name).await? {
        return Ok(key);
    }
    let key = uuid::Uuid::new_v4().simple().to_string();
    put_api_key(ssm, name, &key).await?;
    Ok(key)
}

/// Sets parameter `name` to `key` (a SecureString).
pub async fn put_api_key(ssm: &aws_sdk_ssm::Client, name: &str, key: &str) -> anyhow::Result<()> {
    ssm.put_parameter()
        .name(name)
        .value(key)
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .overwrite(true)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("PutParameter {name}: {}", aws_sdk_ssm::error::DisplayErrorContext(&e)))?;
    Ok(())
}

/// The simulator's binary target (`simulator/src/main.rs`).
pub const SIMULATOR_BINARY: &str = "provider-simulator";

/// The simulator's binary: prebuilt in `LOCAL_LAMBDA_BINARIES` if it is there, else built by
/// cargo (quick once the workspace is built).
pub fn simulator_binary(workspace: &Path, profile: Option<&str>) -> anyhow::Result<PathBuf> {
    let crates = [SIMULATOR_BINARY.to_owned()];
    let prebuilt = std::env::var_os("LOCAL_LAMBDA_BINARIES").is_some_and(|d| !d.is_empty());
    let mut built = match prebuilt.then(|| binaries::build(workspace, &crates, profile)) {
        Some(Ok(found)) => found,
        _ => binaries::cargo_build(workspace, &crates, profile)?,
    };
    built.remove(SIMULATOR_BINARY).context("cargo reported no provider-simulator binary")
}

/// Whether something accepts connections on `addr` (within half a second).
pub async fn answering(addr: SocketAddr) -> bool {
    let connect = tokio::net::TcpStream::connect(addr);
    matches!(tokio::time::timeout(Duration::from_millis(500), connect).await, Ok(Ok(_)))
}

/// How long the simulator may take to say where it listens and to answer `/health`.
const READY_WITHIN: Duration = Duration::from_secs(15);
/// How long [`SimulatorProcess::stop`] waits after SIGTERM before it kills.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The provider simulator as a process of its own, on the loopback address: its journal keeps
/// what it answered, so it can be killed (a crash) and restarted on the same port, asking for the
/// same API key, and answer a repeated idempotency key as it did before the crash. Its logs go to
/// [`Self::log`]. Dropping the handle kills the process.
#[derive(Debug)]
pub struct SimulatorProcess {
    binary: PathBuf,
    api_key: Option<String>,
    journal: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
    child: Option<Child>,
}

impl SimulatorProcess {
    /// Starts `binary` on `port` (0: any free one) of 127.0.0.1, asking callers for `api_key`
    /// (passed in its environment, not its arguments), keeping its answers in `journal` (its log
    /// beside it, `.log`); returns once it answers `GET /health`.
    pub async fn start(binary: &Path, port: u16, api_key: Option<String>, journal: &Path) -> anyhow::Result<Self> {
        let log = journal.with_extension("log");
        let (child, addr) = spawn(binary, port, api_key.as_deref(), journal, &log).await?;
        Ok(Self { binary: binary.to_owned(), api_key, journal: journal.to_owned(), log, addr, child: Some(child) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, `http://127.0.0.1:PORT` (the same across restarts).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn journal(&self) -> &Path {
        &self.journal
    }

    /// Where the process's logs (stderr) go, across restarts.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The crash: SIGKILL, no chance to finish anything, and waits for the process to end.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("killing the provider simulator")?;
        }
        Ok(())
    }

    /// Starts it again (stopping it first if it runs): the same port, API key and journal.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        // The port was just released; give a slow release a moment.
        let mut tries = 0;
        let (child, addr) = loop {
            tries += 1;
            match spawn(&self.binary, self.addr.port(), self.api_key.as_deref(), &self.journal, &self.log).await {
                Ok(started) => break started,
                Err(e) if tries < 5 => {
                    tracing::warn!(error = %format!("{e:#}"), "restarting the provider simulator: trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.addr = addr;
        self.child = Some(child);
        Ok(())
    }

    /// SIGTERM (it lets in-flight requests finish), then waits; kills it if it takes longer than
    /// a few seconds.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if terminate(&child) {
            match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                Ok(Ok(_)) => return,
                Ok(Err(e)) => tracing::warn!(error = %e, "waiting for the provider simulator"),
                Err(_) => tracing::warn!("provider simulator still running {STOP_GRACE:?} after SIGTERM: killing it"),
            }
        }
        if let Err(e) = child.kill().await {
            tracing::warn!(error = %e, "killing the provider simulator");
        }
    }
}

#[cfg(unix)]
fn terminate(child: &Child) -> bool {
    let Some(pid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) else { return false };
    // SAFETY: kill(2) with a pid of our own child, not yet reaped (its id is still known).
    unsafe { libc::kill(pid, libc::SIGTERM) == 0 }
}

#[cfg(not(unix))]
fn terminate(_child: &Child) -> bool {
    false
}

/// Spawns the simulator, learns its address from its one stdout line and waits for `/health`.
async fn spawn(
    binary: &Path,
    port: u16,
    api_key: Option<&str>,
    journal: &Path,
    log: &Path,
) -> anyhow::Result<(Child, SocketAddr)> {
    if let Some(dir) = journal.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut command = Command::new(binary);
    command
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--journal"])
        .arg(journal)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true);
    match api_key {
        Some(key) => command.env("PROVIDER_SIMULATOR_API_KEY", key),
        None => command.env_remove("PROVIDER_SIMULATOR_API_KEY"),
    };
    let mut child = command.spawn().with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("the simulator's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = match tokio::time::timeout(READY_WITHIN, lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        Ok(ended) => {
            let status = child.wait().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            let error = ended.err().map(|e| format!(" ({e})")).unwrap_or_default();
            bail!("the provider simulator ended before listening{error}, {status}:\n{}", tail(log));
        }
        Err(_) => {
            let _ = child.kill().await;
            bail!("the provider simulator did not say where it listens within {READY_WITHIN:?}:\n{}", tail(log));
        }
    };
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on http://")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("the provider simulator said {line:?}, not `listening on http://ADDR`"))?;
    // Nothing more is expected on stdout; it is read to its end, so a stray line cannot block it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    loop {
        if let Ok(answer) = crate::http_client().get(format!("http://{addr}/health")).send().await
            && answer.status() == 200
        {
            return Ok((child, addr));
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("the provider simulator ended ({status}):\n{}", tail(log));
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill().await;
            bail!("the provider simulator on {addr} did not answer /health within {READY_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last lines of a log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}
