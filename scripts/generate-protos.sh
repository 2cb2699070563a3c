#!/usr/bin/env bash
# Regenerates Sources/EnvoyAPI from Protos/ and records a checksum of the inputs.
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

OUT=Sources/EnvoyAPI
mkdir -p "$OUT"
find "$OUT" -name '*.pb.swift' -o -name '*.grpc.swift' | xargs -r rm -f
mapfile -t PROTOS < <(cd Protos && find . -name '*.proto' | sed 's|^\./||' | LC_ALL=C sort)

protoc --proto_path=Protos \
  --plugin=protoc-gen-swift="$BIN/protoc-gen-swift" \
  --swift_out="$OUT" --swift_opt=Visibility=Public --swift_opt=FileNaming=PathToUnderscores \
  --plugin=protoc-gen-grpc-swift="$BIN/protoc-gen-grpc-swift-2" \
  --grpc-swift_out="$OUT" --grpc-swift_opt=Visibility=Public,Client=true,Server=true \
  --grpc-swift_opt=FileNaming=PathToUnderscores \
  "${PROTOS[@]}"

# Files with no service get an empty .grpc.swift; drop them.
for f in "$OUT"/*.grpc.swift; do
  grep -q 'ServiceProtocol' "$f" || rm -f "$f"
done

scripts/check-generated.sh --print > "$OUT/PROTOS.sha256"
echo "regenerated $OUT from ${#PROTOS[@]} files in Protos/" >&2
