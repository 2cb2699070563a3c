#!/usr/bin/env bash
# make-ca.sh OUT_DIR [TRUST_DOMAIN]: a self-signed ECDSA P-256 root CA for sds-agent, valid one
# year, as OUT_DIR/tls.crt and OUT_DIR/tls.key (PKCS#8, mode 0600). Used by
# create-cluster-inputs.sh; the end-to-end tests run an agent on exactly this output.
set -euo pipefail
out=${1:?usage: make-ca.sh OUT_DIR [TRUST_DOMAIN]}
td=${2:-cluster.local}
mkdir -p "$out"
(umask 077 && openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$out/tls.key")
openssl req -x509 -new -key "$out/tls.key" -days 365 -subj "/O=sds-agent/CN=sds-agent root CA for $td" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
  -addext "subjectKeyIdentifier=hash" -addext "subjectAltName=URI:spiffe://$td" -out "$out/tls.crt" 2>/dev/null
