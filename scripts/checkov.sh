#!/usr/bin/env bash
# Scans template.yaml with checkov (offline: --skip-download) and fails on any failed check.
# A check that does not fit this design is skipped on its resource, in the template's
# `Metadata.checkov.skip`, with a one-line reason: every exception is reviewed and visible there.
# checkov runs from .local/checkov-venv, built from local/checkov-requirements.lock when missing
# or when the lock changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
LOCK="local/checkov-requirements.lock"
VENV=".local/checkov-venv"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
want="lock-sha256=$(sha256sum "$LOCK" | cut -d' ' -f1) python=$("$PY" -c 'import sys; print(sys.version.split()[0])')"
if [[ ! -x "$VENV/bin/checkov" || "$(cat "$VENV/.installed" 2>/dev/null)" != "$want" ]]; then
  echo "checkov.sh: building $VENV from $LOCK (about a minute)" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  # --no-deps: the lock is a full freeze; pip must not re-resolve.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$LOCK"
  echo "$want" >"$VENV/.installed"
fi
exec "$VENV/bin/checkov" --file template.yaml --framework cloudformation --skip-download --compact --quiet
