#!/usr/bin/env bash
# Runs every test: the generated-code check, the Swift unit and socket suites, the release build
# the container image ships, the benchmark smoke run and the node-restart storm, a short fuzzing
# run, and the pytest suites (real Envoys end to end, faults, a short soak, Deploy/ checks).
# Installs what it needs (apt, project-local .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"

scripts/install-deps.sh
scripts/check-generated.sh
scripts/setup-venv.sh

echo "== swift test" >&2
swift build --build-tests
swift test --skip-build

echo "== release build (the container image's build stage: Deploy/Dockerfile)" >&2
scripts/build-release.sh run/release

echo "== benchmark smoke run (full: scripts/bench.sh)" >&2
scripts/bench.sh --smoke

echo "== node-restart storm: 300 clients, one connection each, all at once; any failure fails" >&2
scripts/bench.sh --smoke --storm 300

echo "== fuzzing: the seed corpus replayed, then 10 s per libFuzzer target (long run: scripts/fuzz.sh)" >&2
"$(swift build --show-bin-path)/sds-agent-fuzz" replay Fuzz/corpus/*
# The release scratch folder: its C modules (BoringSSL) are already built and need no
# instrumentation, so only the Swift modules are compiled again, with -sanitize=fuzzer.
SDS_FUZZ_SCRATCH=${SDS_RELEASE_SCRATCH:-.build-release} scripts/fuzz.sh --seconds 10

echo "== end-to-end with real Envoys" >&2
swift build --product sds-agent
SDS_AGENT_BIN="$(swift build --show-bin-path)/sds-agent" ENVOY_BIN="$PWD/.venv/bin/envoy" \
  .venv/bin/python -m pytest -q -p no:cacheprovider Tests/EndToEnd "$@"
