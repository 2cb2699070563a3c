"""The served certificate checked by independent tools: openssl, and a gRPC client built from
Envoy's own published protos (xds-protos)."""
import os
import subprocess

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def fetch(node, token, names):
    with grpc.insecure_channel(f"unix:{node.socket}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        request = discovery_pb2.DiscoveryRequest(resource_names=names, type_url=SECRET_TYPE)
        response = stub.FetchSecrets(request, metadata=[("istio_sds_credentials_header-bin", token.encode())],
                                     timeout=10)
    secrets = {}
    for resource in response.resources:
        assert resource.type_url == SECRET_TYPE
        secret = secret_pb2.Secret()
        resource.Unpack(secret)
        secrets[secret.name] = secret
    return response, secrets


def test_served_certificate_verifies_with_openssl(node, tmp_path):
    token = node.signer.token("demo", "checker")
    response, secrets = fetch(node, token, ["default", "ROOTCA", "spiffe://cluster.local"])
    assert response.version_info
    chain = secrets["default"].tls_certificate.certificate_chain.inline_bytes
    key = secrets["default"].tls_certificate.private_key.inline_bytes
    bundle = secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes
    assert bundle == secrets["spiffe://cluster.local"].validation_context.trusted_ca.inline_bytes

    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "bundle.pem").write_bytes(bundle)
    verify = subprocess.run(["openssl", "verify", "-CAfile", tmp_path / "bundle.pem", tmp_path / "chain.pem"],
                            capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0 and verify.stdout.strip().endswith(": OK"), verify.stdout + verify.stderr
    text = subprocess.run(["openssl", "x509", "-in", tmp_path / "chain.pem", "-noout", "-ext",
                           "subjectAltName,keyUsage,extendedKeyUsage,basicConstraints"],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    assert "URI:spiffe://cluster.local/ns/demo/sa/checker" in text
    assert "DNS:" not in text and "IP Address:" not in text and "email:" not in text
    # An EC key enciphers no keys (RFC 5280 4.2.1.3): keyEncipherment only for RSA keys.
    assert "Digital Signature" in text and "Key Encipherment" not in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert "CA:FALSE" in text

    cert = x509.load_pem_x509_certificate(chain)
    # RFC 5280 4.1.2.2: positive and at most 20 octets (a 159-bit number at most).
    assert 0 < cert.serial_number < 2 ** 159
    private_key = serialization.load_pem_private_key(key, password=None)
    assert private_key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= __import__("datetime").timedelta(hours=24, minutes=2)


def test_one_identity_one_certificate_shared_with_envoy(node, envoys):
    token_file = node.token_file("shared", "demo", "shared")
    envoy = envoys("shared", token_file, allow_ids=[], upstream_ids=[])
    with open(token_file) as f:
        _, secrets = fetch(node, f.read(), ["default"])
    served = x509.load_pem_x509_certificate(secrets["default"].tls_certificate.certificate_chain.inline_bytes)
    held = [c["serial_number"] for c in envoy.sds_certificates()
            if any(s.get("uri") == "spiffe://cluster.local/ns/demo/sa/shared" for s in c.get("subject_alt_names", []))]
    assert held and all(int(serial, 16) == served.serial_number for serial in held)


def test_garbled_request_gets_a_clear_status_and_the_agent_keeps_serving(node):
    token = node.signer.token("demo", "prober")
    with grpc.insecure_channel(f"unix:{node.socket}") as channel:
        raw = channel.unary_unary("/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets")
        metadata = [("istio_sds_credentials_header-bin", token.encode())]
        try:
            raw(b"\xff\xff\xff\xff garbage", metadata=metadata, timeout=10)
            raise AssertionError("garbage was answered")
        except grpc.RpcError as error:
            assert error.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT), error
        try:
            fetch(node, token, ["kube-system-admin"])
            raise AssertionError("an unknown name was answered")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert "kube-system-admin" in error.details()
    _, secrets = fetch(node, token, ["default"])
    assert "default" in secrets
