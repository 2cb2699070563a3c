#!/usr/bin/env bash
# Creates what the manifests read but cannot contain: the cluster's token-signing keys (JWKS)
# and the CA every agent signs with. Run once per cluster with kubectl pointed at it, then
# `kubectl apply -k Deploy/`. Re-run with --rotate-jwks when the API server's keys change; with
# --central-ca for optional/central-ca.yaml (the cacerts Secret its replicas share, and the root
# ConfigMap the agents verify them with).
set -euo pipefail
NS=sds-agent
kubectl get namespace "$NS" >/dev/null 2>&1 || kubectl create namespace "$NS"

# The public keys the API server signs service-account tokens with.
kubectl get --raw /openid/v1/jwks > /tmp/sds-agent-jwks.json
kubectl -n "$NS" create configmap sds-agent-jwks --from-file=jwks.json=/tmp/sds-agent-jwks.json \
  --dry-run=client -o yaml | kubectl apply -f -

if [ "${1:-}" = "--rotate-jwks" ]; then exit 0; fi
TD=$(kubectl -n "$NS" get configmap sds-agent-config -o jsonpath='{.data.trust-domain}' 2>/dev/null || echo cluster.local)
TD=${TD:-cluster.local}

if [ "${1:-}" = "--central-ca" ]; then
  # optional/central-ca.yaml + optional/upstream: the CA in Istio's cacerts layout, in one Secret
  # every replica mounts, made by `sds-agent ca init` (the binary on PATH, or $SDS_AGENT). The
  # root's key is written to $ROOT_KEY_OUT (default ./sds-agent-root-key.pem) and never enters
  # the cluster: keep it offline, it signs the next intermediate.
  if kubectl -n "$NS" get secret sds-agent-cacerts >/dev/null 2>&1; then
    echo "secret $NS/sds-agent-cacerts exists; leaving it" >&2
  else
    agent=${SDS_AGENT:-sds-agent}
    command -v "$agent" >/dev/null || { echo "sds-agent not found: put it on PATH or set SDS_AGENT" >&2; exit 1; }
    dir=$(mktemp -d)
    trap 'rm -rf "$dir"' EXIT
    "$agent" ca init "$dir/cacerts" --trust-domain "$TD" --root-key-out "${ROOT_KEY_OUT:-./sds-agent-root-key.pem}"
    kubectl -n "$NS" create secret generic sds-agent-cacerts --from-file="$dir/cacerts"
  fi
  # The root that verifies the replicas' TLS certificates, without any key, for the agents.
  kubectl -n "$NS" get secret sds-agent-cacerts -o jsonpath='{.data.root-cert\.pem}' | base64 -d > /tmp/sds-agent-ca-root.pem
  kubectl -n "$NS" create configmap sds-agent-ca-root --from-file=root-cert.pem=/tmp/sds-agent-ca-root.pem \
    --dry-run=client -o yaml | kubectl apply -f -
  exit 0
fi

if kubectl -n "$NS" get secret sds-agent-ca >/dev/null 2>&1; then
  echo "secret $NS/sds-agent-ca exists; leaving it" >&2
else
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
  "$(dirname "$0")/make-ca.sh" "$dir" "$TD"
  kubectl -n "$NS" create secret tls sds-agent-ca --cert="$dir/tls.crt" --key="$dir/tls.key"
fi
