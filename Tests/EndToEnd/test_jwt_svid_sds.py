"""JWT-SVIDs over SDS for Envoy's credential injector (issue 25, section 3).

A client Envoy rendered with `bootstrap --jwt-svid-audience backend-api` asks the agent for the
`generic_secret` `jwt-svid:backend-api` and puts it ("Bearer <JWT-SVID>") in the Authorization
header of every request it sends upstream. The upstream is a real Envoy too: its `jwt_authn`
filter checks the bearer token against the agent's JWT bundle, fetched from the agent's own
Workload API (the SPIFFE way a server gets it), with its audience and a clock skew of one second,
and hands `sub` and `exp` to the app, which echoes them. The attested socket needs the stand-ins
of test_workload_attestation (the API server, /proc); the Envoys, the agent and the tokens are real.
"""
import json
import os
import re
import time

import grpc
import yaml
from spiffe._proto import workload_pb2, workload_pb2_grpc

from conftest import BACKEND, FRONTEND, TD, TRUST_DOMAIN, put_in_pod
from sdsdemo.node import wait_until
from test_upstream_ca import fetch
from test_workload_attestation import AttestedNode

AUDIENCE = "backend-api"
PAYMENTS = f"{TD}/ns/demo/sa/payments"
REPORTS = f"{TD}/ns/demo/sa/reports"


def jwks_from_the_workload_api(attested):
    """The agent's JWT bundle (a JWKS) for our trust domain, as FetchJWTBundles streams it."""
    with grpc.insecure_channel(f"unix:{attested.workload_socket}") as channel:
        call = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchJWTBundles(
            workload_pb2.JWTBundlesRequest(), metadata=[("workload.spiffe.io", "true")], timeout=15)
        response = next(call)
        call.cancel()
    (jwks,) = [bundle for name, bundle in response.bundles.items() if TRUST_DOMAIN in name]
    return json.loads(jwks)


def checking_bearer_tokens(jwks_file):
    """Rewrites a rendered bootstrap: the inbound listener requires a bearer JWT that verifies
    with `jwks_file`, for AUDIENCE, not expired (1 s of skew), and passes sub and exp on."""
    def transform(path):
        with open(path) as f:
            bootstrap = yaml.safe_load(f)
        (inbound,) = [listener for listener in bootstrap["static_resources"]["listeners"] if listener["name"] == "inbound_mtls"]
        manager = inbound["filter_chains"][0]["filters"][0]["typed_config"]
        manager["http_filters"].insert(0, {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {"agent": {
                    "audiences": [AUDIENCE], "local_jwks": {"filename": jwks_file}, "clock_skew_seconds": 1,
                    "claim_to_headers": [{"header_name": "x-jwt-sub", "claim_name": "sub"},
                                         {"header_name": "x-jwt-exp", "claim_name": "exp"}]}},
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "agent"}}]}})
        with open(path, "w") as f:
            yaml.safe_dump(bootstrap, f)
    return transform


def claims_seen(body):
    sub = re.search(r"x-jwt-sub: (\S+?)(;|$)", body)
    exp = re.search(r"x-jwt-exp: (\d+)", body)
    return (sub.group(1) if sub else None), (int(exp.group(1)) if exp else None)


def test_envoys_credential_injector_sends_a_jwt_svid_the_upstream_checks_and_it_is_refreshed_on_sotw_and_delta(workdir):
    attested = AttestedNode(workdir, "--jwt-svid-ttl", "10s")
    node = attested.node
    try:
        put_in_pod(attested.proc, os.getpid(), attested.pod("demo", "backend-0", "backend"))
        attested.start()
        jwks_file = os.path.join(workdir, "agent-jwks.json")
        with open(jwks_file, "w") as f:
            json.dump(jwks_from_the_workload_api(attested), f)

        app = node.start_app("backend")
        backend = node.start_envoy("backend", node.token_file("backend", "demo", "backend"), app_port=app,
                                   allow_ids=[FRONTEND, PAYMENTS, REPORTS], transform=checking_bearer_tokens(jwks_file))

        def client(account, audience, api_type="GRPC"):
            return node.start_envoy(account, node.token_file(account, "demo", account), upstream_port=backend.inbound_port,
                                    upstream_ids=[BACKEND], api_type=api_type,
                                    bootstrap_args=["--jwt-svid-audience", audience])
        frontend = client("frontend", AUDIENCE)
        payments = client("payments", AUDIENCE, api_type="DELTA_GRPC")
        reports = client("reports", "other-api")

        # Each client's requests carry its own identity's JWT-SVID; a token for another audience is refused.
        firsts = {}
        for envoy, identity in ((frontend, FRONTEND), (payments, PAYMENTS)):
            status, body = envoy.get("/hello")
            assert status == 200, body
            sub, exp = claims_seen(body)
            assert sub == identity, body
            assert 0 < exp - time.time() <= 11, "the agent's --jwt-svid-ttl"
            firsts[envoy.name] = exp
        status, body = reports.get("/hello")
        assert status == 403 and "Audiences in Jwt are not allowed" in body, (status, body)

        # Past more than one lifetime (10 s), every request still carries a valid token: the agent
        # signs a new one at half its life and pushes it on the open SotW and Delta streams.
        statuses = {}

        def refreshed_twice():
            for envoy in (frontend, payments):
                status, body = envoy.get("/hello")
                statuses[status] = statuses.get(status, 0) + 1
                if status != 200 or claims_seen(body)[1] < firsts[envoy.name] + 8:
                    return False
            return time.time() > max(firsts.values()) + 1
        wait_until(refreshed_twice, 40, "tokens refreshed past the first one's expiry", interval=0.2)
        assert set(statuses) == {200}, statuses
        pushed = node.agent.output().count("JWT-SVID issued for SDS")
        assert pushed == 3, f"one first issuance per identity and audience ({pushed}); refreshes are pushed, not asked for"
        print(f"credential injector: {sum(statuses.values())} requests over more than one JWT-SVID lifetime, all 200")
    finally:
        attested.close()


def test_bad_jwt_svid_names_are_invalid_argument_and_nothing_is_signed(workdir):
    attested = AttestedNode(workdir)
    node = attested.node
    try:
        attested.start()
        token = node.signer.token("demo", "frontend")
        bad = ["jwt-svid:", "jwt-svid:a,,b", "jwt-svid:" + "x" * 257, "jwt-svid:a b", "jwt-svid:a\x01b",
               "jwt-svid:" + ",".join(f"a{i}" for i in range(17)), "jwt-svid:caf\u00e9"]
        for name in bad:
            try:
                fetch(node, token, [name])
                raise AssertionError(f"{name!r} was served")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code(), error.details())
                assert "\x01" not in error.details()
        # A good one beside: served, the header value exactly "Bearer <JWT>".
        from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
        (resource,) = fetch(node, token, [f"jwt-svid:{AUDIENCE}"]).resources
        secret = secret_pb2.Secret()
        resource.Unpack(secret)
        value = secret.generic_secret.secret.inline_string
        assert re.fullmatch(r"Bearer [A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", value), value
        assert node.agent.output().count("JWT-SVID issued for SDS") == 1
        assert node.agent.alive()
    finally:
        attested.close()
