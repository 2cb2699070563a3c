"""The compatibility suite: the same checks against each Envoy minor of scripts/envoy-versions.txt
(issue 25, section 1), the newest from .venv, the others from .envoys/<version>
(scripts/setup-envoys.sh). One agent per version; its Envoys use the shipped template as
`sds-agent bootstrap` renders it by default (post-quantum key exchange first).

Per version: the bootstrap `--mode validate`d; a SotW pair (`default` + `ROOTCA` on the server,
`default` + `spiffe://cluster.local` on the client) and a Delta client, mTLS 200 with the caller's
SPIFFE ID seen by the app and a wrong upstream SAN refused; the key exchange each handshake used;
natural rotation with a short TTL (a new serial in /certs, the same Envoy process); the agent
restarted under traffic with no failed request. docs/COMPATIBILITY.md holds the table.
"""
import os
import re
import subprocess

import pytest

from conftest import AGENT_BIN, BACKEND, ENVOY_BIN, FRONTEND, TD
from sdsdemo.node import Load, Node, wait_until

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
VERSIONS = [line.strip() for line in open(os.path.join(REPO, "scripts", "envoy-versions.txt"))
            if line.strip() and not line.startswith("#")]


def envoy_binary(version):
    if version == VERSIONS[-1]:
        return ENVOY_BIN
    path = os.path.join(REPO, ".envoys", version, "envoy", "_bin", "envoy")
    assert os.access(path, os.X_OK), f"Envoy {version} is not installed: run scripts/setup-envoys.sh"
    return path


def handshake_groups(envoy):
    return {name.rsplit(".", 1)[1] for name, value in envoy.stats().items() if ".ssl.curves." in name and value}


@pytest.mark.parametrize("version", VERSIONS)
def test_envoy_minor(version, workdir):
    binary = envoy_binary(version)
    reported = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    assert f"/{version}/" in reported, reported
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, binary)
    try:
        node.start_agent("--cert-ttl", "10s", "--rotation-jitter", "0.1")
        app = node.start_app("backend")
        backend = node.start_envoy("backend", node.token_file("backend", "demo", "backend"), app_port=app,
                                   allow_ids=[FRONTEND, f"{TD}/ns/demo/sa/payments"])
        checked = subprocess.run([binary, "--mode", "validate", "-c", backend.bootstrap_path, "--log-level", "error"],
                                 capture_output=True, text=True, timeout=60)
        assert f"configuration '{backend.bootstrap_path}' OK" in checked.stdout + checked.stderr, checked.stderr[-2000:]
        frontend = node.start_envoy("frontend", node.token_file("frontend", "demo", "frontend"),
                                    upstream_port=backend.inbound_port, upstream_ids=[BACKEND],
                                    validation_context_name=TD, max_requests_per_connection=1)
        delta = node.start_envoy("payments", node.token_file("payments", "demo", "payments"), api_type="DELTA_GRPC",
                                 upstream_port=backend.inbound_port, upstream_ids=[BACKEND])
        wrong = node.start_envoy("wrong-san", node.token_file("wrong", "demo", "frontend"),
                                 upstream_port=backend.inbound_port, upstream_ids=[f"{TD}/ns/demo/sa/someone-else"])

        status, body = frontend.get("/hello")
        assert status == 200 and f"caller identity: {FRONTEND}" in body, (status, body)
        status, body = delta.get("/hello")
        assert status == 200 and f"caller identity: {TD}/ns/demo/sa/payments" in body, (status, body)
        assert wrong.get("/hello")[0] == 503
        assert wrong.stats().get("cluster.upstream_mtls.ssl.fail_verify_san", 0) >= 1
        assert handshake_groups(frontend) == {"X25519MLKEM768"} and handshake_groups(backend) == {"X25519MLKEM768"}

        # Natural rotation (10 s certificates), under traffic, in the same Envoy process.
        load = Load(frontend)
        first = frontend.serials_for(FRONTEND)
        pid = frontend.process.pid
        wait_until(lambda: frontend.serials_for(FRONTEND) not in (set(), first), 30, "a rotated certificate in /certs")
        assert frontend.process.pid == pid and frontend.stats()["server.hot_restart_epoch"] == 0

        # The agent restarted (SIGTERM, then the same command) while the load runs: Envoys keep
        # their certificates meanwhile, reconnect, and get the next rotation from the new process.
        node.agent.stop()
        node.processes.remove(node.agent)
        node.start_agent("--cert-ttl", "10s", "--rotation-jitter", "0.1")
        after_restart = frontend.serials_for(FRONTEND)
        wait_until(lambda: frontend.serials_for(FRONTEND) not in (set(), after_restart), 30,
                   "a certificate from the restarted agent")
        results = load.stop()
        assert set(results) == {200} and results[200] > 20, (results, load.errors)
        print(f"Envoy {version}: {results[200]} requests across a rotation and an agent restart, 0 failed")
    finally:
        node.stop_all()
