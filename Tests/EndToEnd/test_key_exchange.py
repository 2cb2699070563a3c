"""Post-quantum key exchange between sidecars (issue 25, section 2).

The sidecar template offers the hybrid group X25519MLKEM768 first and sets TLS 1.3 as the upstream
side's maximum (Envoy's client side stops at TLS 1.2 by default, and TLS 1.2 has no hybrid group),
so a pair of real Envoys negotiates it; `bootstrap --key-exchange classical` renders the classical
groups alone, and the same pair negotiates X25519. Envoy counts each handshake's group in
`ssl.curves.<group>` on both sides: that is what is asserted.
"""
import os

from conftest import AGENT_BIN, BACKEND, ENVOY_BIN, FRONTEND
from sdsdemo.node import Node


def curves(envoy):
    """Handshakes by group, on the inbound listener and on the upstream cluster."""
    counts = {}
    for name, value in envoy.stats().items():
        if ".ssl.curves." in name and value:
            side = "upstream" if name.startswith("cluster.") else "inbound"
            counts[(side, name.rsplit(".", 1)[1])] = value
    return counts


def pair(node, key_exchange):
    app = node.start_app(f"backend-{key_exchange}")
    args = ["--key-exchange", key_exchange]
    backend = node.start_envoy(f"backend-{key_exchange}", node.token_file("backend", "demo", "backend"), app_port=app,
                               allow_ids=[FRONTEND], bootstrap_args=args)
    frontend = node.start_envoy(f"frontend-{key_exchange}", node.token_file("frontend", "demo", "frontend"),
                                upstream_port=backend.inbound_port, upstream_ids=[BACKEND], max_requests_per_connection=1,
                                bootstrap_args=args)
    return backend, frontend


def test_the_template_pair_negotiates_x25519mlkem768_and_the_classical_rendering_x25519(workdir):
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent()
        backend, frontend = pair(node, "pqc")
        for _ in range(3):
            assert frontend.get("/hello")[0] == 200
        # One connection per request: three handshakes, each hybrid on both sides.
        assert curves(frontend) == {("upstream", "X25519MLKEM768"): 3}, curves(frontend)
        assert curves(backend) == {("inbound", "X25519MLKEM768"): 3}, curves(backend)

        backend, frontend = pair(node, "classical")
        for _ in range(2):
            assert frontend.get("/hello")[0] == 200
        assert curves(frontend) == {("upstream", "X25519"): 2}, curves(frontend)
        assert curves(backend) == {("inbound", "X25519"): 2}, curves(backend)
        print(f"key exchange: pqc pair {curves(backend)}; classical pair {curves(frontend)}")
    finally:
        node.stop_all()
