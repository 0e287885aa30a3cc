#!/usr/bin/env bash
# Runs the whole system locally: the emulators up and provisioned from template.yaml, every
# function of the template in the local runner (fed by its real SQS queues and DynamoDB stream),
# the sample orders of events/place-order/ placed, and each order's outcome, events and saga
# steps printed with throughput and p50/p99 latency. Exits non-zero if an order ends otherwise
# than expected.
#
#   scripts/run.sh               sample orders plus 20 more happy-path orders
#   scripts/run.sh --orders 200  more load
#   scripts/run.sh --scenario outage [--outage-seconds 30] [--orders 30]
#                                replays the payment outage scenario instead of the samples: a
#                                burst of happy-path orders while the payment gateway answers 503
#                                for the window, then its outcome table (completed / cancelled /
#                                flagged / not terminal, charged twice and refunds from the
#                                simulator's ledger, time to finish after recovery, provider calls,
#                                breaker transitions); non-zero if an order was lost, charged
#                                twice, cancelled or flagged. Also --scenario slow (charges with a
#                                p50 300 ms / p99 2.5 s tail) and --scenario flaky (30% of charges
#                                fail), 20 orders each by default.
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
