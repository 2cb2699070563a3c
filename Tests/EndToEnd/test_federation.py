"""Federated trust domains with real Envoys: agents of different trust domains serve each other's
roots, and Envoy's SPIFFE validator (the `ALL` validation context) checks each peer against the
roots of the trust domain its SPIFFE ID names."""
import json
import os
import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import AGENT_BIN, ENVOY_BIN
from sdsdemo.node import Node, wait_until
from test_ca_operators import make_cert
from test_served_secrets import fetch

PEM = serialization.Encoding.PEM


def root(tmp_path, name):
    """A root CA (certificate and 0600 key files) for one trust domain."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_cert(f"{name} root", key)
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(PEM))
    key_file.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert, cert_file, key_file


def spiffe_bundle(tmp_path, name, cert):
    """The SPIFFE trust bundle format (JWKS with the root in x5c), as SPIRE's bundle endpoint serves."""
    path = tmp_path / f"{name}.spiffe.json"
    der = cert.public_bytes(serialization.Encoding.DER)
    path.write_text(json.dumps({"keys": [{"use": "x509-svid", "kty": "EC", "crv": "P-256",
                                          "x5c": [base64.b64encode(der).decode()]}], "spiffe_refresh_hint": 300}))
    return path


def agent(tmp_path, name, trust_domain, ca, signer, *federated):
    node = Node(str(tmp_path / name), AGENT_BIN, ENVOY_BIN)
    node.signer = signer
    signer.write_jwks(node.jwks)
    args = ["--trust-domain", trust_domain, "--ca-cert", str(ca[1]), "--ca-key", str(ca[2])]
    for spec in federated:
        args += ["--federated-bundle", spec]
    node.start_agent(*args)
    return node


def test_envoys_of_two_trust_domains_accept_each_other_and_nobody_else(tmp_path):
    signer = Node(str(tmp_path / "keys"), AGENT_BIN, ENVOY_BIN).signer
    local, other, third, impostor = (root(tmp_path, n) for n in ("local", "other", "third", "impostor"))
    nodes = []
    try:
        a = agent(tmp_path, "a", "cluster.local", local, signer, f"other.example={spiffe_bundle(tmp_path, 'other', other[0])}")
        b = agent(tmp_path, "b", "other.example", other, signer, f"cluster.local={local[1]}")
        c = agent(tmp_path, "c", "third.example", third, signer, f"cluster.local={local[1]}")
        d = agent(tmp_path, "d", "other.example", impostor, signer, f"cluster.local={local[1]}")
        nodes = [a, b, c, d]

        # What A serves: its own roots under its own names only, the federated ones under theirs.
        _, secrets = fetch(a, signer.token("demo", "x"), ["ROOTCA", "spiffe://cluster.local", "spiffe://other.example", "ALL"])
        own = local[0].public_bytes(PEM)
        assert secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes.strip() == own.strip()
        assert secrets["spiffe://other.example"].validation_context.trusted_ca.inline_bytes.strip() == other[0].public_bytes(PEM).strip()
        validator = secrets["ALL"].validation_context.custom_validator_config
        assert validator.name == "envoy.tls.cert_validator.spiffe"
        from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2 as spiffe
        config = spiffe.SPIFFECertValidatorConfig()
        validator.typed_config.Unpack(config)
        assert [(d.name, d.trust_bundle.inline_bytes.strip()) for d in config.trust_domains] == [
            ("cluster.local", own.strip()), ("other.example", other[0].public_bytes(PEM).strip())]

        app = a.start_app("backend")
        backend = a.start_envoy("backend", a.token_file("backend", "demo", "backend"), app_port=app,
                                validation_context_name="ALL",
                                allow_ids=["spiffe://other.example/ns/demo/sa/frontend",
                                           "spiffe://third.example/ns/demo/sa/frontend"])
        to_backend = dict(upstream_port=backend.inbound_port, upstream_ids=["spiffe://cluster.local/ns/demo/sa/backend"],
                          validation_context_name="ALL", initial_fetch_timeout="5s")
        friend = b.start_envoy("friend", b.token_file("frontend", "demo", "frontend"), **to_backend)
        stranger = c.start_envoy("stranger", c.token_file("frontend", "demo", "frontend"), **to_backend)
        forger = d.start_envoy("forger", d.token_file("frontend", "demo", "frontend"), **to_backend)

        status, body = friend.get("/hello")
        assert status == 200, body
        assert "caller identity: spiffe://other.example/ns/demo/sa/frontend" in body
        # A domain A does not federate, and a certificate naming other.example under another root.
        for client in (stranger, forger):
            assert client.get("/hello")[0] == 503
        failures = wait_until(lambda: sum(v for k, v in backend.stats().items()
                                          if k.startswith("listener.") and ".ssl.fail_verify" in k) >= 2 or None,
                              15, "the backend to refuse both")
        assert failures
    finally:
        for node in nodes:
            node.stop_all()


def test_a_changed_federated_bundle_is_served_without_a_restart(tmp_path):
    signer = Node(str(tmp_path / "keys"), AGENT_BIN, ENVOY_BIN).signer
    local, other, replacement = (root(tmp_path, n) for n in ("local", "other", "replacement"))
    bundle = tmp_path / "other-bundle.pem"
    bundle.write_bytes(other[0].public_bytes(PEM))
    node = agent(tmp_path, "a", "cluster.local", local, signer, f"other.example={bundle}")
    try:
        token = signer.token("demo", "x")
        _, before = fetch(node, token, ["spiffe://other.example"])
        # The other domain rotates: old + new roots, then a broken write that must be refused.
        bundle.write_bytes(other[0].public_bytes(PEM) + replacement[0].public_bytes(PEM))
        wait_until(lambda: fetch(node, token, ["spiffe://other.example"])[1]["spiffe://other.example"]
                   .validation_context.trusted_ca.inline_bytes.count(b"BEGIN CERTIFICATE") == 2, 15, "the new bundle")
        bundle.write_text("-----BEGIN CERTIFICATE-----\ntruncated")
        wait_until(lambda: "federated trust bundle changed but cannot be read" in node.agent.output(), 15, "the refusal")
        _, after = fetch(node, token, ["spiffe://other.example"])
        assert after["spiffe://other.example"].validation_context.trusted_ca.inline_bytes.count(b"BEGIN CERTIFICATE") == 2
        assert node.agent.alive()
    finally:
        node.stop_all()
