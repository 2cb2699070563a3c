#!/usr/bin/env bash
# Fails when Protos/ changed since Sources/EnvoyAPI was generated (cheap: no plugin build).
# With --print, prints the checksum that scripts/generate-protos.sh records.
set -euo pipefail
cd "$(dirname "$0")/.."

sum=$( (cd Protos && find . -name '*.proto' | LC_ALL=C sort | xargs sha256sum) | sha256sum | cut -d' ' -f1)
if [ "${1:-}" = "--print" ]; then echo "$sum"; exit 0; fi

recorded=$(cat Sources/EnvoyAPI/PROTOS.sha256 2>/dev/null || true)
if [ "$sum" != "$recorded" ]; then
  echo "Sources/EnvoyAPI is stale: Protos/ changed since it was generated." >&2
  echo "Run scripts/generate-protos.sh and commit the result." >&2
  exit 1
fi
echo "generated code matches Protos/ ($sum)"
