#!/usr/bin/env bash
# reliability.sh [--full]: the runs behind RELIABILITY.md, on the release binary the image ships.
#   scripts/reliability.sh          the quick forms (what CI runs inside scripts/test.sh): ~5 min
#   scripts/reliability.sh --full   agent down 60 s, a 10-minute soak, a storm of 1,000, and
#                                   30 minutes of fuzzing per target: about 3 hours
# Prints every number RELIABILITY.md quotes; the pytest output goes to run/reliability.log too.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"

full=0
[ "${1:-}" = "--full" ] && full=1

scripts/install-deps.sh
scripts/setup-venv.sh
scripts/build-release.sh run/release >/dev/null
mkdir -p run
if [ "$full" = 1 ]; then
  export SDS_FAULT_DOWN_SECONDS=60 SDS_SOAK_SECONDS=600
  storm=1000 fuzz_seconds=1800
else
  storm=300 fuzz_seconds=10
fi

echo "== faults, attacks and soak with real Envoys (release agent)" >&2
SDS_AGENT_BIN="$PWD/run/release/bin/sds-agent" ENVOY_BIN="$PWD/.venv/bin/envoy" \
  .venv/bin/python -m pytest -q -s -p no:cacheprovider Tests/EndToEnd/test_hostile_input.py \
  Tests/EndToEnd/test_reliability.py Tests/EndToEnd/test_faults.py Tests/EndToEnd/test_soak.py 2>&1 \
  | grep -v '^[IWE][0-9]\{4\} ' | tee run/reliability.log

echo "== node-restart storm: $storm clients" >&2
scripts/bench.sh --smoke --storm "$storm"

echo "== fuzzing: $fuzz_seconds s per target" >&2
scripts/fuzz.sh --seconds "$fuzz_seconds"
