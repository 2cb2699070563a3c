"""The operator's own PKI: Istio's cacerts layout (checked at start, changes picked up without a
restart under traffic), and workload/CA key types, all with real Envoys doing mTLS."""
import datetime
import os
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from conftest import AGENT_BIN, ENVOY_BIN, TD, FRONTEND, BACKEND
from sdsdemo.devtokens import TokenSigner
from sdsdemo.node import Load, Node, wait_until
from test_served_secrets import fetch

PEM = serialization.Encoding.PEM


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def make_cert(name, key, issuer=None, ca=True, key_cert_sign=True, days=30, start_days=0):
    """A CA certificate for `key`, signed by `issuer` (cert, key) or self-signed."""
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "example corp"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    start = _now() + datetime.timedelta(days=start_days) - datetime.timedelta(minutes=5)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None if ca else None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, key_cert_sign, key_cert_sign, False, False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(issuer_key, hashes.SHA256()))


def ca_pair(name, issuer=None, **kwargs):
    key = ec.generate_private_key(ec.SECP256R1())
    return make_cert(name, key, issuer, **kwargs), key


def write_cacerts(directory, version, signing, root, chain=None):
    """Writes the four files as a Kubernetes Secret volume does: a new timestamped directory, then
    an atomic swap of the `..data` symlink the file names point through."""
    cert, key = signing
    data = os.path.join(directory, f"..{version}")
    os.makedirs(data)
    files = {
        "ca-cert.pem": cert.public_bytes(PEM),
        "ca-key.pem": key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        "cert-chain.pem": b"".join(c.public_bytes(PEM) for c in (chain if chain is not None else [cert, root[0]])),
        "root-cert.pem": root[0].public_bytes(PEM),
    }
    for name, content in files.items():
        path = os.path.join(data, name)
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, 0o600 if name == "ca-key.pem" else 0o644)
    link = os.path.join(directory, "..data")
    tmp = os.path.join(directory, "..data_tmp")
    os.symlink(f"..{version}", tmp)
    os.replace(tmp, link)
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.islink(path):
            os.symlink(os.path.join("..data", name), path)


def pair(node, **client_kwargs):
    app = node.start_app("backend")
    server = node.start_envoy("backend", node.token_file("backend", "demo", "backend"), app_port=app, allow_ids=[FRONTEND])
    client = node.start_envoy("frontend", node.token_file("frontend", "demo", "frontend"),
                              upstream_port=server.inbound_port, upstream_ids=[BACKEND], **client_kwargs)
    return server, client


def served(node, service_account="frontend"):
    _, secrets = fetch(node, node.signer.token("demo", service_account), ["default", "ROOTCA"])
    chain = x509.load_pem_x509_certificates(secrets["default"].tls_certificate.certificate_chain.inline_bytes)
    roots = x509.load_pem_x509_certificates(secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes)
    return chain, roots


def test_a_cacerts_intermediate_serves_mtls_and_swaps_under_traffic_without_a_restart(tmp_path):
    root1 = ca_pair("root one")
    int1 = ca_pair("intermediate one", root1)
    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    write_cacerts(str(cacerts), 1, int1, root1)
    node = Node(str(tmp_path / "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent("--ca-dir", str(cacerts), "--ca-activation-delay", "3s", "--metrics-address", "127.0.0.1:0")
        server, client = pair(node)
        assert client.get("/hello")[0] == 200
        # The leaf chains through the intermediate to the root (openssl, independently).
        chain, roots = served(node)
        assert chain[1] == int1[0] and roots == [root1[0]]
        (tmp_path / "chain.pem").write_bytes(b"".join(c.public_bytes(PEM) for c in chain))
        (tmp_path / "root.pem").write_bytes(root1[0].public_bytes(PEM))
        verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
                                 str(tmp_path / "chain.pem"), str(tmp_path / "chain.pem")], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stdout + verify.stderr

        pid = node.agent.pid
        load = Load(client)
        first_serial = next(iter(client.serials_for(FRONTEND)))
        # 1. A new intermediate under the same root: leaves are re-issued and pushed.
        int2 = ca_pair("intermediate two", root1)
        write_cacerts(str(cacerts), 2, int2, root1)
        wait_until(lambda: served(node)[0][1] == int2[0], 20, "leaves from the new intermediate")
        wait_until(lambda: client.serials_for(FRONTEND) - {first_serial}, 20, "Envoy holding the re-issued leaf")
        # 2. A new root: both roots first, then leaves under the new one.
        root2 = ca_pair("root two")
        int3 = ca_pair("intermediate three", root2)
        write_cacerts(str(cacerts), 3, int3, root2)

        wait_until(lambda: len(served(node)[1]) == 2, 20, "old + new roots in the bundle")
        wait_until(lambda: served(node)[0][1] == int3[0], 30, "leaves under the new root")
        leaf_after = served(node)[0][0]
        wait_until(lambda: format(leaf_after.serial_number, "x").lstrip("0") in
                   {s.lstrip("0") for s in client.serials_for(FRONTEND)}, 20, "Envoy holding a leaf under the new root")
        assert client.get("/hello")[0] == 200
        results = load.stop()
        assert set(results) == {200}, (results, load.errors)
        assert node.agent.pid == pid and node.agent.alive(), "no restart"
        # A half-written or invalid update is refused; the current CA keeps signing.
        (cacerts / "..3" / "ca-key.pem").write_text("-----BEGIN PRIVATE KEY-----\ntruncated")
        wait_until(lambda: "CA FILES CHANGED BUT ARE NOT A USABLE CA" in node.agent.output(), 15, "the refused update")
        assert node.agent_metrics().get("sds_agent_ca_reload_failures_total", 0) >= 1
        _, secrets = fetch(node, node.signer.token("demo", "late"), ["default"])
        assert "default" in secrets
    finally:
        node.stop_all()


@pytest.mark.parametrize("case", ["expired", "not a CA", "mismatched key", "broken chain"])
def test_a_bad_cacerts_set_is_refused_at_start_naming_the_file(tmp_path, case):
    root = ca_pair("root")
    if case == "expired":
        signing = ca_pair("intermediate", root, days=1, start_days=-3)
    elif case == "not a CA":
        signing = ca_pair("intermediate", root, ca=False, key_cert_sign=False)
    elif case == "mismatched key":
        cert, _ = ca_pair("intermediate", root)
        signing = (cert, ec.generate_private_key(ec.SECP256R1()))
    else:
        signing = ca_pair("intermediate", root)
        root = ca_pair("another root")
    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    write_cacerts(str(cacerts), 1, signing, root, chain=[signing[0]])
    jwks = TokenSigner().write_jwks(str(tmp_path / "jwks.json"))
    result = subprocess.run([AGENT_BIN, "serve", "--socket", str(tmp_path / "s.sock"), "--jwks", str(jwks),
                             "--state-dir", str(tmp_path / "state"), "--ca-dir", str(cacerts)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr[-2000:]
    says = {"expired": "expired", "not a CA": "not a CA", "mismatched key": "does not match",
            "broken chain": "does not chain"}[case]
    assert says in result.stderr and "ca-" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "s.sock").exists()
    assert not (tmp_path / "state" / "ca").exists(), "nothing generated for a refused start"


@pytest.mark.parametrize("workload, ca, expect", [
    ("ec-p384", "ec-p256", ec.SECP384R1), ("rsa-2048", "ec-p256", rsa.RSAPublicKey),
    ("ec-p256", "rsa-2048", ec.SECP256R1),
])
def test_every_key_type_serves_mtls_with_a_real_envoy(tmp_path, workload, ca, expect):
    node = Node(str(tmp_path / "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent("--workload-key-type", workload, "--ca-key-type", ca)
        server, client = pair(node)
        status, body = client.get("/hello")
        assert status == 200, body
        chain, roots = served(node)
        key = chain[0].public_key()
        assert isinstance(key, rsa.RSAPublicKey) if expect is rsa.RSAPublicKey else isinstance(key.curve, expect)
        root_key = roots[0].public_key()
        assert isinstance(root_key, rsa.RSAPublicKey) == ca.startswith("rsa")
    finally:
        node.stop_all()


def test_two_agents_cannot_share_a_state_directory(tmp_path):
    node = Node(str(tmp_path / "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent()
        result = subprocess.run([AGENT_BIN, "serve", "--socket", str(tmp_path / "other.sock"), "--jwks", node.jwks,
                                 "--state-dir", os.path.join(node.workdir, "state")], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 1
        assert f"in use by another sds-agent (pid {node.agent.pid})" in result.stderr, result.stderr[-2000:]
    finally:
        node.stop_all()


def test_a_refused_start_generates_and_writes_nothing(tmp_path):
    result = subprocess.run([AGENT_BIN, "serve", "--socket", str(tmp_path / "s.sock"), "--jwks", str(tmp_path / "missing.json"),
                             "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "missing.json" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "state" / "ca").exists(), "no root generated for an agent that never started"


def make_crl(issuer, revoked=(), this_update=None, next_days=7):
    """A CRL of `issuer` (cert, key) revoking `revoked` serials (ints), as the operator's PKI writes it."""
    this_update = this_update or _now() - datetime.timedelta(minutes=1)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer[0].subject)
               .last_update(this_update).next_update(this_update + datetime.timedelta(days=next_days)))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this_update).build())
    return builder.sign(issuer[1], hashes.SHA256())


def write_crl(cacerts, *crls):
    """ca-crl.pem beside the CA files (in place, as an operator edits a mounted file in a test)."""
    path = os.path.join(cacerts, "ca-crl.pem")
    with open(path + ".tmp", "wb") as f:
        f.write(b"".join(c.public_bytes(PEM) for c in crls))
    os.replace(path + ".tmp", path)


def served_context(node):
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2  # noqa: F401
    _, secrets = fetch(node, node.signer.token("demo", "frontend"), ["ROOTCA"])
    return secrets["ROOTCA"].validation_context


def test_a_crl_in_the_ca_directory_reaches_every_validation_context_and_a_real_envoy_refuses_the_revoked_peer(tmp_path):
    """Istio 1.27's ca-crl.pem: the agent serves it as the validation context's `crl`. With only
    the intermediate's list, Envoy needs `only_verify_leaf_cert_crl` (it otherwise wants a list
    from every CA of the chain and refuses every peer, envoy#18289): the agent sets it then, and
    clears it once the root's list is there too."""
    root = ca_pair("crl root")
    intermediate = ca_pair("crl intermediate", root)
    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    write_cacerts(str(cacerts), 1, intermediate, root)
    write_crl(str(cacerts), make_crl(intermediate))
    node = Node(str(tmp_path / "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent("--ca-dir", str(cacerts), "--metrics-address", "127.0.0.1:0")
        context = served_context(node)
        assert x509.load_pem_x509_crl(context.crl.inline_bytes).issuer == intermediate[0].subject
        assert context.only_verify_leaf_cert_crl is True, "only the intermediate publishes a list"
        app = node.start_app("backend")
        reports_id = f"{TD}/ns/demo/sa/reports"
        backend = node.start_envoy("backend", node.token_file("backend", "demo", "backend"), app_port=app,
                                   allow_ids=[FRONTEND, reports_id])
        frontend = node.start_envoy("frontend", node.token_file("frontend", "demo", "frontend"),
                                    upstream_port=backend.inbound_port, upstream_ids=[BACKEND], max_requests_per_connection=1)
        reports = node.start_envoy("reports", node.token_file("reports", "demo", "reports"),
                                   upstream_port=backend.inbound_port, upstream_ids=[BACKEND], max_requests_per_connection=1)
        assert frontend.get("/hello")[0] == 200 and reports.get("/hello")[0] == 200, "an empty list revokes no one"

        # The intermediate revokes the reports leaf: a real Envoy refuses it; everyone else served.
        revoked_serial = int(next(iter(reports.serials_for(reports_id))), 16)
        write_crl(str(cacerts), make_crl(intermediate, [revoked_serial]))
        wait_until(lambda: x509.load_pem_x509_crl(served_context(node).crl.inline_bytes)
                   .get_revoked_certificate_by_serial_number(revoked_serial) is not None, 20, "the new list in force")
        wait_until(lambda: reports.get("/hello")[0] != 200, 20, "the revoked peer refused")
        assert frontend.get("/hello")[0] == 200
        assert reports.get("/hello")[0] == 503

        # The root's list as well: every CA of the chain publishes one, so Envoy checks the chain.
        write_crl(str(cacerts), make_crl(intermediate, [revoked_serial], this_update=_now()), make_crl(root))
        wait_until(lambda: served_context(node).only_verify_leaf_cert_crl is False, 20, "the full-chain check")
        assert frontend.get("/hello")[0] == 200 and reports.get("/hello")[0] == 503

        # Refused, each logged and counted, the list in force kept: malformed; signed by a CA
        # outside the hierarchy; older than the one in force; missing the signing CA's list.
        stranger = ca_pair("stranger")
        in_force = served_context(node).crl.inline_bytes
        bad = [b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
               make_crl(stranger).public_bytes(PEM),
               make_crl(intermediate, this_update=_now() - datetime.timedelta(hours=1)).public_bytes(PEM),
               make_crl(root).public_bytes(PEM)]
        for count, content in enumerate(bad, start=1):
            (cacerts / "ca-crl.pem").write_bytes(content)
            wait_until(lambda: node.agent_metrics().get("sds_agent_crl_refused_total", 0) >= count, 20,
                       f"refusal {count}")
        log = node.agent.output()
        assert "not a DER certificate revocation list" in log or "not PEM" in log
        assert "is not signed by a CA of this hierarchy" in log
        assert "is older than the one in force" in log
        assert "no CRL from the signing CA" in log
        assert served_context(node).crl.inline_bytes == in_force
        assert frontend.get("/hello")[0] == 200 and reports.get("/hello")[0] == 503
    finally:
        node.stop_all()
