"""CA keys in a PKCS#11 token (issue 26), against SoftHSM 2 from Debian (installed by
scripts/install-deps.sh): a token initialised per test in its own directory (`SOFTHSM2_CONF`),
keys generated inside it with OpenSC's `pkcs11-tool`, and CA certificates made for those keys
(by a root whose key is a file, as an operator's offline root signs an HSM-backed intermediate).
The agent signs through the token's `C_Sign`; the private keys never leave it.
"""
import datetime
import os
import subprocess

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from conftest import AGENT_BIN, BACKEND, ENVOY_BIN, FRONTEND
from sdsdemo.node import Load, Node, Process, free_port, wait_until
from test_ca_replicas import publish_files
from test_upstream_ca import fetch

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "hsm-Pin-4711"
PEM = serialization.Encoding.PEM


class SoftHSM:
    """A SoftHSM token labelled `ca` under `directory`, and the environment that finds it."""

    def __init__(self, directory, monkeypatch):
        self.directory = directory
        self.tokens = os.path.join(directory, "tokens")
        os.makedirs(self.tokens)
        self.conf = os.path.join(directory, "softhsm2.conf")
        with open(self.conf, "w") as f:
            f.write(f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
        monkeypatch.setenv("SOFTHSM2_CONF", self.conf)
        self.run("softhsm2-util", "--init-token", "--free", "--label", "ca", "--pin", PIN, "--so-pin", "so-pin-0815")
        self.pin_file = os.path.join(directory, "pin")
        with open(self.pin_file, "w") as f:
            f.write(PIN + "\n")
        os.chmod(self.pin_file, 0o600)

    def run(self, *argv):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr + result.stdout
        return result

    def keypair(self, label, key_type="EC:prime256v1", key_id="01"):
        """A key pair generated inside the token; returns its public key (the private one stays)."""
        self.run("pkcs11-tool", "--module", MODULE, "--token-label", "ca", "--login", "--pin", PIN, "--keypairgen",
                 "--key-type", key_type, "--label", label, "--id", key_id)
        out = os.path.join(self.directory, f"{label}.pub.der")
        self.run("pkcs11-tool", "--module", MODULE, "--token-label", "ca", "--read-object", "--type", "pubkey",
                 "--label", label, "-o", out)
        return serialization.load_der_public_key(open(out, "rb").read())

    def uri(self, label, pin="source"):
        query = f"module-path={MODULE}&" + (f"pin-source={self.pin_file}" if pin == "source" else f"pin-value={pin}")
        return f"pkcs11:token=ca;object={label}?{query}"


def now():
    return datetime.datetime.now(datetime.timezone.utc)


def ca_certificate(name, public_key, issuer=None):
    """A CA certificate for `public_key`, signed by `issuer` (cert, key); with no issuer, a
    self-signed root with a new file key is made: returns (cert, key) then."""
    key = None
    if issuer is None:
        key = ec.generate_private_key(ec.SECP256R1())
        public_key = key.public_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now() - datetime.timedelta(minutes=5))
            .not_valid_after(now() + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .sign(issuer_key, hashes.SHA256()))
    return (cert, key) if issuer is None else cert


def cacerts_files(intermediate, roots, uri):
    """Istio's cacerts layout whose ca-key.pem holds the token key's URI, not a key."""
    return {"ca-cert.pem": intermediate.public_bytes(PEM), "ca-key.pem": (uri + "\n").encode(),
            "cert-chain.pem": intermediate.public_bytes(PEM) + roots[0].public_bytes(PEM),
            "root-cert.pem": b"".join(root.public_bytes(PEM) for root in roots)}


class TokenCA:
    """A SoftHSM token, a key generated in it (`label`), an offline root (file key) and the
    intermediate it signed for the token's key, written as `--ca-cert` (intermediate, root)."""

    def __init__(self, workdir, monkeypatch, label="ca-1", key_type="EC:prime256v1", key_id="01"):
        self.hsm = SoftHSM(os.path.join(workdir, "hsm"), monkeypatch)
        self.root = ca_certificate("offline root", None)
        self.intermediate = ca_certificate(f"hsm intermediate {label}", self.hsm.keypair(label, key_type, key_id), self.root)
        self.label = label
        self.cert_file = os.path.join(workdir, "ca.pem")
        self.write(self.intermediate)

    def write(self, certificate):
        with open(self.cert_file, "wb") as f:
            f.write(certificate.public_bytes(PEM) + self.root[0].public_bytes(PEM))

    def uri(self, pin="source"):
        return self.hsm.uri(self.label, pin=pin)


def served_chain(node, account):
    (resource,) = fetch(node, node.signer.token("demo", account)).resources
    secret = secret_pb2.Secret()
    resource.Unpack(secret)
    return x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)


def test_envoys_do_mtls_through_leaves_the_token_signs_and_a_root_rotation_through_the_directory(workdir, monkeypatch):
    hsm = SoftHSM(os.path.join(workdir, "hsm"), monkeypatch)
    root1 = ca_certificate("offline root 1", None)
    int1 = ca_certificate("hsm intermediate 1", hsm.keypair("ca-1", key_id="01"), root1)
    secret = os.path.join(workdir, "cacerts")
    os.makedirs(secret)
    publish_files(secret, 1, cacerts_files(int1, [root1[0]], hsm.uri("ca-1")))
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent("--ca-dir", secret, "--ca-activation-delay", "2s", "--cert-ttl", "1h")
        app = node.start_app("backend")
        backend = node.start_envoy("backend", node.token_file("backend", "demo", "backend"), app_port=app, allow_ids=[FRONTEND])
        frontend = node.start_envoy("frontend", node.token_file("frontend", "demo", "frontend"), upstream_port=backend.inbound_port,
                                    upstream_ids=[BACKEND], max_requests_per_connection=1)
        assert frontend.get("/hello")[0] == 200
        leaf = served_chain(node, "frontend")[0]
        leaf.verify_directly_issued_by(int1)

        # Root rotation through the directory, under traffic: a new root listed beside the old, a
        # new intermediate whose key is another object of the token.
        load = Load(frontend)
        root2 = ca_certificate("offline root 2", None)
        int2 = ca_certificate("hsm intermediate 2", hsm.keypair("ca-2", key_id="02"), root2)
        publish_files(secret, 2, cacerts_files(int2, [root2[0], root1[0]], hsm.uri("ca-2")))
        wait_until(lambda: served_chain(node, "frontend")[1] == int2, 60, "leaves under the token's second key")
        served_chain(node, "frontend")[0].verify_directly_issued_by(int2)
        wait_until(lambda: len(frontend.serials_for(FRONTEND)) == 1 and
                   int(next(iter(frontend.serials_for(FRONTEND))), 16) == served_chain(node, "frontend")[0].serial_number,
                   30, "the frontend Envoy holding the new leaf")
        results = load.stop()
        assert set(results) == {200} and results[200] > 20, (results, load.errors)
        assert PIN not in node.agent.output()
        print(f"PKCS#11: mTLS through token-signed leaves, a root rotation under load: {results[200]} requests, 0 failed")
    finally:
        node.stop_all()


def test_ca_serve_signs_over_the_csr_api_with_the_token_and_never_logs_the_pin(workdir, monkeypatch):
    token = TokenCA(workdir, monkeypatch)
    root, intermediate = token.root, token.intermediate
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    port = free_port()
    ca = Process("ca", [AGENT_BIN, "ca", "serve", "--listen", f"127.0.0.1:{port}", "--trust-domain", "cluster.local",
                        "--jwks", node.jwks, "--ca-cert", token.cert_file, "--ca-key", token.uri(pin=PIN),
                        "--server-name", "ca.mesh.test"], os.path.join(workdir, "ca.log"))
    try:
        wait_until(lambda: "serving Istio's CSR API" in ca.output() or not ca.alive(), 30, "ca serve listening")
        assert ca.alive(), ca.output()
        bundle = os.path.join(workdir, "bundle.pem")
        with open(bundle, "wb") as f:
            f.write(root[0].public_bytes(PEM))
        node.start_agent("--upstream-ca", f"127.0.0.1:{port}", "--upstream-ca-bundle", bundle,
                         "--upstream-ca-server-name", "ca.mesh.test", "--audience", "istio-ca")
        (resource,) = fetch(node, node.signer.token("demo", "frontend", audience="istio-ca")).resources
        secret = secret_pb2.Secret()
        resource.Unpack(secret)
        leaf = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)[0]
        leaf.verify_directly_issued_by(intermediate)
        log = ca.output()
        assert PIN not in log and "pin-value=REDACTED" in log, "the effective configuration line redacts the PIN"
    finally:
        node.stop_all()
        ca.stop()


@pytest.mark.parametrize("case", ["wrong PIN", "unknown object", "wrong module path", "unsupported key type", "certificate of another key"])
def test_bad_token_settings_are_refused_at_start_with_one_line_naming_the_uri_without_the_pin(case, workdir, monkeypatch):
    token = TokenCA(workdir, monkeypatch)
    hsm, cert_file = token.hsm, token.cert_file
    uri = token.uri(pin=PIN)
    if case == "wrong PIN":
        uri = token.uri(pin="not-the-pin-0000")
    elif case == "unknown object":
        uri = hsm.uri("nope", pin=PIN)
    elif case == "wrong module path":
        uri = uri.replace(MODULE, "/usr/lib/softhsm/no-such-module.so")
    elif case == "unsupported key type":
        token.write(ca_certificate("hsm intermediate p521", hsm.keypair("ca-521", key_type="EC:secp521r1", key_id="09"), token.root))
        uri = hsm.uri("ca-521", pin=PIN)
    elif case == "certificate of another key":
        hsm.keypair("ca-2", key_id="02")
        uri = hsm.uri("ca-2", pin=PIN)
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    result = subprocess.run([AGENT_BIN, "serve", "--socket", node.socket, "--jwks", node.jwks, "--state-dir",
                             os.path.join(workdir, "state"), "--ca-cert", cert_file, "--ca-key", uri],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if "critical" in line or "error" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    expected = {"wrong PIN": "refused the PIN", "unknown object": "no private key the URI names",
                "wrong module path": "cannot load the PKCS#11 module", "unsupported key type": "a key type this CA does not sign with",
                "certificate of another key": "does not match the CA certificate"}[case]
    assert expected in errors[0] and "pkcs11:token=ca;object=" in errors[0], errors[0]
    assert PIN not in result.stderr and "not-the-pin-0000" not in result.stderr
    assert not os.path.exists(node.socket)


# SoftHSM's whole token directory gone makes C_Initialize itself fail; the token's own directory
# gone leaves a module that initialises with an empty slot, as an HSM whose token was pulled.
@pytest.mark.parametrize("removed", ["token directory", "token"])
def test_a_token_removed_while_serving_answers_unavailable_serves_what_it_holds_and_recovers(workdir, monkeypatch, removed):
    token = TokenCA(workdir, monkeypatch)
    hsm, intermediate = token.hsm, token.intermediate
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    moved = hsm.tokens if removed == "token directory" else os.path.join(hsm.tokens, os.listdir(hsm.tokens)[0])
    away = os.path.join(workdir, "away")
    try:
        node.start_agent("--ca-cert", token.cert_file, "--ca-key", token.uri(), "--metrics-address", "127.0.0.1:0")
        held = served_chain(node, "frontend")[0]
        os.rename(moved, away)
        # What the agent holds is served; a new identity is `unavailable`, within the deadline.
        assert served_chain(node, "frontend")[0] == held
        with pytest.raises(grpc.RpcError) as refused:
            fetch(node, node.signer.token("demo", "new-while-away"))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        # A second one while the token is still away: the module is re-initialised for it and the
        # session still cannot open; recovery must not need that to have happened after the return.
        with pytest.raises(grpc.RpcError) as again:
            fetch(node, node.signer.token("demo", "again-while-away"))
        assert again.value.code() == grpc.StatusCode.UNAVAILABLE, again.value.details()
        assert node.agent_metrics().get("sds_agent_pkcs11_errors_total", 0) >= 2
        assert "PKCS#11 TOKEN FAILED A SIGNATURE" in node.agent.output()

        # The token comes back: the next issuance re-initialises the module and signs, no restart.
        os.rename(away, moved)

        def issued():
            try:
                return served_chain(node, "back-again")[0].issuer == intermediate.subject
            except grpc.RpcError:
                return False
        wait_until(issued, 30, "a new identity once the token is back")
        assert node.agent_metrics().get("sds_agent_pkcs11_recoveries_total", 0) >= 1
        assert node.agent.alive() and PIN not in node.agent.output()
    finally:
        if not os.path.exists(moved) and os.path.exists(away):
            os.rename(away, moved)
        node.stop_all()


def test_config_check_takes_a_uri_in_a_settings_file_as_a_key_not_a_path_and_never_prints_the_pin(workdir, monkeypatch):
    token = TokenCA(workdir, monkeypatch)
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    settings = os.path.join(workdir, "agent.yaml")
    for pin, expected in ((PIN, "ok"), ("not-the-pin-0000", "the token refused the PIN")):
        with open(settings, "w") as f:
            f.write(f"jwks: {node.jwks}\nca-cert: ca.pem\nca-key: \"{token.uri(pin=pin)}\"\nstate-dir: state\n")
        result = subprocess.run([AGENT_BIN, "config", "check", settings], capture_output=True, text=True, timeout=60)
        output = result.stdout + result.stderr
        assert expected in output and (result.returncode == 0) == (pin == PIN), output
        assert pin not in output, output


def test_an_rsa_key_in_the_token_signs_with_pkcs1_v15(workdir, monkeypatch):
    """The CA key type decides the mechanism: an RSA key in the token signs through
    `CKM_RSA_PKCS` over the SHA-256 DigestInfo (sha256WithRSAEncryption)."""
    token = TokenCA(workdir, monkeypatch, label="ca-rsa", key_type="rsa:2048", key_id="05")
    intermediate = token.intermediate
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent("--ca-cert", token.cert_file, "--ca-key", token.uri())
        leaf = served_chain(node, "frontend")[0]
        assert leaf.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.RSA_WITH_SHA256
        leaf.verify_directly_issued_by(intermediate)
    finally:
        node.stop_all()
