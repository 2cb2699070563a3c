"""Peer binding with real Envoys: the agent reads each connection's SO_PEERCRED from the kernel.

There is no Kubernetes node here, so pod membership comes from a fixture /proc (`--proc-root`):
each Envoy is started through a shell that writes `<proc-root>/<its own pid>/cgroup`, naming a
pod UID the way the kubelet's systemd cgroup driver does, and then execs Envoy under that pid.
The uid checks use the real uid of the Envoy processes.
"""
import os
import uuid

from conftest import AGENT_BIN, ENVOY_BIN, in_pod, TD, FRONTEND, BACKEND
from sdsdemo.node import Node


def test_an_envoy_running_as_a_uid_not_allowed_gets_no_certificate(tmp_path):
    node = Node(str(tmp_path / "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent("--peer-allowed-uid", str(os.getuid() + 4242))
        envoy = node.start_envoy("frontend", node.token_file("frontend", "demo", "frontend"),
                                 initial_fetch_timeout="1s")
        assert not envoy.serials_for(FRONTEND)
        assert envoy.stats().get("sds.default.update_success", 0) == 0
        log = node.agent.output()
        assert "refused SDS call: peer not allowed" in log
        assert f"peer_uid={os.getuid()}" in log and f"peer_pid={envoy.process.pid}" in log
        assert "issued workload certificate" not in log
    finally:
        node.stop_all()


def test_a_token_works_only_from_the_pod_it_is_bound_to(tmp_path):
    node = Node(str(tmp_path / "node"), AGENT_BIN, ENVOY_BIN)
    proc_root = str(tmp_path / "proc")
    os.makedirs(proc_root)
    backend_pod, frontend_pod, thief_pod = (str(uuid.uuid4()) for _ in range(3))
    try:
        node.start_agent("--peer-allowed-uid", str(os.getuid()), "--peer-pod-binding", "--proc-root", proc_root)
        app = node.start_app("backend")
        server = node.start_envoy("backend", node.token_file("backend", "demo", "backend", pod_uid=backend_pod),
                                  app_port=app, allow_ids=[FRONTEND], launcher=in_pod(proc_root, backend_pod))
        frontend_token = node.token_file("frontend", "demo", "frontend", pod_uid=frontend_pod)
        client = node.start_envoy("frontend", frontend_token, upstream_port=server.inbound_port,
                                  upstream_ids=[BACKEND], launcher=in_pod(proc_root, frontend_pod))
        # The frontend's token file, copied into another pod.
        thief = node.start_envoy("thief", frontend_token, upstream_port=server.inbound_port, upstream_ids=[BACKEND],
                                 initial_fetch_timeout="1s", launcher=in_pod(proc_root, thief_pod))

        assert client.get("/hello")[0] == 200
        assert client.serials_for(FRONTEND)
        assert thief.get("/hello")[0] == 503
        assert not thief.serials_for(FRONTEND)
        log = node.agent.output()
        assert "the token does not belong to the calling pod" in log
        assert f"bound to pod {frontend_pod} but the caller (pid {thief.process.pid}) runs in pod {thief_pod}" in log
    finally:
        node.stop_all()
