"""OIDC discovery and TokenReview with real Envoys. The API server is fake_apiserver.py, a local
HTTPS stand-in (there is none on these machines); the agent's client is its real one."""
from conftest import AGENT_BIN, ENVOY_BIN, TD, FRONTEND, BACKEND
from fake_apiserver import FakeAPIServer
from sdsdemo.node import Node


def test_keys_from_oidc_discovery_and_every_token_reviewed_by_the_api_server(tmp_path):
    node = Node(str(tmp_path / "node"), AGENT_BIN, ENVOY_BIN)
    with FakeAPIServer(str(tmp_path), node.signer) as api:
        try:
            node.start_agent("--oidc-discovery", "--token-review", *api.agent_args(), jwks=False)
            app = node.start_app("backend")
            server = node.start_envoy("backend", node.token_file("backend", "demo", "backend"), app_port=app,
                                      allow_ids=[FRONTEND])
            client = node.start_envoy("frontend", node.token_file("frontend", "demo", "frontend"),
                                      upstream_port=server.inbound_port, upstream_ids=[BACKEND])
            assert client.get("/hello")[0] == 200
            assert client.serials_for(FRONTEND)

            calls = [(method, path) for method, path, _ in api.requests]
            assert ("GET", "/.well-known/openid-configuration") in calls and ("GET", "/openid/v1/jwks") in calls
            assert calls.count(("POST", "/apis/authentication.k8s.io/v1/tokenreviews")) >= 2
            assert all(auth == f"Bearer {api.agent_token}" for _, _, auth in api.requests)

            # A token that is validly signed but that the API server no longer honours (its pod
            # was deleted): local verification alone would accept it; the review refuses it.
            revoked = node.signer.token("demo", "frontend")
            api.revoked.add(revoked)
            gone = node.start_envoy("gone", node.token_file("gone", "demo", "frontend", token=revoked),
                                    upstream_port=server.inbound_port, upstream_ids=[BACKEND],
                                    initial_fetch_timeout="1s")
            assert gone.get("/hello")[0] == 503
            assert gone.stats().get("sds.default.update_success", 0) == 0
            log = node.agent.output()
            assert "reason=token_review_rejected" in log and "pod frontend-gone not found" in log
            assert revoked not in log, "the agent must never log a token"
        finally:
            node.stop_all()
