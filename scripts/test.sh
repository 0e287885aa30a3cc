#!/usr/bin/env bash
# Runs every test, unit and integration. The integration tests need the local emulators: this
# installs, starts and provisions them first (scripts/env.sh up), reusing what already runs.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
step() { printf '\n==> %s\n' "$*" >&2; }

step "local AWS environment: scripts/env.sh up"
scripts/env.sh up

step "template lint: cfn-lint with the serverless rules"
.local/venv/bin/cfn-lint template.yaml -a cfn_lint_serverless.rules

step "template security scan: checkov (skips, each with its reason, in the template)"
scripts/checkov.sh

step "format and lints: cargo fmt --check, cargo clippy"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test: unit and integration tests (the benchmark runs at smoke size)"
cargo test --workspace --all-targets "$@"
