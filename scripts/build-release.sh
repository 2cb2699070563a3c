#!/usr/bin/env bash
# build-release.sh OUT_DIR: the release build the container image ships (Deploy/Dockerfile runs
# exactly this, and so does CI, which proves the recipe without a Docker engine):
# a release sds-agent with the Swift runtime linked statically, and the sidecar template.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"
out=${1:?usage: build-release.sh OUT_DIR}
source scripts/release-flags.sh

# The commit goes into the binary (`sds-agent version`) for the build only; the file is restored
# after. It is the executable's, so only that small module is compiled again; the copy is kept
# outside Sources/, where SwiftPM would see one more file.
commit_file=Sources/sds-agent/BuildCommit.swift
if commit=$(git rev-parse --short=12 HEAD 2>/dev/null); then
  [ -z "$(git status --porcelain 2>/dev/null)" ] || commit="$commit-dirty"
  saved=$(mktemp)
  cp "$commit_file" "$saved"
  trap 'cat "$saved" > "$commit_file"; rm -f "$saved"' EXIT
  printf '// Rewritten by scripts/build-release.sh for the duration of a release build; keep it one line.\nlet buildCommit = "%s"\n' "$commit" > "$commit_file"
fi
swift build "${release_flags[@]}" --product sds-agent
bin=$(swift build "${release_flags[@]}" --show-bin-path)

mkdir -p "$out/bin" "$out/etc/sds-agent"
install -m 0755 "$bin/sds-agent" "$out/bin/sds-agent"
strip "$out/bin/sds-agent"  # symbols are half its size; the image ships the stripped binary
install -m 0644 envoy-bootstrap/envoy-sidecar.yaml "$out/etc/sds-agent/envoy-sidecar.yaml"

# The image has no Swift runtime: the binary must not need one.
if ldd "$out/bin/sds-agent" | grep -q 'libswift\|libFoundation\|libdispatch'; then
  echo "sds-agent links the Swift runtime dynamically:" >&2
  ldd "$out/bin/sds-agent" >&2
  exit 1
fi
"$out/bin/sds-agent" --help >/dev/null
"$out/bin/sds-agent" version
echo "built $out/bin/sds-agent ($(du -h "$out/bin/sds-agent" | cut -f1))"
