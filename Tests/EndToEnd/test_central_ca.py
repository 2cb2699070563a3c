"""`sds-agent ca serve`: a central CA speaking Istio's CSR API, for meshes without istiod.

Wire compatibility is checked with a client generated from Istio's ca.proto by grpcio-tools (another
language, another gRPC stack). Then three agents on loopback ("nodes", each with its own socket and
state directory) take their certificates from one central CA, their Envoys talk mTLS across
nodes, and a root rotation at the central CA reaches every stream with no failed request.
The API server (for ImpersonatedIdentity's node check) is the existing HTTPS stand-in.
"""
import os
import re
import signal

import grpc
import pytest

from conftest import AGENT_BIN, ENVOY_BIN, TD
from fake_apiserver import FakeAPIServer
from istio_ca import client_call, leaf_uris, make_csr, stubs
from sdsdemo.devtokens import TokenSigner
from sdsdemo.node import Load, Node, Process, free_port, wait_until

AGENT_SA = ("sds-system", "sds-agent")


def start_ca(workdir, jwks, *extra):
    port = free_port()
    state = os.path.join(workdir, "ca-state")
    process = Process("ca", [AGENT_BIN, "ca", "serve", "--listen", f"127.0.0.1:{port}", "--trust-domain", "cluster.local",
                             "--jwks", jwks, "--state-dir", state, *extra], os.path.join(workdir, "ca.log"))
    wait_until(lambda: "serving Istio's CSR API" in process.output() or not process.alive(), 30, "ca serve listening")
    assert process.alive(), process.output()
    return process, f"127.0.0.1:{port}", os.path.join(state, "ca", "root-cert.pem")


def test_a_client_generated_from_istios_proto_gets_only_its_own_identity(workdir):
    pb2, pb2_grpc = stubs(workdir)
    signer = TokenSigner()
    jwks = signer.write_jwks(os.path.join(workdir, "jwks.json"))
    with FakeAPIServer(workdir, signer) as api:
        agent_claims = signer.claims(*AGENT_SA, audience="istio-ca")
        agent_pod = agent_claims["kubernetes.io"]["pod"]
        api.pods[("sds-system", agent_pod["name"])] = {"uid": agent_pod["uid"], "serviceAccountName": "sds-agent",
                                                       "nodeName": "node-a"}
        api.pods[("demo", "backend-1")] = {"uid": "u-1", "serviceAccountName": "backend", "nodeName": "node-a"}
        api.pods[("demo", "db-1")] = {"uid": "u-2", "serviceAccountName": "db", "nodeName": "node-b"}
        ca, address, root = start_ca(workdir, jwks, "--trusted-node-account", "sds-system/sds-agent", *api.agent_args())
        try:
            frontend = signer.token("demo", "frontend", audience="istio-ca")
            # The CSR asks for another identity; the certificate carries the caller's.
            key, csr = make_csr("spiffe://cluster.local/ns/kube-system/sa/admin")
            chain = client_call(pb2, pb2_grpc, address, root, frontend, csr)
            assert len(chain) == 2, "leaf, then the root bundle (last)"
            assert leaf_uris(chain[0]) == [f"{TD}/ns/demo/sa/frontend"]
            assert open(root).read().strip() in chain[-1]
            # The server name (default localhost and 127.0.0.1) verifies by name too.
            chain = client_call(pb2, pb2_grpc, address, root, frontend, make_csr()[1], server_name="localhost")
            assert leaf_uris(chain[0]) == [f"{TD}/ns/demo/sa/frontend"]

            refused = []
            impostor = TokenSigner()
            forged = impostor.sign(impostor.claims("demo", "frontend", audience="istio-ca"), kid=signer.kid)
            wrong_audience = signer.token("demo", "frontend", audience="sds-agent")
            for token, impersonated in ((forged, None), (wrong_audience, None),
                                        # not a trusted node account
                                        (frontend, f"{TD}/ns/demo/sa/backend"),
                                        # trusted, but no pod of demo/db on its node
                                        (signer.sign(agent_claims), f"{TD}/ns/demo/sa/db")):
                with pytest.raises(grpc.RpcError) as error:
                    client_call(pb2, pb2_grpc, address, root, token, make_csr()[1], impersonated=impersonated)
                refused.append(error.value.code())
                assert error.value.details() == "request authenticate failure"  # opaque, as istiod
            assert refused == [grpc.StatusCode.UNAUTHENTICATED] * 4
            log = ca.output()
            assert "reason=bad_signature" in log and "wrong_audience" in log
            assert "demo/frontend is not a trusted node account" in log
            assert "no pod of demo/db runs on node node-a" in log
            assert forged not in log and frontend not in log, "tokens are never logged"

            # The trusted node account gets a pod's identity on its own node.
            chain = client_call(pb2, pb2_grpc, address, root, signer.sign(agent_claims), make_csr()[1],
                                impersonated=f"{TD}/ns/demo/sa/backend")
            assert leaf_uris(chain[0]) == [f"{TD}/ns/demo/sa/backend"]
        finally:
            ca.stop()


def root_serial(envoy):
    """Serials of the roots in the Envoy's validation context."""
    import json
    return {cert["serial_number"] for entry in json.loads(envoy.admin("/certs")[1])["certificates"]
            for cert in entry.get("ca_cert", [])}


def test_three_nodes_share_trust_through_one_central_ca_and_survive_its_root_rotation(workdir):
    signer = TokenSigner()
    jwks = signer.write_jwks(os.path.join(workdir, "jwks.json"))
    # Agents renew every ~5 s (10 s certificates); the CA publishes a new root 12 s before signing with it.
    ca, address, root = start_ca(workdir, jwks, "--ca-activation-delay", "12s")
    nodes = []
    try:
        for name in ("a", "b", "c"):
            node = Node(os.path.join(workdir, name), AGENT_BIN, ENVOY_BIN)
            node.signer = signer
            node.jwks = jwks
            node.start_agent("--upstream-ca", address, "--upstream-ca-bundle", root, "--audience", "istio-ca",
                             "--cert-ttl", "10s")
            nodes.append(node)
        a, b, c = nodes
        app = a.start_app("backend")
        backend = a.start_envoy("backend", a.token_file("backend", "demo", "backend", audience="istio-ca"),
                                app_port=app, allow_ids=[f"{TD}/ns/demo/sa/frontend", f"{TD}/ns/demo/sa/reports"])
        frontend = b.start_envoy("frontend", b.token_file("frontend", "demo", "frontend", audience="istio-ca"),
                                 upstream_port=backend.inbound_port, upstream_ids=[f"{TD}/ns/demo/sa/backend"])
        reports = c.start_envoy("reports", c.token_file("reports", "demo", "reports", audience="istio-ca"),
                                upstream_port=backend.inbound_port, upstream_ids=[f"{TD}/ns/demo/sa/backend"])
        for client, identity in ((frontend, "frontend"), (reports, "reports")):
            status, body = client.get("/hello")
            assert status == 200, body
            assert f"caller identity: {TD}/ns/demo/sa/{identity}" in body
        # No agent has a CA key: every state directory holds only the kept trust bundle.
        for node in nodes:
            assert not os.path.exists(os.path.join(node.workdir, "state", "ca"))
        old_roots = root_serial(backend)
        assert len(old_roots) == 1

        loads = [Load(frontend), Load(reports)]
        os.kill(ca.pid, signal.SIGUSR1)
        # Every Envoy first trusts old + new, then holds a leaf signed by the new root.
        envoys = (backend, frontend, reports)
        wait_until(lambda: all(len(root_serial(e)) == 2 for e in envoys), 30, "old + new roots on every Envoy")
        wait_until(lambda: "now signing with the new root" in ca.output(), 30, "the CA to activate the new root")
        activated = ca.output().index("now signing with the new root")
        new_serials = lambda: set(re.findall(r"serial=([0-9a-f]+) spiffe_id=", ca.output()[activated:]))  # noqa: E731

        def on_new_root():
            serials = new_serials()
            return all(e.serials_for(f"{TD}/ns/demo/sa/{e.name}") & serials for e in envoys)
        wait_until(on_new_root, 30, "every Envoy to hold a leaf from the new root")
        for client in (frontend, reports):
            assert client.get("/hello")[0] == 200
        results = [load.stop() for load in loads]
        for result, load in zip(results, loads):
            assert set(result) == {200}, (result, load.errors)
            assert result[200] > 20
    finally:
        for node in nodes:
            node.stop_all()
        ca.stop()


def test_ca_serve_refuses_a_port_in_use_or_a_state_dir_in_use_at_start_and_writes_nothing(workdir):
    """`ca serve` on a busy port stayed up, reported ready and said nothing until SIGTERM; on a
    state directory in use it ran twice; a refused start had already generated a root."""
    import socket
    import subprocess
    jwks = TokenSigner().write_jwks(os.path.join(workdir, "jwks.json"))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        state = os.path.join(workdir, "busy-port-state")
        result = subprocess.run(
            [AGENT_BIN, "ca", "serve", "--listen", f"127.0.0.1:{busy.getsockname()[1]}", "--trust-domain", "cluster.local",
             "--jwks", jwks, "--state-dir", state], capture_output=True, text=True, timeout=30)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "Address already in use" in output and f"127.0.0.1:{busy.getsockname()[1]}" in output, output
        assert not os.path.exists(os.path.join(state, "ca", "root-cert.pem")), "a refused start wrote a root"
    finally:
        busy.close()

    ca, _, _ = start_ca(workdir, jwks)
    try:
        result = subprocess.run(
            [AGENT_BIN, "ca", "serve", "--listen", f"127.0.0.1:{free_port()}", "--trust-domain", "cluster.local",
             "--jwks", jwks, "--state-dir", os.path.join(workdir, "ca-state")], capture_output=True, text=True, timeout=30)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "is in use by another sds-agent" in result.stdout + result.stderr
        # `:PORT` listens on every address, as `serve --metrics-address` does.
        any_address = Process("ca-any", [AGENT_BIN, "ca", "serve", "--listen", f":{free_port()}", "--trust-domain", "cluster.local",
                                         "--jwks", jwks, "--state-dir", os.path.join(workdir, "any-state")],
                              os.path.join(workdir, "ca-any.log"))
        try:
            wait_until(lambda: "serving Istio's CSR API" in any_address.output() or not any_address.alive(), 30, "listening")
            assert any_address.alive(), any_address.output()
        finally:
            any_address.stop()
    finally:
        ca.stop()


def test_ca_serve_reloads_its_jwks_file_on_sighup(workdir):
    """`ca serve --help` said --jwks is reloaded on SIGHUP; it answered 'nothing to do'."""
    pb2, pb2_grpc = stubs(workdir)
    old, new = TokenSigner(), TokenSigner()
    jwks = old.write_jwks(os.path.join(workdir, "jwks.json"))
    ca, address, root = start_ca(workdir, jwks)
    try:
        token = new.token("demo", "frontend", audience="istio-ca")
        with pytest.raises(grpc.RpcError) as refused:
            client_call(pb2, pb2_grpc, address, root, token, make_csr()[1])
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        new.write_jwks(jwks, extra_keys=[old])
        os.kill(ca.pid, signal.SIGHUP)
        wait_until(lambda: "JWKS reloaded" in ca.output(), 10, "the reload")
        chain = client_call(pb2, pb2_grpc, address, root, token, make_csr()[1])
        assert leaf_uris(chain[0]) == [f"{TD}/ns/demo/sa/frontend"]
    finally:
        ca.stop()


def test_root_cert_pem_keeps_verifying_the_cas_tls_through_a_root_rotation(workdir):
    """After SIGUSR1, root-cert.pem held only the new root while the TLS certificate still chained
    to the old one: an agent given that file was never ready. Now the file holds every trusted
    root (active first) and the TLS certificate is issued again under the new root."""
    pb2, pb2_grpc = stubs(workdir)
    signer = TokenSigner()
    jwks = signer.write_jwks(os.path.join(workdir, "jwks.json"))
    ca, address, root = start_ca(workdir, jwks, "--ca-activation-delay", "2s")
    token = signer.token("demo", "frontend", audience="istio-ca")

    def pems(path):
        return re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", open(path).read(), re.S)

    try:
        old = pems(root)
        assert len(old) == 1
        client_call(pb2, pb2_grpc, address, root, token, make_csr()[1])
        os.kill(ca.pid, signal.SIGUSR1)
        wait_until(lambda: "TLS certificate issued again under the new root" in ca.output(), 30, "the new root to sign")
        wait_until(lambda: len(pems(root)) == 2, 10, "root-cert.pem with old and new roots")
        assert pems(root)[1] == old[0] and pems(root)[0] != old[0], "the active (new) root first, the old one after"
        # The whole file (what agents are given) and the new root alone both verify the CA now.
        chain = client_call(pb2, pb2_grpc, address, root, token, make_csr()[1])
        assert leaf_uris(chain[0]) == [f"{TD}/ns/demo/sa/frontend"]
        new_only = os.path.join(workdir, "new-root.pem")
        with open(new_only, "w") as f:
            f.write(pems(root)[0])
        client_call(pb2, pb2_grpc, address, new_only, token, make_csr()[1])
        # And an agent started now, given root-cert.pem, becomes ready.
        node = Node(os.path.join(workdir, "late"), AGENT_BIN, ENVOY_BIN)
        node.signer = signer
        node.jwks = jwks
        try:
            node.start_agent("--upstream-ca", address, "--upstream-ca-bundle", root, "--audience", "istio-ca")
            wait_until(lambda: "upstream CA reachable" in node.agent.output(), 30, "the late agent to reach the CA")
        finally:
            node.stop_all()
    finally:
        ca.stop()


def test_ca_serve_takes_a_config_file_and_the_environment_and_reports_metrics_like_serve(workdir):
    """`ca serve` had no --config or SDS_AGENT_*, no build-info or CA-expiry metric."""
    import json
    from sdsdemo.node import http_get
    directory = os.path.join(workdir, "etc")
    os.makedirs(directory)
    signer = TokenSigner()
    signer.write_jwks(os.path.join(directory, "keys.json"))
    config = os.path.join(directory, "ca.yaml")
    with open(config, "w") as f:
        f.write(f"trust-domain: cluster.local\njwks: keys.json\nlisten: 127.0.0.1:{free_port()}\n")
    env = {**os.environ, "SDS_AGENT_CERT_TTL": "2h"}
    ca = Process("ca", [AGENT_BIN, "ca", "serve", "--config", config, "--state-dir", os.path.join(workdir, "state"),
                        "--metrics-address", "127.0.0.1:0", "--log-format", "json"], os.path.join(workdir, "ca.log"), env=env)
    try:
        wait_until(lambda: "serving Istio's CSR API" in ca.output() or not ca.alive(), 30, "ca serve listening")
        records = [json.loads(line) for line in ca.output().splitlines()]
        effective = next(r for r in records if r["message"] == "effective configuration")
        assert effective["cert-ttl"] == "2h (environment)" and effective["jwks"] == f"{directory}/keys.json (file)", effective
        address = next(r["address"] for r in records if r["message"] == "metrics endpoint listening")
        wait_until(lambda: http_get(f"http://{address}/readyz")[0] == 200, 10, "ready")
        body = http_get(f"http://{address}/metrics")[1]
        assert "sds_agent_build_info{" in body
        wait_until(lambda: "sds_agent_ca_expiry_seconds " in http_get(f"http://{address}/metrics")[1], 15, "the CA expiry gauge")
    finally:
        ca.stop()


def test_forwarding_tokens_for_an_audience_the_ca_refuses_is_warned_at_start_and_said_in_readiness(workdir):
    """With the README's --audience sds-agent in forward mode every CSR was refused while the
    agent said ready."""
    import subprocess
    signer = TokenSigner()
    jwks = signer.write_jwks(os.path.join(workdir, "jwks.json"))
    ca, address, root = start_ca(workdir, jwks)
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    node.signer = signer
    node.jwks = jwks
    try:
        node.start_agent("--upstream-ca", address, "--upstream-ca-bundle", root, "--audience", "sds-agent")
        assert "does not include it; every CSR may be refused" in node.agent.output()
        from test_served_secrets import fetch
        with pytest.raises(grpc.RpcError) as refused:
            fetch(node, signer.token("demo", "frontend", audience="sds-agent"), ["default"])
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        check = subprocess.run([AGENT_BIN, "check", "--socket", node.socket], capture_output=True, text=True, timeout=30)
        assert check.returncode == 1 and "refuses the callers' forwarded tokens" in check.stderr, check.stderr
    finally:
        node.stop_all()
        ca.stop()
