#!/usr/bin/env bash
# The agent's main job on its embedded defaults, on one machine, no cluster:
# builds sds-agent, signs dev service-account tokens, starts the agent (embedded CA), then two
# real Envoys from envoy-bootstrap/, and sends a request through them over mutual TLS.
# Pass --keep-running to leave everything up until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"
scripts/install-deps.sh
scripts/setup-venv.sh
echo "building sds-agent (the first build takes a few minutes)..." >&2
swift build --product sds-agent >&2
exec .venv/bin/python scripts/quickstart.py --agent "$(swift build --show-bin-path)/sds-agent" "$@"
