#!/usr/bin/env bash
# Runs the whole system locally: the emulators up and provisioned from template.yaml, every
# function of the template in the local runner (fed by its real SQS queues and DynamoDB stream),
# the sample orders of events/place-order/ placed, and each order's outcome, events and saga
# steps printed with throughput and p50/p99 latency. Exits non-zero if an order ends otherwise
# than expected.
#
#   scripts/run.sh               sample orders plus 20 more happy-path orders
#   scripts/run.sh --orders 200  more load
#   RUNNER_LOG=info scripts/run.sh   every handler's structured logs too
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
scripts/env.sh up
set -a
# shellcheck disable=SC1091  # written by the provisioning step
. .local/aws.env
set +a
# aws.env carries the functions' RUST_LOG (info); the report is easier to read without it.
export RUST_LOG="${RUNNER_LOG:-warn}"
cargo run --quiet -p local-env -- run --demo "$@"
