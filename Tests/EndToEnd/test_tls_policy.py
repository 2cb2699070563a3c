"""`--tls-policy`: the key exchange of the agent's own TLS links, seen from outside and held to a policy.

Between an agent and `ca serve` (both ours, swift-nio-ssl) the link negotiates X25519MLKEM768; each
end reads the group from the ServerHello on the wire and says so (a debug line, a metric per link).
Under `pqc` a peer that settles on anything else is refused before a byte of the call: classical
peers are OpenSSL 3.0's `s_client` and `s_server` (Debian's, which has no ML-KEM at all).
"""
import os
import re
import socket
import subprocess

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from conftest import AGENT_BIN, ENVOY_BIN
from fake_apiserver import _certificates
from sdsdemo.devtokens import TokenSigner
from sdsdemo.node import Node, Process, free_port, http_get, wait_until

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
HYBRID = 'group="X25519MLKEM768"'


def metrics(process):
    """{'name{labels}': value} from a process started with --metrics-address 127.0.0.1:0."""
    match = wait_until(lambda: ([None] + list(re.finditer(r"address=(\S+).*metrics endpoint listening",
                                                          process.output())))[-1], 10, "the metrics endpoint")
    status, body = http_get(f"http://{match.group(1)}/metrics")
    assert status == 200, body
    return {key: float(value) for key, value in
            (line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#"))}


def total(samples, name, *labels):
    """The sum of `name` over the series that carry every label in `labels` (`key="value"`)."""
    return sum(value for key, value in samples.items()
               if key.startswith(name + "{") and all(label in key for label in labels))


def start_ca(workdir, jwks, *extra):
    port = free_port()
    state = os.path.join(workdir, "ca-state")
    process = Process("ca", [AGENT_BIN, "ca", "serve", "--listen", f"127.0.0.1:{port}", "--trust-domain", "cluster.local",
                             "--jwks", jwks, "--state-dir", state, "--metrics-address", "127.0.0.1:0",
                             "--log-level", "debug", *extra], os.path.join(workdir, f"ca-{port}.log"))
    wait_until(lambda: "serving Istio's CSR API" in process.output() or not process.alive(), 30, "ca serve listening")
    assert process.alive(), process.output()
    return process, f"127.0.0.1:{port}", os.path.join(state, "ca", "root-cert.pem")


def fetch(node, token, timeout=15):
    with grpc.insecure_channel(f"unix:{node.socket}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        request = discovery_pb2.DiscoveryRequest(resource_names=["default"], type_url=SECRET_TYPE)
        return stub.FetchSecrets(request, metadata=[("authorization", f"Bearer {token}")], timeout=timeout)


def s_client(address, *args):
    """OpenSSL's client against `address`: (exit code, everything it printed)."""
    # Not text=True: after a handshake it prints what the server sends (HTTP/2 frames), raw.
    result = subprocess.run(["openssl", "s_client", "-connect", address, *args], stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=20)
    return result.returncode, (result.stdout + result.stderr).decode("utf-8", errors="replace")


def test_an_agent_and_ca_serve_under_pqc_negotiate_x25519mlkem768_and_both_say_so(workdir):
    signer = TokenSigner()
    jwks = signer.write_jwks(os.path.join(workdir, "jwks.json"))
    ca, address, root = start_ca(workdir, jwks, "--tls-policy", "pqc")
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    node.signer = signer
    node.jwks = jwks
    try:
        node.start_agent("--upstream-ca", address, "--upstream-ca-bundle", root, "--audience", "istio-ca",
                         "--tls-policy", "pqc", "--metrics-address", "127.0.0.1:0", "--log-level", "debug")
        assert len(fetch(node, signer.token("demo", "frontend", audience="istio-ca")).resources) == 1
        agent, server = metrics(node.agent), metrics(ca)
        assert total(agent, "sds_agent_tls_handshakes_total", 'link="upstream_ca"', HYBRID, 'version="TLS 1.3"') >= 1, agent
        assert total(server, "sds_agent_tls_handshakes_total", 'link="ca_serve"', HYBRID, 'version="TLS 1.3"') >= 1, server
        assert total(agent, "sds_agent_tls_refused_total") == 0 and total(server, "sds_agent_tls_refused_total") == 0
        for output in (node.agent.output(), ca.output()):
            assert re.search(r"group=X25519MLKEM768 .*TLS key exchange|TLS key exchange.*group=X25519MLKEM768", output), output[-2000:]
    finally:
        node.stop_all()
        ca.stop()


def test_a_pqc_ca_serve_refuses_classical_clients_with_a_handshake_failure(workdir):
    signer = TokenSigner()
    jwks = signer.write_jwks(os.path.join(workdir, "jwks.json"))
    ca, address, _ = start_ca(workdir, jwks, "--tls-policy", "pqc")
    try:
        for args in (["-tls1_3", "-groups", "X25519"], ["-tls1_2"]):
            code, printed = s_client(address, *args)
            assert code != 0, printed
            assert "handshake failure" in printed, printed
            assert "BEGIN CERTIFICATE" not in printed, "no certificate is sent to a refused client"
        # One line per link and minute (the second refusal is counted, and named in the next line).
        line = "TLS link refused by --tls-policy pqc: x25519 is not X25519MLKEM768"
        wait_until(lambda: line in ca.output(), 10, "the refusal's line")
        assert "TLS 1.2 has no post-quantum key exchange" not in ca.output()
        assert total(metrics(ca), "sds_agent_tls_refused_total", 'link="ca_serve"') == 2
        assert ca.alive()
    finally:
        ca.stop()

    # The same classical client is taken under the default policy, and its group counted.
    ca, address, _ = start_ca(workdir, jwks)
    try:
        code, printed = s_client(address, "-tls1_3", "-groups", "X25519")
        assert code == 0, printed
        assert total(metrics(ca), "sds_agent_tls_handshakes_total", 'link="ca_serve"', 'group="x25519"') == 1
    finally:
        ca.stop()


def test_a_pqc_agent_refuses_a_classical_upstream_ca_before_sending_its_call(workdir):
    ca_file, cert_file, key_file = _certificates(workdir)
    port = free_port()
    # OpenSSL's server, printing every TLS message it sends and receives (-msg).
    classical = Process("s_server", ["openssl", "s_server", "-accept", str(port), "-cert", cert_file, "-key", key_file,
                                     "-groups", "X25519", "-www", "-msg"], os.path.join(workdir, "s_server.log"))

    def listening():
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0
    wait_until(listening, 10, "s_server listening")
    signer = TokenSigner()
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    node.signer = signer
    signer.write_jwks(node.jwks)
    try:
        # Not `start_agent`: it waits for an agent that can issue, and this one never can.
        node.agent = node.start("sds-agent", [
            AGENT_BIN, "serve", "--socket", node.socket, "--trust-domain", "cluster.local", "--jwks", node.jwks,
            "--state-dir", os.path.join(node.workdir, "state"), "--upstream-ca", f"127.0.0.1:{port}",
            "--upstream-ca-bundle", ca_file, "--audience", "istio-ca", "--tls-policy", "pqc",
            "--metrics-address", "127.0.0.1:0"])
        wait_until(lambda: os.path.exists(node.socket), 30, "the agent's socket")
        token = signer.token("demo", "frontend", audience="istio-ca")
        with pytest.raises(grpc.RpcError) as refused:
            fetch(node, token, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        line = "TLS link refused by --tls-policy pqc: x25519 is not X25519MLKEM768"
        wait_until(lambda: line in node.agent.output(), 20, "the agent's refusal")
        assert re.search(r"link=upstream_ca", node.agent.output())
        assert total(metrics(node.agent), "sds_agent_tls_refused_total", 'link="upstream_ca"') >= 1
        # The client answered no ServerHello: it never sent its Finished, let alone the call and its token.
        received = [line for line in classical.output().splitlines() if line.startswith("<<<")]
        assert any("ClientHello" in line for line in received), classical.output()
        assert not any("Finished" in line or "ApplicationData" in line for line in received), received
        assert node.agent.alive()
    finally:
        node.stop_all()
        classical.stop()
