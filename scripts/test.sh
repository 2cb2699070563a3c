#!/usr/bin/env bash
# Runs every test: the generated-code check, the Swift unit and socket suites, the release build
# the container image ships, the benchmark smoke run and the node-restart storm, the pytest suites
# (real Envoys end to end, faults, a short soak, Deploy/ checks) against the image's binary, the
# fuzz corpus replayed and 6 s per libFuzzer target. Installs what it needs (apt, project-local
# .venv). Extra arguments go to pytest. Each phase's time is printed at the end.
#
# One compile of the dependencies: the release build (scripts/release-flags.sh) serves the Swift
# suites, the corpus replay, the benchmark and the image, which links the Swift runtime statically
# at link time alone (Package.swift). The libFuzzer build reuses it in the same scratch and
# recompiles only this package's modules (SDS_FUZZ=1), once nothing needs the release build there
# any more: at the lowest CPU priority beside the end-to-end suites, which run three test files at a
# time against the stripped binary in run/release. The virtualenv downloads during the compile.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"
source scripts/release-flags.sh
mkdir -p run

phases=()
started=$(date +%s)
report() {
  local status=$?
  echo >&2
  echo "== phases" >&2
  printf '  %s\n' "${phases[@]}" >&2
  printf '  %-60s %5d s\n' "total$([ "$status" = 0 ] || echo " (failed)")" $(( $(date +%s) - started )) >&2
}
trap report EXIT
# phase NAME COMMAND...: runs COMMAND, records how long it took, and returns its status (also
# where `set -e` does not apply, as on the left of `||`).
phase() {
  local name=$1 start status=0
  shift
  echo "== $name" >&2
  start=$(date +%s)
  "$@" || status=$?
  phases+=("$(printf '%-60s %5d s%s' "$name" $(( $(date +%s) - start )) "$([ "$status" = 0 ] || echo " (failed: $status)")")")
  return "$status"
}

phase "install tools, check generated code and scripts" \
  bash -c 'scripts/install-deps.sh && scripts/check-generated.sh && for f in scripts/*.sh .ci/run; do bash -n "$f"; done'
# The virtualenv (a real Envoy, pytest) and the older Envoy minors of the compatibility suite
# download while the compiler works.
(scripts/setup-venv.sh && scripts/setup-envoys.sh) > run/setup-venv.log 2>&1 &
venv_pid=$!

# The products first, then the tests on the same objects: without testable imports (no test
# uses them) the modules are compiled once, with the flags the image's build uses.
phase "release build (every module, once)" swift build "${release_flags[@]}"
phase "fuzz corpus replayed (plain build)" "$(swift build "${release_flags[@]}" --show-bin-path)/sds-agent-fuzz" replay Fuzz/corpus/*

# bench.sh and build-release.sh find their products built; the image build recompiles only the
# module that carries the commit. Both before `swift test`: after it, SwiftPM compiled
# SwiftProtobuf again for the next `swift build --product` (~60 s, seen in the phase times).
phase "benchmark smoke run (full: scripts/bench.sh)" scripts/bench.sh --smoke
phase "node-restart storm: 300 clients at once, any failure fails" scripts/bench.sh --smoke --storm 300
phase "CA key in a SoftHSM token: issuance smoke run" scripts/bench.sh --pkcs11 --smoke
phase "release image build (Deploy/Dockerfile's recipe)" scripts/build-release.sh run/release
phase "swift test (Swift unit and socket suites, release build)" swift test "${release_flags[@]}" --disable-testable-imports
phase "python virtualenv and the Envoy minors ready" wait "$venv_pid" || { cat run/setup-venv.log >&2; exit 1; }

# The libFuzzer build beside the end-to-end suites, which use the stripped copy in run/release.
fuzz_log=run/fuzz-build.log
nice -n 19 scripts/fuzz.sh --build-only > "$fuzz_log" 2>&1 &
fuzz_pid=$!
# Three test files at a time on two cores: the suites mostly wait on Envoys, agents and clocks
# (measured: 214 s with three against 288 s with two, the same 202 tests all passing).
e2e() {
  SDS_AGENT_BIN="$PWD/run/release/bin/sds-agent" ENVOY_BIN="$PWD/.venv/bin/envoy" \
    .venv/bin/python -m pytest -q -p no:cacheprovider -n 3 --dist loadfile Tests/EndToEnd "$@"
}
e2e_status=0
phase "end to end with real Envoys (the image's binary)" e2e "$@" || e2e_status=$?
build_status=0
phase "libFuzzer build (what is left of it after the suites)" wait "$fuzz_pid" || build_status=$?
[ "$build_status" = 0 ] || { tail -60 "$fuzz_log" >&2; exit 1; }
[ "$e2e_status" = 0 ] || exit "$e2e_status"
phase "fuzzing: 6 s per libFuzzer target (long run: scripts/fuzz.sh)" scripts/fuzz.sh --built --seconds 6
