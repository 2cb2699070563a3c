"""Rotation with real Envoys under continuous traffic: certificates, CA root, and token expiry.

Every test runs its own agent with short lifetimes, sends requests through a client Envoy
without pause (each on a new upstream TLS connection, so rotated certificates are really used),
and requires zero failed requests, no Envoy restart, and the new serials in Envoy's /certs.
"""
import os
import signal
import shutil
import subprocess
import tempfile

from cryptography import x509

import pytest

from conftest import AGENT_BIN, ENVOY_BIN, TD, FRONTEND, BACKEND
from sdsdemo.devtokens import TokenSigner
from sdsdemo.node import Load, Node, wait_until
from test_served_secrets import fetch


@pytest.fixture
def fresh_node():
    nodes = []

    def make(*agent_args):
        workdir = tempfile.mkdtemp(prefix="sds-rot-")
        node = Node(workdir, AGENT_BIN, ENVOY_BIN)
        node.start_agent("--log-level", "debug", *agent_args)
        nodes.append((node, workdir))
        return node

    yield make
    for node, workdir in nodes:
        node.stop_all()
        if os.environ.get("SDS_E2E_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)


def mesh(node, api_type, clients=1):
    """A backend Envoy and `clients` frontend Envoys sharing one identity, all via `api_type`."""
    app = node.start_app("backend")
    server = node.start_envoy("backend", node.token_file("backend", "demo", "backend"), app_port=app,
                              allow_ids=[FRONTEND], api_type=api_type)
    token = node.token_file("frontend", "demo", "frontend")
    fronts = [node.start_envoy(f"frontend{i}", token, upstream_port=server.inbound_port, upstream_ids=[BACKEND],
                               api_type=api_type, max_requests_per_connection=1) for i in range(clients)]
    return server, fronts


def uptime(envoy):
    return envoy.stats()["server.uptime"]


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
def test_certificates_rotate_under_load_with_no_failed_request_and_no_restart(fresh_node, api_type):
    node = fresh_node("--cert-ttl", "24s", "--rotation-jitter", "0.1")
    server, (front_a, front_b) = mesh(node, api_type, clients=2)
    start_uptime = uptime(front_a)
    first = front_a.serials_for(FRONTEND)
    assert len(first) == 1 and front_b.serials_for(FRONTEND) == first, "one identity, one certificate"

    load = Load(front_a)
    seen = [first]
    try:
        def rotated():
            current = front_a.serials_for(FRONTEND)
            if len(current) == 1 and current != seen[-1]:
                seen.append(current)
            return len(seen) >= 3  # two rotations
        wait_until(rotated, 60, "two rotations of the frontend certificate")
        # Every stream of the identity got the rotation; the backend rotated too.
        wait_until(lambda: front_b.serials_for(FRONTEND) == seen[-1], 15, "the second frontend Envoy to get the push")
        assert server.serials_for(BACKEND) and server.serials_for(BACKEND) != set()
    finally:
        results = load.stop()
    assert results.get(200, 0) > 50 and set(results) == {200}, f"{results} {load.errors}"
    for envoy in (front_a, front_b, server):
        stats = envoy.stats()
        assert stats["server.hot_restart_epoch"] == 0
        assert stats.get("sds.default.update_rejected", 0) == 0
    assert uptime(front_a) > start_uptime
    assert front_a.stats()["sds.default.update_success"] >= 3
    log = node.agent.output()
    assert log.count("rotated workload certificate") >= 2
    assert ("pushed new secrets (delta)" if api_type == "DELTA_GRPC" else "pushed new secrets") in log


def test_ca_root_rotation_under_load(fresh_node, tmp_path):
    node = fresh_node("--cert-ttl", "20s", "--ca-activation-delay", "2s")
    server, (front,) = mesh(node, "GRPC")
    old_root = front.serials_for(TD)
    assert len(old_root) == 1

    load = Load(front)
    try:
        os.kill(node.agent.pid, signal.SIGUSR1)
        # 1. old + new roots published to every stream
        wait_until(lambda: len(front.serials_for(TD)) == 2 and len(server.serials_for(TD)) == 2, 20,
                   "both roots in every Envoy's validation context")
        new_root = front.serials_for(TD) - old_root
        # 2. leaves re-issued from the new root; 3. old root dropped after its last leaf expired
        wait_until(lambda: front.serials_for(TD) == new_root and server.serials_for(TD) == new_root, 60,
                   "the old root to be retired everywhere")
    finally:
        results = load.stop()
    assert results.get(200, 0) > 50 and set(results) == {200}, f"{results} {load.errors}"
    # The leaf Envoy holds (the identity's one certificate) now chains to the new root alone.
    _, secrets = fetch(node, node.signer.token("demo", "frontend"), ["default", "ROOTCA"])
    leaf_serials = {format(x509.load_pem_x509_certificate(
        secrets["default"].tls_certificate.certificate_chain.inline_bytes).serial_number, "x")}
    assert {s.lstrip("0") for s in front.serials_for(FRONTEND)} == {s.lstrip("0") for s in leaf_serials}
    (tmp_path / "chain.pem").write_bytes(secrets["default"].tls_certificate.certificate_chain.inline_bytes)
    (tmp_path / "bundle.pem").write_bytes(secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes)
    assert secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes.count(b"BEGIN CERTIFICATE") == 1
    verify = subprocess.run(["openssl", "verify", "-CAfile", tmp_path / "bundle.pem", tmp_path / "chain.pem"],
                            capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    log = node.agent.output()
    for phase in ("prepared the next root", "now signing with the new root", "retired old root"):
        assert phase in log, phase
    assert front.stats()["server.hot_restart_epoch"] == 0


def test_stream_ends_before_the_token_expires_and_envoy_reconnects_with_the_new_one(fresh_node):
    node = fresh_node("--token-expiry-margin", "5s")
    app = node.start_app("backend")
    server = node.start_envoy("backend", node.token_file("backend", "demo", "backend"), app_port=app,
                              allow_ids=[FRONTEND])
    # Two frontends whose 20 s tokens are replaced, as kubelet does (atomic rename): one with a
    # fresh valid token, the other with a forged one.
    good = node.start_envoy("good", node.token_file("good", "demo", "frontend", ttl=20),
                            upstream_port=server.inbound_port, upstream_ids=[BACKEND], max_requests_per_connection=1)
    bad = node.start_envoy("bad", node.token_file("bad", "demo", "frontend", ttl=20),
                           upstream_port=server.inbound_port, upstream_ids=[BACKEND], max_requests_per_connection=1)
    serial = good.serials_for(FRONTEND)
    bad_successes = bad.stats()["sds.default.update_success"]
    assert node.agent.output().count("reason=bad_signature") == 0

    node.token_file("good", "demo", "frontend", ttl=3600)
    impostor = TokenSigner()
    node.token_file("bad", "demo", "frontend",
                    token=impostor.sign(impostor.claims("demo", "frontend", ttl=3600), kid=node.signer.kid))
    loads = [Load(good), Load(bad)]
    try:
        wait_until(lambda: node.agent.output().count("the service-account token this stream was opened with expires") >= 4,
                   40, "the agent to end both frontends' streams before their 20 s tokens expire")
        # The good one reconnected with its re-read token and is served again...
        wait_until(lambda: good.stats()["sds.default.update_success"] >= 2 or
                   good.stats().get("sds.default.update_attempt", 0) >= 2, 15, "the good Envoy to resubscribe")
        # ...the bad one was refused, with the reason in the log, and got nothing new.
        wait_until(lambda: node.agent.output().count("reason=bad_signature") >= 1, 15, "the forged token to be refused")
    finally:
        results = [load.stop() for load in loads]
    for result, load in zip(results, loads):
        # Both keep their current (still valid) certificate: traffic does not notice.
        assert result.get(200, 0) > 20 and set(result) == {200}, f"{result} {load.errors}"
    assert good.serials_for(FRONTEND) == serial
    assert bad.stats()["sds.default.update_success"] == bad_successes
    log = node.agent.output()
    assert "token failed verification" in log
    for envoy in (good, bad):
        assert envoy.stats()["server.hot_restart_epoch"] == 0
