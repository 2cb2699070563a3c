"""The agent as a client of Istio's CSR API (--upstream-ca), against a stand-in for istiod.

istiod cannot run here; `istio_ca.IstiodStandIn` is written from Istio's ca.proto and istiod's rules
(see its docstring). Real Envoys get their certificates through the agent and talk mutual TLS; the
keys never leave the agent, only CSRs do.
"""
import os
import time

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from conftest import AGENT_BIN, ENVOY_BIN, TD, FRONTEND, BACKEND
from istio_ca import IstiodStandIn, pem
from sdsdemo.devtokens import TokenSigner
from sdsdemo.node import Node, wait_until

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def upstream_node(workdir, istiod, *extra):
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    node.signer = istiod.signer
    node.signer.write_jwks(node.jwks)
    node.start_agent("--upstream-ca", istiod.address, "--upstream-ca-bundle", istiod.bundle_file,
                     "--metrics-address", "127.0.0.1:0", *extra)
    return node


def fetch(node, token, names=("default",), timeout=15):
    with grpc.insecure_channel(f"unix:{node.socket}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        request = discovery_pb2.DiscoveryRequest(resource_names=list(names), type_url=SECRET_TYPE)
        return stub.FetchSecrets(request, metadata=[("istio_sds_credentials_header-bin", token.encode())],
                                 timeout=timeout)


def pair(node, audience):
    app = node.start_app("backend")
    server = node.start_envoy("backend", node.token_file("backend", "demo", "backend", audience=audience),
                              app_port=app, allow_ids=[FRONTEND])
    client = node.start_envoy("frontend", node.token_file("frontend", "demo", "frontend", audience=audience),
                              upstream_port=server.inbound_port, upstream_ids=[BACKEND])
    return server, client


def served_chain(node, token):
    """The workload secret's chain and the validation context's roots, as the agent serves them."""
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
    secrets = {}
    for resource in fetch(node, token, ("default", "ROOTCA")).resources:
        secret = secret_pb2.Secret()
        resource.Unpack(secret)
        secrets[secret.name] = secret
    return (secrets["default"].tls_certificate.certificate_chain.inline_bytes.decode(),
            secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes.decode())


def test_forward_mode_envoys_do_mtls_with_certificates_from_istiod(workdir):
    istiod = IstiodStandIn(workdir, TokenSigner()).start()
    # The workloads' projected tokens carry istiod's audience; the agent accepts it and forwards them.
    node = upstream_node(workdir, istiod, "--audience", "istio-ca")
    try:
        server, client = pair(node, "istio-ca")
        status, body = client.get("/hello")
        assert status == 200, body
        assert f"caller identity: {FRONTEND}" in body
        # Forward mode: istiod saw each workload's own token, and ClusterID defaults to Kubernetes.
        subjects = {sub for sub, impersonated, cluster in istiod.requests}
        assert {"system:serviceaccount:demo:frontend", "system:serviceaccount:demo:backend"} <= subjects
        assert all(cluster == "Kubernetes" and not impersonated for _, impersonated, cluster in istiod.requests)
        # Leaf + istiod's intermediate in the chain; istiod's root (not the TLS bundle's role) validates.
        chain, roots = served_chain(node, open(node.token_file("frontend", "demo", "frontend", audience="istio-ca")).read())
        assert chain.count("BEGIN CERTIFICATE") == 2 and pem(istiod.intermediate) in chain
        assert roots.strip() == pem(istiod.root).strip()
        assert node.agent_metrics().get("sds_agent_upstream_ca_up") == 1

        # A bad token never reaches the CA: the agent refuses it first.
        before = len(istiod.requests)
        impostor = TokenSigner()
        forged = impostor.sign(impostor.claims("demo", "frontend", audience="istio-ca"), kid=node.signer.kid)
        with pytest.raises(grpc.RpcError) as refused:
            fetch(node, forged)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert len(istiod.requests) == before
    finally:
        node.stop_all()
        istiod.stop()


def test_node_mode_sends_the_agents_token_with_impersonated_identity(workdir):
    istiod = IstiodStandIn(workdir, TokenSigner(), trusted_node_accounts={"sds-system/sds-agent"},
                           pods_on_node={("demo", "frontend"), ("demo", "backend")})
    istiod.start()
    agent_token = os.path.join(workdir, "agent.token")
    with open(agent_token, "w") as f:
        f.write(istiod.signer.token("sds-system", "sds-agent", audience="istio-ca"))
    node = upstream_node(workdir, istiod, "--upstream-ca-credential", "node", "--upstream-ca-token-file", agent_token,
                         "--upstream-ca-server-name", "istiod.istio-system.svc", "--upstream-ca-cluster-id", "east")
    try:
        # Workload tokens keep the agent's audience: they never leave the node.
        server, client = pair(node, "sds-agent")
        status, body = client.get("/hello")
        assert status == 200, body
        assert {(sub, impersonated, cluster) for sub, impersonated, cluster in istiod.requests} >= {
            ("system:serviceaccount:sds-system:sds-agent", FRONTEND, "east"),
            ("system:serviceaccount:sds-system:sds-agent", BACKEND, "east")}

        # No pod of demo/stranger on this node: istiod refuses; the caller hears permission_denied.
        with pytest.raises(grpc.RpcError) as refused:
            fetch(node, node.signer.token("demo", "stranger"))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no pod of demo/stranger" in istiod.refusals[-1]

        # An untrusted node account is refused too, and everyone already served keeps working.
        istiod.trusted_node_accounts.clear()
        istiod.pods_on_node.add(("demo", "late"))
        with pytest.raises(grpc.RpcError) as refused:
            fetch(node, node.signer.token("demo", "late"))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "CA_TRUSTED_NODE_ACCOUNTS" in istiod.refusals[-1]
        assert "the upstream CA refused" in node.agent.output()
        assert client.get("/hello")[0] == 200
    finally:
        node.stop_all()
        istiod.stop()


def test_ca_outage_keeps_serving_certificates_and_recovers_without_restart(workdir):
    istiod = IstiodStandIn(workdir, TokenSigner()).start()
    node = upstream_node(workdir, istiod, "--audience", "istio-ca")
    try:
        server, client = pair(node, "istio-ca")
        assert client.get("/hello")[0] == 200
        port = istiod.port
        istiod.stop()

        # Current certificates keep being served, and traffic flows.
        assert client.get("/hello")[0] == 200
        assert len(fetch(node, open(node.token_file("frontend2", "demo", "frontend", audience="istio-ca")).read()).resources) == 1

        # A new identity hears `unavailable` (Envoy retries) within 10 s, never a hang.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as down:
            fetch(node, node.signer.token("demo", "newcomer", audience="istio-ca"), timeout=30)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value.details()
        assert time.monotonic() - started < 10
        assert node.agent_metrics().get("sds_agent_upstream_ca_up") == 0
        assert "UPSTREAM CA UNREACHABLE" in node.agent.output()

        # The CA comes back on the same address: new identities are served within 30 s, no restart.
        istiod.port = port
        istiod.start()
        token = node.signer.token("demo", "newcomer", audience="istio-ca")

        def served():
            try:
                return len(fetch(node, token).resources) == 1
            except grpc.RpcError:
                return False
        wait_until(served, 30, "a new identity after the CA came back")
        assert node.agent.alive()
    finally:
        node.stop_all()
        istiod.stop()
