//! The functions' binaries: built by cargo from the crates their `CodeUri` names (debug profile
//! by default, so a change rebuilds in seconds), found through cargo's own report of what it
//! built, never by guessing at the target directory's layout.
//!
//! `LOCAL_LAMBDA_BINARIES=<dir>` uses prebuilt binaries instead (`<dir>/<crate>` or
//! `<dir>/<crate>/bootstrap`, the layout `cargo lambda build` leaves), and builds nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use serde_json::Value;

/// Builds (or finds) the binary of every crate named, by crate name.
pub fn build(workspace: &Path, crates: &[String], profile: Option<&str>) -> anyhow::Result<HashMap<String, PathBuf>> {
    if let Some(dir) = std::env::var_os("LOCAL_LAMBDA_BINARIES").filter(|d| !d.is_empty()) {
        return prebuilt(Path::new(&dir), crates);
    }
    cargo_build(workspace, crates, profile)
}

/// Builds the binary of every crate named with cargo, by crate name, whatever
/// `LOCAL_LAMBDA_BINARIES` says.
pub fn cargo_build(
    workspace: &Path,
    crates: &[String],
    profile: Option<&str>,
) -> anyhow::Result<HashMap<String, PathBuf>> {
    let mut command = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .current_dir(workspace)
        .args(["build", "--quiet", "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // Called from a test, cargo's per-package variables of the test are in our environment;
    // passed on, they change build-script fingerprints and rebuild the SDK (minutes).
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || matches!(
                name.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            )
        {
            command.env_remove(name.as_ref());
        }
    }
    if let Some(profile) = profile {
        command.args(["--profile", profile]);
    }
    for name in crates {
        command.args(["-p", name, "--bin", name]);
    }
    let output = command.output().context("running cargo build for the functions")?;
    if !output.status.success() {
        bail!("cargo build of the functions failed ({})", output.status);
    }
    let mut found = HashMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else { continue };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(name), Some(executable)) = (message["target"]["name"].as_str(), message["executable"].as_str())
        else {
            continue;
        };
        if crates.iter().any(|c| c == name) {
            found.insert(name.to_owned(), PathBuf::from(executable));
        }
    }
    if let Some(missing) = crates.iter().find(|c| !found.contains_key(*c)) {
        bail!("cargo built no binary named {missing}");
    }
    Ok(found)
}

fn prebuilt(dir: &Path, crates: &[String]) -> anyhow::Result<HashMap<String, PathBuf>> {
    crates
        .iter()
        .map(|name| {
            let candidates = [dir.join(name), dir.join(name).join("bootstrap")];
            let binary = candidates.into_iter().find(|p| p.is_file()).with_context(|| {
                format!("LOCAL_LAMBDA_BINARIES: no {name} or {name}/bootstrap in {}", dir.display())
            })?;
            Ok((name.clone(), binary))
        })
        .collect()
}
