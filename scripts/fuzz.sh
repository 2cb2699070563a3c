#!/usr/bin/env bash
# fuzz.sh [--seconds N | --runs N] [TARGET...]: builds the libFuzzer targets (Fuzz/sds-agent-fuzz,
# this package's Swift modules instrumented with -sanitize=fuzzer) and runs each TARGET (default: all of
# token sotw delta csr config tls) from the seed corpus in Fuzz/corpus/TARGET, printing the totals.
#   scripts/fuzz.sh --seconds 10          CI's short run
#   scripts/fuzz.sh --seconds 1800        the long run (30 minutes a target; RELIABILITY.md)
#   scripts/fuzz.sh --runs 10000000 csr   ten million executions of one target
#   scripts/fuzz.sh --build-only          only the instrumented build (test.sh runs it early)
#   scripts/fuzz.sh --built --seconds 6   no build: test.sh built it already (a second `swift build`
#                                         with SDS_FUZZ=1 recompiled SwiftProtobuf, ~40 s, for nothing)
# New inputs go to run/fuzz/TARGET (not into the repo: add the interesting ones to Fuzz/corpus by
# hand). A crash stops the run, leaves its input in run/fuzz/, prints it, and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"

limit=(-max_total_time=30)
targets=()
build_only=false
build=true
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) limit=("-max_total_time=$2"); shift 2 ;;
    --runs) limit=("-runs=$2"); shift 2 ;;
    --build-only) build_only=true; shift ;;
    --built) build=false; shift ;;
    -*) echo "usage: fuzz.sh [--seconds N | --runs N | --build-only | --built] [TARGET...]" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(token sotw delta csr config tls)

# The flags (scripts/release-flags.sh, with the release build's scratch unless SDS_FUZZ_SCRATCH
# names another); SDS_FUZZ=1 makes Package.swift instrument this package's modules.
source scripts/release-flags.sh
flags=("${fuzz_flags[@]}")
export SDS_FUZZ=1
$build && swift build "${flags[@]}" --product sds-agent-fuzz
fuzzer="$(swift build "${flags[@]}" --show-bin-path)/sds-agent-fuzz"
$build_only && exit 0

summary=()
for target in "${targets[@]}"; do
  work="run/fuzz/$target"
  mkdir -p "$work"
  log="run/fuzz/$target.log"
  echo "== fuzz $target (${limit[*]})" >&2
  status=0
  SDS_FUZZ_TARGET="$target" "$fuzzer" "$work" "Fuzz/corpus/$target" "${limit[@]}" -max_len=4096 -timeout=10 \
    -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$work/" >"$log" 2>&1 || status=$?
  runs=$(awk '/stat::number_of_executed_units/ {print $NF}' "$log" | tail -1)
  seconds=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | awk '{print $5}' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  units=$(ls "$work" | grep -vc '^crash-\|^timeout-\|^oom-\|^leak-' || true)
  if [ "$status" != 0 ]; then
    echo "fuzz $target FAILED (exit $status); its input and log:" >&2
    ls "$work" | grep '^crash-\|^timeout-\|^oom-' >&2 || true
    tail -40 "$log" >&2
    exit 1
  fi
  summary+=("$target: ${runs:-?} executions in ${seconds:-?} s, coverage ${cov:-?} edges, ${units} corpus units, no crash")
done
echo "fuzzing totals:"
printf '  %s\n' "${summary[@]}"
