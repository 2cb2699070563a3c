"""Two real Envoys get their certificates from the agent and talk mutual TLS."""
import pytest

from sdsdemo.devtokens import TokenSigner
from sdsdemo.node import wait_until
from conftest import TD, FRONTEND, BACKEND


def pair(node, envoys, validation_context_name, client_sa="frontend", client_token=None, **client_kwargs):
    app = node.start_app(f"backend-{validation_context_name.replace('/', '_').replace(':', '')}")
    server = envoys("backend", node.token_file("backend", "demo", "backend"), app_port=app,
                    allow_ids=[FRONTEND], validation_context_name=validation_context_name)
    token = client_token or node.token_file(client_sa, "demo", client_sa)
    client = envoys(client_sa, token, upstream_port=server.inbound_port, upstream_ids=[BACKEND],
                    validation_context_name=validation_context_name, **client_kwargs)
    return server, client


@pytest.mark.parametrize("validation_context_name", ["ROOTCA", TD])
def test_mtls_between_two_envoys(node, envoys, validation_context_name):
    server, client = pair(node, envoys, validation_context_name)

    status, body = client.get("/hello")
    assert status == 200, body
    # The backend app sees the identity Envoy verified in the frontend's certificate.
    assert f"caller identity: {FRONTEND}" in body

    for envoy, identity in ((client, FRONTEND), (server, BACKEND)):
        sans = [san.get("uri") for cert in envoy.sds_certificates() for san in cert.get("subject_alt_names", [])]
        assert identity in sans, f"{envoy.name} holds {sans}"
        assert TD in sans  # the root, from the validation context
        stats = envoy.stats()
        stat_name = "sds.spiffe_cluster.local" if validation_context_name == TD else f"sds.{validation_context_name}"
        assert stats.get(f"{stat_name}.update_success", 0) >= 1, sorted(k for k in stats if k.startswith("sds."))
        assert stats.get("sds.default.update_rejected", 0) == 0

    # What Prometheus would scrape: both identities issued, both Envoys' streams open, no NACK.
    metrics = node.agent_metrics()
    assert metrics.get('sds_agent_certificates_issued_total{kind="new"}', 0) >= 2, metrics
    assert metrics.get('sds_agent_open_streams{api="sotw"}', 0) >= 2, metrics
    assert metrics.get('sds_agent_nacks_total{api="sotw"}', 0) == 0, metrics


def test_server_refuses_an_identity_it_does_not_allow(node, envoys):
    server, intruder = pair(node, envoys, "ROOTCA", client_sa="intruder")

    status, _ = intruder.get("/hello")
    assert status == 503
    # The intruder has a valid certificate for its own identity; the backend's SAN matcher refused it.
    assert any(f"{TD}/ns/demo/sa/intruder" == san.get("uri")
               for cert in intruder.sds_certificates() for san in cert.get("subject_alt_names", []))
    failures = wait_until(lambda: sum(v for k, v in server.stats().items() if k.endswith("ssl.fail_verify_san")),
                          10, "the backend to count a SAN verification failure")
    assert failures >= 1


def test_a_bad_token_gets_no_certificate_and_tls_fails(node, envoys):
    # Right shape and the trusted key's kid, but signed by another key.
    impostor = TokenSigner()
    forged = impostor.sign(impostor.claims("demo", "frontend"), kid=node.signer.kid)
    forged_file = node.token_file("forged", "demo", "frontend", token=forged)
    # A short initial_fetch_timeout lets this Envoy go LIVE without a certificate, so the
    # failure shows as a failed TLS handshake rather than an Envoy that never starts.
    server, client = pair(node, envoys, "ROOTCA", client_token=forged_file, initial_fetch_timeout="1s")

    status, _ = client.get("/hello")
    assert status == 503
    assert not any(san.get("uri") == FRONTEND
                   for cert in client.sds_certificates() for san in cert.get("subject_alt_names", []))
    log = node.agent.output()
    assert "token failed verification" in log and "reason=bad_signature" in log
    assert forged not in log, "the agent must never log a token"
    assert client.stats().get("sds.default.update_success", 0) == 0
    refused = node.agent_metrics().get('sds_agent_refused_calls_total{code="unauthenticated",reason="bad_signature"}', 0)
    assert refused >= 1, "the refusal is counted by reason"


def test_a_namespace_the_policy_denies_gets_no_certificate_while_an_allowed_one_works(tmp_path):
    # Its own agent: only namespace `demo` may get identities.
    from conftest import AGENT_BIN, ENVOY_BIN
    from sdsdemo.node import Node
    node = Node(str(tmp_path / "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent("--allow-namespace", "demo")
        app = node.start_app("backend")
        server = node.start_envoy("backend", node.token_file("backend", "demo", "backend"), app_port=app,
                                  allow_ids=[f"{TD}/ns/demo/*", f"{TD}/ns/other/*"])
        allowed = node.start_envoy("allowed", node.token_file("allowed", "demo", "frontend"),
                                   upstream_port=server.inbound_port, upstream_ids=[BACKEND])
        denied = node.start_envoy("denied", node.token_file("denied", "other", "frontend"),
                                  upstream_port=server.inbound_port, upstream_ids=[BACKEND], initial_fetch_timeout="1s")
        assert allowed.get("/hello")[0] == 200
        assert denied.get("/hello")[0] == 503
        assert not denied.serials_for(f"{TD}/ns/other/sa/frontend")
        log = node.agent.output()
        assert "caller not authorized by policy" in log and "other/frontend matches no allow rule" in log
        assert "spiffe://cluster.local/ns/other/sa/frontend" not in [
            line.split("spiffe_id=")[1].split()[0] for line in log.splitlines() if "issued workload certificate" in line]
    finally:
        node.stop_all()


def test_sigterm_with_envoys_connected_is_a_clean_exit(tmp_path):
    # Its own agent, so stopping it does not disturb the module's. A DaemonSet rollout sends
    # SIGTERM with sidecars connected: the agent cuts their streams and exits 0, quietly.
    from conftest import AGENT_BIN, ENVOY_BIN
    from sdsdemo.node import Node
    node = Node(str(tmp_path / "node"), AGENT_BIN, ENVOY_BIN)
    try:
        agent = node.start_agent("--metrics-address", "127.0.0.1:0")
        envoy = node.start_envoy("frontend", node.token_file("frontend", "demo", "frontend"))
        assert node.agent_metrics().get('sds_agent_open_streams{api="sotw"}', 0) >= 1
        agent.stop()
        assert agent.popen.returncode == 0, agent.output()[-2000:]
        log = agent.output()
        assert "shutting down" in log and "critical" not in log, log[-2000:]
        assert envoy.process.alive(), "Envoy keeps running and retries on its own"
    finally:
        node.stop_all()


def make_ca(tmp_path):
    """An operator's PKI: an offline root and, under it, the intermediate the agent signs with."""
    import datetime
    from cryptography import x509 as cx
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, issuer_key, path_length):
        builder = (cx.CertificateBuilder()
                   .subject_name(cx.Name([cx.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(cx.Name([cx.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(cx.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(cx.BasicConstraints(ca=True, path_length=path_length), critical=True)
                   .add_extension(cx.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True))
        return builder.sign(issuer_key, hashes.SHA256())

    root_key, int_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = cert("example corp root", "example corp root", root_key, root_key, None)
    intermediate = cert("mesh intermediate", "example corp root", int_key, root_key, 0)
    pem = serialization.Encoding.PEM
    (tmp_path / "root.pem").write_bytes(root.public_bytes(pem))
    (tmp_path / "int.pem").write_bytes(intermediate.public_bytes(pem))
    (tmp_path / "int-key.pem").write_bytes(int_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "int-key.pem").chmod(0o600)  # a CA key readable by others is refused
    return tmp_path / "root.pem", tmp_path / "int.pem", tmp_path / "int-key.pem"


def test_an_intermediate_ca_under_the_operators_root_serves_mtls(tmp_path):
    # The usual plug-in CA: the agent signs with an intermediate; Envoy trusts only the root. The
    # leaf's chain must carry the intermediate (it was dropped before: every issuance failed).
    import subprocess
    from conftest import AGENT_BIN, ENVOY_BIN
    from sdsdemo.node import Node
    from test_served_secrets import fetch
    root, intermediate, key = make_ca(tmp_path)
    node = Node(str(tmp_path / "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent("--ca-cert", str(intermediate), "--ca-key", str(key), "--ca-bundle", str(root))
        app = node.start_app("backend")
        server = node.start_envoy("backend", node.token_file("backend", "demo", "backend"), app_port=app,
                                  allow_ids=[FRONTEND])
        client = node.start_envoy("frontend", node.token_file("frontend", "demo", "frontend"),
                                  upstream_port=server.inbound_port, upstream_ids=[BACKEND])
        status, body = client.get("/hello")
        assert status == 200 and f"caller identity: {FRONTEND}" in body, body
        _, secrets = fetch(node, node.signer.token("demo", "checker"), ["default", "ROOTCA"])
        (tmp_path / "chain.pem").write_bytes(secrets["default"].tls_certificate.certificate_chain.inline_bytes)
        assert secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes == root.read_bytes()
        verify = subprocess.run(["openssl", "verify", "-CAfile", root, "-untrusted", tmp_path / "chain.pem",
                                 tmp_path / "chain.pem"], capture_output=True, text=True, timeout=30)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert secrets["default"].tls_certificate.certificate_chain.inline_bytes.count(b"BEGIN CERTIFICATE") == 2
    finally:
        node.stop_all()
