#!/usr/bin/env bash
# Creates what the manifests read but cannot contain: the cluster's token-signing keys (JWKS)
# and the CA every agent signs with. Run once per cluster with kubectl pointed at it, then
# `kubectl apply -k Deploy/`. Re-run with --rotate-jwks when the API server's keys change.
set -euo pipefail
NS=sds-agent
kubectl get namespace "$NS" >/dev/null 2>&1 || kubectl create namespace "$NS"

# The public keys the API server signs service-account tokens with.
kubectl get --raw /openid/v1/jwks > /tmp/sds-agent-jwks.json
kubectl -n "$NS" create configmap sds-agent-jwks --from-file=jwks.json=/tmp/sds-agent-jwks.json \
  --dry-run=client -o yaml | kubectl apply -f -

if [ "${1:-}" = "--rotate-jwks" ]; then exit 0; fi
if kubectl -n "$NS" get secret sds-agent-ca >/dev/null 2>&1; then
  echo "secret $NS/sds-agent-ca exists; leaving it" >&2
else
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
  TD=$(kubectl -n "$NS" get configmap sds-agent-config -o jsonpath='{.data.trust-domain}' 2>/dev/null || echo cluster.local)
  "$(dirname "$0")/make-ca.sh" "$dir" "${TD:-cluster.local}"
  kubectl -n "$NS" create secret tls sds-agent-ca --cert="$dir/tls.crt" --key="$dir/tls.key"
fi

# For the central CA (optional/central-ca.yaml + optional/upstream): the root that verifies its TLS
# certificate, without the key: the last certificate of the Secret's tls.crt.
kubectl -n "$NS" get secret sds-agent-ca -o jsonpath='{.data.tls\.crt}' | base64 -d |
  awk '/BEGIN CERTIFICATE/ {pem=""} {pem = pem $0 "\n"} /END CERTIFICATE/ {last=pem} END {printf "%s", last}' \
  > /tmp/sds-agent-ca-root.pem
kubectl -n "$NS" create configmap sds-agent-ca-root --from-file=root-cert.pem=/tmp/sds-agent-ca-root.pem \
  --dry-run=client -o yaml | kubectl apply -f -
