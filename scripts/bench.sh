#!/usr/bin/env bash
# bench.sh [--smoke] [sds-agent-bench flags]: measures a release sds-agent (the binary the image
# ships) over its socket, next to this machine's ECDSA P-256 limit from `openssl speed`, and
# prints the numbers. Full sizes take a few minutes, then a storm of 1,000 clients, then the CSR
# API of `ca serve` (`--csr-api` alone runs only that); CI runs `--smoke` to prove it still runs,
# and `--storm 300` as a test.
# Numbers are printed, never asserted: compare them run to run on the same machine. The results,
# with the machine, the commit and the date, go to run/bench/latest.json (and storm.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"
source scripts/release-flags.sh
flags=("${release_flags[@]}")

swift build "${flags[@]}" --product sds-agent
swift build "${flags[@]}" --product sds-agent-bench
bin=$(swift build "${flags[@]}" --show-bin-path)

seconds=3
[[ " $* " == *" --smoke "* ]] && seconds=1
# The limit: what OpenSSL signs and verifies per second on one core, on this run.
read -r sign verify < <(openssl speed -seconds "$seconds" ecdsap256 2>/dev/null | awk '/nistp256/ {print $(NF-1), $NF}')
echo "openssl speed ecdsap256: ${sign} sign/s, ${verify} verify/s (one core)"
# The binary measured is the one the image ships: stripped (scripts/build-release.sh).
mkdir -p run/bench
install -m 0755 "$bin/sds-agent" run/bench/sds-agent
strip run/bench/sds-agent
agent=$PWD/run/bench/sds-agent
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain 2>/dev/null)" ] || commit="$commit-dirty"
out=run/bench
[[ " $* " == *" --smoke "* ]] && out=run/bench/smoke
"$bin/sds-agent-bench" --agent "$agent" --sign-per-second "$sign" --verify-per-second "$verify" \
  --commit "$commit" --json-out "$out/latest.json" "$@"
# The node-restart storm (one connection per stream, all at once) on a fresh agent: 1,000 clients
# in the full run; CI runs it at 300 (`--storm 300`, which fails on any client not served).
if [[ " $* " != *" --smoke "* && " $* " != *" --storm "* && " $* " != *" --csr-api "* ]]; then
  "$bin/sds-agent-bench" --agent "$agent" --storm 1000 --commit "$commit" --json-out "$out/storm.json"
fi
# Istio's CSR API of `ca serve` (replicas on 127.0.0.1-3, a burst, an upstream storm): in the full
# run and, at smoke sizes, in CI (it fails on any CSR not issued).
if [[ " $* " != *" --storm "* && " $* " != *" --csr-api "* ]]; then
  smoke=()
  [[ " $* " == *" --smoke "* ]] && smoke=(--smoke)
  "$bin/sds-agent-bench" --agent "$agent" --sign-per-second "$sign" --verify-per-second "$verify" \
    --commit "$commit" --json-out "$out/csr.json" --csr-api "${smoke[@]}"
fi
