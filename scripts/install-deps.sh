#!/usr/bin/env bash
# Installs the system tools the build and tests need, only where missing:
# protoc (checks Protos/ against Envoy's API), openssl (checks served certificates), p11-kit's
# PKCS#11 header and pkg-config (the TokenKeys module), SoftHSM 2 and OpenSC's pkcs11-tool (a
# real PKCS#11 token for the tests of CA keys in a token).
set -euo pipefail
missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v openssl >/dev/null || missing+=(openssl)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
[ -f /usr/include/p11-kit-1/p11-kit/pkcs11.h ] || missing+=(libp11-kit-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
[ -f /usr/lib/softhsm/libsofthsm2.so ] || missing+=(softhsm2)
command -v pkcs11-tool >/dev/null || missing+=(opensc)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing: ${missing[*]} (install them with apt-get, or run as root)" >&2
    exit 1
  fi
  echo "installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v swift >/dev/null || [ -x /opt/swift/usr/bin/swift ] || { echo "Swift 6 toolchain not found" >&2; exit 1; }
