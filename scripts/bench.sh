#!/usr/bin/env bash
# bench.sh [--smoke] [sds-agent-bench flags]: measures a release sds-agent (the binary the image
# ships) over its socket, next to this machine's ECDSA P-256 limit from `openssl speed`, and
# prints the numbers. Full sizes take a few minutes, then a storm of 1,000 clients, then the CSR
# API of `ca serve` (`--csr-api` alone runs only that); CI runs `--smoke` to prove it still runs,
# and `--storm 300` as a test. `--pkcs11` alone: the CA's issuance with its key in a SoftHSM token
# against the key in memory (the token made here, in a temporary directory).
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
if [[ " $* " == *" --pkcs11 "* ]]; then
  # A SoftHSM token with a P-256 key generated inside it, a root (file key) that signs two
  # intermediates: one for the token's key, one for a file key, so both CAs differ only there.
  hsm=$(mktemp -d)
  trap 'rm -rf "$hsm"' EXIT
  export SOFTHSM2_CONF=$hsm/softhsm2.conf
  mkdir "$hsm/tokens"
  printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$hsm" > "$SOFTHSM2_CONF"
  module=/usr/lib/softhsm/libsofthsm2.so
  softhsm2-util --init-token --free --label bench --pin 1234 --so-pin 5678 >/dev/null
  pkcs11-tool --module $module --token-label bench --login --pin 1234 --keypairgen --key-type EC:prime256v1 --label ca --id 01 >/dev/null
  pkcs11-tool --module $module --token-label bench --read-object --type pubkey --label ca -o "$hsm/pub.der" >/dev/null
  openssl pkey -pubin -inform DER -in "$hsm/pub.der" -out "$hsm/pub.pem"
  openssl ecparam -name prime256v1 -genkey -noout -out "$hsm/root.key"
  openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$hsm/file.key"
  chmod 600 "$hsm/root.key" "$hsm/file.key"
  openssl req -x509 -new -key "$hsm/root.key" -subj "/CN=bench root" -days 2 -out "$hsm/root.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  printf 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n' > "$hsm/ext.cnf"
  for which in token file; do
    if [ $which = token ]; then pub=$hsm/pub.pem; else openssl pkey -in "$hsm/file.key" -pubout -out "$hsm/filepub.pem"; pub=$hsm/filepub.pem; fi
    openssl x509 -new -subj "/CN=bench $which intermediate" -force_pubkey "$pub" -CA "$hsm/root.pem" -CAkey "$hsm/root.key" \
      -days 2 -extfile "$hsm/ext.cnf" -out "$hsm/$which.pem" 2>/dev/null
    cat "$hsm/root.pem" >> "$hsm/$which.pem"
  done
  args=("$@")
  args=("${args[@]/--pkcs11}")
  out=run/bench
  [[ " $* " == *" --smoke "* ]] && out=run/bench/smoke
  mkdir -p "$out"
  "$bin/sds-agent-bench" --agent "$bin/sds-agent" --commit "$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)" \
    --sign-per-second "$sign" --verify-per-second "$verify" --json-out "$out/pkcs11.json" --ca-keys "$hsm/file.pem,$hsm/file.key,$hsm/token.pem,pkcs11:token=bench;object=ca?module-path=$module&pin-value=1234" ${args[@]}
  exit 0
fi
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
