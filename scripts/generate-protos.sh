#!/usr/bin/env bash
# Regenerates Sources/EnvoyAPI, Sources/IstioAPI and Sources/SPIFFEAPI from Protos/ and records a checksum of the inputs.
# Needs protoc (Debian: protobuf-compiler); builds the Swift protoc plugins into .build-protoc
# (minutes the first time). CI never runs this: it runs scripts/check-generated.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v protoc >/dev/null || { echo "protoc not found: apt-get install protobuf-compiler" >&2; exit 1; }

SCRATCH=.build-protoc
swift build --package-path scripts/protoc-plugins --scratch-path "$SCRATCH" -c release \
  --product protoc-gen-swift >&2
swift build --package-path scripts/protoc-plugins --scratch-path "$SCRATCH" -c release \
  --product protoc-gen-grpc-swift-2 >&2
BIN=$(swift build --package-path scripts/protoc-plugins --scratch-path "$SCRATCH" -c release --show-bin-path)

# Envoy's API goes to Sources/EnvoyAPI, Istio's CA API (Protos/security/) to Sources/IstioAPI,
# the SPIFFE Workload API (Protos/spiffe/) to Sources/SPIFFEAPI.
generate() {
  local out=$1; shift
  mkdir -p "$out"
  find "$out" -name '*.pb.swift' -o -name '*.grpc.swift' | xargs -r rm -f
  protoc --proto_path=Protos \
    --plugin=protoc-gen-swift="$BIN/protoc-gen-swift" \
    --swift_out="$out" --swift_opt=Visibility=Public --swift_opt=FileNaming=PathToUnderscores \
    --plugin=protoc-gen-grpc-swift="$BIN/protoc-gen-grpc-swift-2" \
    --grpc-swift_out="$out" --grpc-swift_opt=Visibility=Public,Client=true,Server=true \
    --grpc-swift_opt=FileNaming=PathToUnderscores \
    "$@"
  # Files with no service get an empty .grpc.swift; drop them.
  for f in "$out"/*.grpc.swift; do
    grep -q 'ServiceProtocol' "$f" || rm -f "$f"
  done
}
mapfile -t ENVOY < <(cd Protos && find . -name '*.proto' -not -path './security/*' -not -path './spiffe/*' | sed 's|^\./||' | LC_ALL=C sort)
mapfile -t ISTIO < <(cd Protos && find ./security -name '*.proto' | sed 's|^\./||' | LC_ALL=C sort)
generate Sources/EnvoyAPI "${ENVOY[@]}"
mapfile -t SPIFFE < <(cd Protos && find ./spiffe -name '*.proto' | sed 's|^\./||' | LC_ALL=C sort)
generate Sources/IstioAPI "${ISTIO[@]}"
generate Sources/SPIFFEAPI "${SPIFFE[@]}"
PROTOS=("${ENVOY[@]}" "${ISTIO[@]}" "${SPIFFE[@]}")
OUT=Sources/EnvoyAPI

scripts/check-generated.sh --print > "$OUT/PROTOS.sha256"
echo "regenerated $OUT from ${#PROTOS[@]} files in Protos/" >&2
