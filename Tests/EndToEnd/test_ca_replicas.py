"""`ca serve --ca-dir` replicas over one cacerts directory made by `ca init`, and agents that balance
across them and fail over (issue 24).

Three replicas listen on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (Linux routes all of 127/8 to the
loopback device): they stand for three pods behind a Service, mounting one Secret, which is
written here as the kubelet writes a Secret volume (a new `..N` directory, then an atomic swap of
the `..data` symlink). No Kubernetes runs here; the processes, the TLS, the CSR API and the Envoys
are the real ones.
"""
import os
import re
import shutil
import signal
import stat
import subprocess
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from conftest import AGENT_BIN, ENVOY_BIN, TD
from sdsdemo.devtokens import TokenSigner
from sdsdemo.node import Load, Node, Process, free_port, wait_until
from test_upstream_ca import fetch

FILES = ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def ca_init(directory, *extra):
    return subprocess.run([AGENT_BIN, "ca", "init", directory, "--trust-domain", "cluster.local", *extra],
                          capture_output=True, text=True, timeout=30)


def publish(secret, version, source):
    """Puts `source`'s cacerts files into the Secret volume `secret` as the kubelet does."""
    data = os.path.join(secret, f"..{version}")
    os.makedirs(data)
    for name in FILES:
        shutil.copy2(os.path.join(source, name), os.path.join(data, name))
    tmp = os.path.join(secret, "..data_tmp")
    os.symlink(f"..{version}", tmp)
    os.replace(tmp, os.path.join(secret, "..data"))
    for name in FILES:
        path = os.path.join(secret, name)
        if not os.path.islink(path):
            os.symlink(os.path.join("..data", name), path)


def start_replica(workdir, secret, jwks, host, port, activation_delay="3s"):
    name = f"ca-{host}"
    log = os.path.join(workdir, f"{name}.log")
    # A restarted replica appends to the same log: wait for a line of its own.
    earlier = open(log).read().count("serving Istio's CSR API") if os.path.exists(log) else 0
    process = Process(name, [AGENT_BIN, "ca", "serve", "--listen", f"{host}:{port}", "--trust-domain", "cluster.local",
                             "--jwks", jwks, "--ca-dir", secret, "--server-name", "ca.mesh.test",
                             "--ca-activation-delay", activation_delay],
                      os.path.join(workdir, f"{name}.log"))
    wait_until(lambda: process.output().count("serving Istio's CSR API") > earlier or not process.alive(), 30,
               f"{name} listening")
    assert process.alive(), process.output()
    return process


class CA:
    """A CA made by `ca init` (`v1`), published as a Secret volume (`secret`), and `ca serve`
    replicas on `hosts` over it, with the JWKS their callers' tokens verify against."""

    def __init__(self, workdir, hosts):
        self.v1 = os.path.join(workdir, "ca-v1")
        assert ca_init(self.v1).returncode == 0
        self.root_key = self.v1 + "-root-key.pem"
        self.secret = os.path.join(workdir, "secret")
        os.makedirs(self.secret)
        publish(self.secret, 1, self.v1)
        self.signer = TokenSigner()
        self.jwks = self.signer.write_jwks(os.path.join(workdir, "jwks.json"))
        self.port = free_port()
        self.replicas = {host: start_replica(workdir, self.secret, self.jwks, host, self.port) for host in hosts}
        self.endpoints = ",".join(f"{host}:{self.port}" for host in hosts)

    def stop(self):
        for replica in self.replicas.values():
            replica.stop()


def served_new_identity(node, token):
    """Whether the agent serves `token`'s identity now (a CSR when it is new)."""
    try:
        return len(fetch(node, token).resources) == 1
    except grpc.RpcError:
        return False


def envoy_pair(server_node, client_node):
    """demo/backend's Envoy on `server_node` (accepting demo/frontend) and demo/frontend's on
    `client_node` calling it, with tokens the CA accepts (audience istio-ca)."""
    app = server_node.start_app("backend")
    backend = server_node.start_envoy(
        "backend", server_node.token_file("backend", "demo", "backend", audience="istio-ca"), app_port=app,
        allow_ids=[f"{TD}/ns/demo/sa/frontend"])
    frontend = client_node.start_envoy(
        "frontend", client_node.token_file("frontend", "demo", "frontend", audience="istio-ca"),
        upstream_port=backend.inbound_port, upstream_ids=[f"{TD}/ns/demo/sa/backend"])
    return backend, frontend


def issued_serials(process):
    return set(re.findall(r"serial=([0-9a-f]+) spiffe_id=", process.output()))


def served_leaf_issuer(node, signer, account):
    """The issuer name of the leaf the agent serves for demo/`account`, and the chain (leaf first).
    `ca init` names every intermediate alike: compare the chain's certificates, not names."""
    resources = fetch(node, signer.token("demo", account, audience="istio-ca")).resources
    secret = secret_pb2.Secret()
    resources[0].Unpack(secret)
    chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
    return chain[0].issuer, chain


def test_ca_init_writes_istios_layout_with_safe_modes_and_never_overwrites(workdir):
    out = os.path.join(workdir, "cacerts")
    made = ca_init(out)
    assert made.returncode == 0, made.stderr
    assert sorted(os.listdir(out)) == sorted(FILES), "only the CA: ready for kubectl create secret --from-file"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(out, "ca-key.pem")).st_mode) == 0o600
    root_key = out + "-root-key.pem"
    assert stat.S_IMODE(os.stat(root_key).st_mode) == 0o600, "the root key is kept beside, never in, the Secret"
    assert root_key in made.stdout

    (root,) = x509.load_pem_x509_certificates(open(os.path.join(out, "root-cert.pem"), "rb").read())
    (intermediate,) = x509.load_pem_x509_certificates(open(os.path.join(out, "ca-cert.pem"), "rb").read())
    chain = x509.load_pem_x509_certificates(open(os.path.join(out, "cert-chain.pem"), "rb").read())
    assert chain == [intermediate, root], "as Istio writes it: the signing certificate, then the root"
    intermediate.verify_directly_issued_by(root)
    constraints = intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    uris = intermediate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == ["spiffe://cluster.local"]

    again = ca_init(out)
    assert again.returncode == 1 and "exists: a CA is never overwritten" in again.stderr
    assert open(os.path.join(out, "ca-cert.pem"), "rb").read() == intermediate.public_bytes(Encoding.PEM)

    # Intermediate rotation: a new intermediate under the same root, from the kept root key.
    rotated = ca_init(os.path.join(workdir, "cacerts-2"), "--root-cert", os.path.join(out, "root-cert.pem"),
                      "--root-key", root_key)
    assert rotated.returncode == 0, rotated.stderr
    (second,) = x509.load_pem_x509_certificates(open(os.path.join(workdir, "cacerts-2", "ca-cert.pem"), "rb").read())
    second.verify_directly_issued_by(root)
    assert second.serial_number != intermediate.serial_number
    assert open(os.path.join(workdir, "cacerts-2", "root-cert.pem"), "rb").read() == open(
        os.path.join(out, "root-cert.pem"), "rb").read()

    # Bad input: one line, exit 1 (or ArgumentParser's usage error, 64), nothing written.
    for args, expected in ((["--root-cert", os.path.join(out, "root-cert.pem")], "--root-cert and --root-key go together"),
                           (["--root-cert", os.path.join(out, "ca-cert.pem"), "--root-key", root_key],
                            "does not match")):
        bad = ca_init(os.path.join(workdir, "cacerts-bad"), *args)
        assert bad.returncode != 0 and expected in bad.stderr, bad.stderr
        assert not os.path.exists(os.path.join(workdir, "cacerts-bad", "ca-cert.pem"))


def test_ca_serve_refuses_ca_dir_with_state_dir_or_ca_cert_and_needs_one_of_them(workdir):
    out = os.path.join(workdir, "cacerts")
    assert ca_init(out).returncode == 0
    jwks = TokenSigner().write_jwks(os.path.join(workdir, "jwks.json"))
    base = [AGENT_BIN, "ca", "serve", "--listen", f"127.0.0.1:{free_port()}", "--trust-domain", "cluster.local",
            "--jwks", jwks]
    for extra, expected in (
            (["--ca-dir", out, "--state-dir", os.path.join(workdir, "state")], "--ca-dir and --state-dir"),
            (["--ca-dir", out, "--ca-cert", os.path.join(out, "ca-cert.pem"), "--ca-key", os.path.join(out, "ca-key.pem")],
             "--ca-dir and --ca-cert"),
            ([], "--state-dir (a generated root, one replica) or --ca-dir")):
        result = subprocess.run(base + extra, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1 and expected in result.stderr, (extra, result.stderr)
        assert not os.path.exists(os.path.join(workdir, "state"))


def test_replicas_over_one_secret_are_one_ca_and_agents_balance_fail_over_and_recover(workdir):
    ca = CA(workdir, HOSTS)
    source, root_key, secret, signer, jwks, port, replicas = ca.v1, ca.root_key, ca.secret, ca.signer, ca.jwks, ca.port, ca.replicas
    root = os.path.join(secret, "root-cert.pem")
    endpoints = ca.endpoints
    nodes = []
    try:
        for name in ("a", "b"):
            node = Node(os.path.join(workdir, name), AGENT_BIN, ENVOY_BIN)
            node.signer = signer
            node.jwks = jwks
            node.start_agent("--upstream-ca", endpoints, "--upstream-ca-bundle", root,
                             "--upstream-ca-server-name", "ca.mesh.test", "--audience", "istio-ca",
                             "--cert-ttl", "10s", "--metrics-address", "127.0.0.1:0")
            nodes.append(node)
        a, b = nodes
        backend, frontend = envoy_pair(a, b)
        assert frontend.get("/hello")[0] == 200
        load = Load(frontend)

        # Balanced: renewals (every ~5 s) reach every replica; all sign under the one root.
        wait_until(lambda: all(issued_serials(r) for r in replicas.values()), 40, "every replica to sign a renewal")
        (v1,) = x509.load_pem_x509_certificates(open(os.path.join(source, "ca-cert.pem"), "rb").read())
        assert served_leaf_issuer(a, signer, "backend")[1][1] == v1

        # The intermediate rotated through the Secret, under traffic: every replica signs with
        # the new one and presents a TLS certificate under it; leaves follow.
        rotated = os.path.join(workdir, "ca-v2")
        assert ca_init(rotated, "--root-cert", os.path.join(source, "root-cert.pem"), "--root-key", root_key).returncode == 0
        publish(secret, 2, rotated)
        for replica in replicas.values():
            wait_until(lambda: "TLS certificate issued again under the new CA" in replica.output(), 30,
                       "each replica to follow the Secret")
        (v2,) = x509.load_pem_x509_certificates(open(os.path.join(rotated, "ca-cert.pem"), "rb").read())
        wait_until(lambda: served_leaf_issuer(b, signer, "frontend")[1][1] == v2, 30, "leaves under the new intermediate")

        # A rolling update: each replica stopped (SIGTERM) and started again in turn, renewals on.
        for host in HOSTS:
            replicas[host].stop()
            replicas[host] = start_replica(workdir, secret, jwks, host, port)
        rolled = {h: issued_serials(r) for h, r in replicas.items()}
        wait_until(lambda: sum(len(issued_serials(r) - rolled[h]) for h, r in replicas.items()) >= 4, 40,
                   "renewals after the rolling update")

        # kill -9 one replica during renewals: the others sign; no request fails.
        killed = replicas["127.0.0.2"]
        os.kill(killed.pid, signal.SIGKILL)
        killed.popen.wait(timeout=10)
        before = {h: issued_serials(r) for h, r in replicas.items() if h != "127.0.0.2"}
        wait_until(lambda: sum(len(issued_serials(r) - before[h]) for h, r in replicas.items() if h in before) >= 6,
                   60, "renewals after the kill")
        dead = f"127.0.0.2:{port}"
        wait_until(lambda: a.agent_metrics().get(f'sds_agent_upstream_ca_endpoint_up{{endpoint="{dead}"}}') == 0, 20,
                   "the killed replica marked down")
        metrics = a.agent_metrics()
        assert metrics.get("sds_agent_upstream_ca_up") == 1, "reachable while one replica answers"
        assert metrics.get(f'sds_agent_upstream_ca_endpoint_up{{endpoint="127.0.0.1:{port}"}}') == 1
        table = subprocess.run([AGENT_BIN, "inspect", "--admin-socket", os.path.join(a.workdir, "state", "admin.sock")],
                               capture_output=True, text=True, timeout=30).stdout
        assert f"upstream CA replica {dead}: DOES NOT ANSWER" in table, table
        assert f"upstream CA replica 127.0.0.1:{port}: answers" in table, table
        result = load.stop()
        assert set(result) == {200} and result[200] > 20, (result, load.errors)
        renewals = {h: len(issued_serials(r)) for h, r in replicas.items()}
        print(f"replicas: {result[200]} requests, 0 failed, through an intermediate rotation, a rolling update and a kill -9; "
              f"certificates signed per replica: {renewals}")

        # Every replica down: what is held is still served; a new identity hears `unavailable`
        # within the deadline; a replica back on its address serves again, with no restart.
        for host in ("127.0.0.1", "127.0.0.3"):
            os.kill(replicas[host].pid, signal.SIGKILL)
            replicas[host].popen.wait(timeout=10)
        assert len(fetch(a, signer.token("demo", "backend", audience="istio-ca")).resources) == 1
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as down:
            fetch(a, signer.token("demo", "newcomer", audience="istio-ca"), timeout=30)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value.details()
        refused_after = time.monotonic() - started
        assert refused_after < 10
        print(f"replicas: all down, a new identity refused in {refused_after:.1f} s with unavailable")
        assert f"127.0.0.1:{port}" in down.value.details() and dead in down.value.details(), down.value.details()
        replicas["127.0.0.3"] = start_replica(workdir, secret, jwks, "127.0.0.3", port)
        token = signer.token("demo", "newcomer", audience="istio-ca")
        back = time.monotonic()
        wait_until(lambda: served_new_identity(a, token), 30, "a new identity once a replica is back")
        print(f"replicas: a new identity served {time.monotonic() - back:.1f} s after one replica was back")
        assert a.agent.alive() and b.agent.alive()
    finally:
        for node in nodes:
            node.stop_all()
        for replica in replicas.values():
            replica.stop()


def root_serials(envoy):
    import json
    return {cert["serial_number"] for entry in json.loads(envoy.admin("/certs")[1])["certificates"]
            for cert in entry.get("ca_cert", [])}


def test_a_root_rotated_through_the_secret_reaches_every_envoy_with_no_restart_and_no_new_agent_bundle(workdir):
    """Istio's plug-in CA procedure: root-cert.pem first lists the new root and the old one with the
    new intermediate, later the new root alone. The agents' --upstream-ca-bundle holds only the
    old root throughout: they learn the new one from the replicas' answers and trust it for the
    replicas' TLS too, so a replica restarted under the new root is reached with no restart."""
    hosts = HOSTS[:2]
    ca = CA(workdir, hosts)
    v1, secret, signer, jwks, port, replicas = ca.v1, ca.secret, ca.signer, ca.jwks, ca.port, ca.replicas
    old_root_file = os.path.join(workdir, "old-root.pem")
    shutil.copy(os.path.join(v1, "root-cert.pem"), old_root_file)
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    node.signer = signer
    node.jwks = jwks
    try:
        node.start_agent("--upstream-ca", ",".join(f"{h}:{port}" for h in hosts), "--upstream-ca-bundle", old_root_file,
                         "--upstream-ca-server-name", "ca.mesh.test", "--audience", "istio-ca", "--cert-ttl", "10s")
        backend, frontend = envoy_pair(node, node)
        assert frontend.get("/hello")[0] == 200
        (old_root,) = root_serials(backend)
        load = Load(frontend)

        # Step 1: the new root and intermediate, root-cert.pem = new + old.
        v2 = os.path.join(workdir, "ca-v2")
        assert ca_init(v2).returncode == 0
        with open(os.path.join(v2, "root-cert.pem"), "ab") as f:
            f.write(open(old_root_file, "rb").read())
        publish(secret, 2, v2)
        envoys = (backend, frontend)
        wait_until(lambda: all(len(root_serials(e)) == 2 for e in envoys), 30, "old + new roots on every Envoy")
        for replica in replicas.values():
            wait_until(lambda: "TLS certificate issued again under the new CA" in replica.output(), 30,
                       "each replica signing under the new root")
        (new_intermediate,) = x509.load_pem_x509_certificates(open(os.path.join(v2, "ca-cert.pem"), "rb").read())
        wait_until(lambda: served_leaf_issuer(node, signer, "frontend")[1][1] == new_intermediate, 30,
                   "leaves under the new root")

        # A replica restarted now presents a TLS certificate under the new root only; the agent,
        # whose bundle file holds the old root alone, still reaches it.
        restarted = replicas["127.0.0.1"]
        os.kill(restarted.pid, signal.SIGKILL)
        restarted.popen.wait(timeout=10)
        replicas["127.0.0.2"].stop()
        replicas["127.0.0.1"] = start_replica(workdir, secret, jwks, "127.0.0.1", port)
        token = signer.token("demo", "after-restart", audience="istio-ca")
        wait_until(lambda: served_new_identity(node, token), 30, "a new identity from the restarted replica")
        assert "TLS refused" not in node.agent.output()

        # Step 3: the old root leaves root-cert.pem; it leaves every Envoy's validation context.
        v3 = os.path.join(workdir, "ca-v3")
        os.makedirs(v3)
        for name in FILES:
            shutil.copy(os.path.join(v2, name), os.path.join(v3, name))
        shutil.copy(os.path.join(v2, "cert-chain.pem"), os.path.join(v3, "cert-chain.pem"))
        with open(os.path.join(v3, "root-cert.pem"), "wb") as f:
            f.write(x509.load_pem_x509_certificates(open(os.path.join(v2, "root-cert.pem"), "rb").read())[0]
                    .public_bytes(Encoding.PEM))
        publish(secret, 3, v3)
        wait_until(lambda: all(old_root not in root_serials(e) and len(root_serials(e)) == 1 for e in envoys), 60,
                   "the old root gone from every Envoy")
        result = load.stop()
        assert set(result) == {200} and result[200] > 20, (result, load.errors)
        print(f"root rotation: {result[200]} requests, 0 failed")
    finally:
        node.stop_all()
        for replica in replicas.values():
            replica.stop()


def publish_files(secret, version, files):
    """A Secret update with these files (name → bytes)."""
    data = os.path.join(secret, f"..{version}")
    os.makedirs(data)
    for name, content in files.items():
        with open(os.path.join(data, name), "wb") as f:
            f.write(content)
        os.chmod(os.path.join(data, name), 0o600 if name == "ca-key.pem" else 0o644)
    tmp = os.path.join(secret, "..data_tmp")
    os.symlink(f"..{version}", tmp)
    os.replace(tmp, os.path.join(secret, "..data"))
    for name in files:
        path = os.path.join(secret, name)
        if not os.path.islink(path):
            os.symlink(os.path.join("..data", name), path)
    for name in os.listdir(secret):
        if not name.startswith("..") and name not in files:
            os.unlink(os.path.join(secret, name))


def read_files(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in FILES}


def leaf_chain(node, signer, account):
    return served_leaf_issuer(node, signer, account)[1]


def test_a_taint_at_the_central_ca_reaches_every_node_and_every_leaf_under_it_is_replaced_with_no_failed_request(workdir):
    """SPIRE's forced rotation, through `ca serve --ca-dir` replicas: the Secret gets a new
    intermediate and `tainted-certs.pem` naming the old one (written by `sds-agent ca taint`).
    The replicas sign with the new one; the agents on two nodes learn the taint from the replicas'
    answers (their probe asks every 15 s) and re-issue every leaf under the old intermediate
    within --taint-reissue-window; live mTLS between the nodes never fails. Then a root: its
    replacement prepared first, then tainted; the old root leaves every Envoy's bundle."""
    hosts = HOSTS[:2]
    ca = CA(workdir, hosts)
    v1, root_key, secret, signer, jwks, port, replicas = ca.v1, ca.root_key, ca.secret, ca.signer, ca.jwks, ca.port, ca.replicas
    bundle = os.path.join(workdir, "bundle.pem")
    shutil.copy(os.path.join(v1, "root-cert.pem"), bundle)
    nodes = []
    try:
        for name in ("a", "b"):
            node = Node(os.path.join(workdir, name), AGENT_BIN, ENVOY_BIN)
            node.signer = signer
            node.jwks = jwks
            node.start_agent("--upstream-ca", ",".join(f"{h}:{port}" for h in hosts), "--upstream-ca-bundle", bundle,
                             "--upstream-ca-server-name", "ca.mesh.test", "--audience", "istio-ca", "--cert-ttl", "1h",
                             "--taint-reissue-window", "10s", "--taint-root-grace", "20s", "--metrics-address", "127.0.0.1:0")
            nodes.append(node)
        a, b = nodes
        backend, frontend = envoy_pair(a, b)
        assert frontend.get("/hello")[0] == 200
        load = Load(frontend)
        envoys = ((a, backend, "backend"), (b, frontend, "frontend"))
        (int1,) = x509.load_pem_x509_certificates(open(os.path.join(v1, "ca-cert.pem"), "rb").read())

        # 1. A new intermediate and the old one tainted, in one Secret update.
        v2 = os.path.join(workdir, "ca-v2")
        assert ca_init(v2, "--root-cert", os.path.join(v1, "root-cert.pem"), "--root-key", root_key).returncode == 0
        staged = os.path.join(workdir, "staged")
        shutil.copytree(v2, staged)
        tainted = subprocess.run([AGENT_BIN, "ca", "taint", staged, os.path.join(v1, "ca-cert.pem")],
                                 capture_output=True, text=True, timeout=30)
        assert tainted.returncode == 0, tainted.stderr
        files = read_files(v2)
        files["tainted-certs.pem"] = open(os.path.join(staged, "tainted-certs.pem"), "rb").read()
        tainted_at = time.monotonic()
        publish_files(secret, 2, files)
        (int2,) = x509.load_pem_x509_certificates(open(os.path.join(v2, "ca-cert.pem"), "rb").read())

        def clean():
            chains = {account: leaf_chain(node, signer, account) for node, _, account in envoys}
            return all(chains[account][1] == int2 and
                       int(next(iter(envoy.serials_for(f"{TD}/ns/demo/sa/{account}"))), 16) == chains[account][0].serial_number
                       for _, envoy, account in envoys)
        wait_until(clean, 60, "every Envoy holding a leaf under the new intermediate")
        took = time.monotonic() - tainted_at
        print(f"taint of an intermediate: every Envoy on two nodes clean {took:.1f} s after the Secret update")
        for node in nodes:
            wait_until(lambda: node.agent_metrics().get("sds_agent_tainted_leaves") == 0, 20, "no tainted leaf counted")
            assert "upstream CA taint: the CA declared certificates compromised" in node.agent.output()
        assert int1 != int2

        # 2. A root: the replacement prepared (both roots in root-cert.pem, a long activation
        #    delay), then the old root tainted: the new one signs at once, leaves move, and the old
        #    root leaves every Envoy's bundle once no leaf chains to it (after the grace).
        v3 = os.path.join(workdir, "ca-v3")
        assert ca_init(v3).returncode == 0
        files = read_files(v3)
        files["root-cert.pem"] += open(os.path.join(v1, "root-cert.pem"), "rb").read()
        # A long activation delay, so only the taint can make the new root sign early.
        for host in hosts:
            replicas[host].stop()
            replicas[host] = start_replica(workdir, secret, jwks, host, port, activation_delay="600s")
        publish_files(secret, 3, {**files, "tainted-certs.pem": b""})
        # With 1 h certificates no CSR is due: the agents hear the new root from the replicas'
        # answers to their probe (every 15 s), which carry the roots as they carry the taint.
        for replica in replicas.values():
            wait_until(lambda: "the new root is in the trust bundle" in replica.output(), 30, "each replica to publish the new root")
        for node in nodes:
            wait_until(lambda: "roots=2" in node.agent.output(), 40, "the agent to hear the new root from a probe")
        envoy_roots = lambda e: {cert["serial_number"] for entry in __import__("json").loads(e.admin("/certs")[1])["certificates"]  # noqa: E731
                                 for cert in entry.get("ca_cert", [])}
        wait_until(lambda: all(len(envoy_roots(e)) == 2 for _, e, _ in envoys), 60, "old + new roots on every Envoy")
        (old_root,) = x509.load_pem_x509_certificates(open(os.path.join(v1, "root-cert.pem"), "rb").read())
        files["tainted-certs.pem"] = old_root.public_bytes(Encoding.PEM)
        publish_files(secret, 4, files)
        (int3,) = x509.load_pem_x509_certificates(open(os.path.join(v3, "ca-cert.pem"), "rb").read())

        def moved():
            return all(leaf_chain(node, signer, account)[1] == int3 for node, _, account in envoys)
        wait_until(moved, 60, "leaves under the new root")
        old_serial = format(old_root.serial_number, "x")
        wait_until(lambda: all(old_serial.lstrip("0") not in {s.lstrip("0") for s in envoy_roots(e)}
                               for _, e, _ in envoys), 90, "the tainted root gone from every Envoy")
        result = load.stop()
        assert set(result) == {200} and result[200] > 20, (result, load.errors)
        print(f"taint: {result[200]} requests across two nodes, 0 failed")
    finally:
        for node in nodes:
            node.stop_all()
        for replica in replicas.values():
            replica.stop()


def test_replicas_that_see_different_directories_mid_update_do_not_make_the_agents_bundle_flap(workdir):
    """A Secret update reaches the replicas' pods one by one: for a while one replica signs under
    the old root and sends only it, another already sends the new root too. The agent's bundle is
    the union of its replicas' last answers, so it changes once (the new root added) and stays,
    however the renewals alternate between them; traffic never fails."""
    v1 = os.path.join(workdir, "ca-v1")
    assert ca_init(v1).returncode == 0
    v2 = os.path.join(workdir, "ca-v2")
    assert ca_init(v2).returncode == 0
    with open(os.path.join(v2, "root-cert.pem"), "ab") as f:
        f.write(open(os.path.join(v1, "root-cert.pem"), "rb").read())
    old, new = os.path.join(workdir, "secret-old"), os.path.join(workdir, "secret-new")
    os.makedirs(old)
    os.makedirs(new)
    publish(old, 1, v1)
    publish(new, 1, v2)
    bundle = os.path.join(workdir, "bundle.pem")
    with open(bundle, "wb") as f:
        f.write(open(os.path.join(v2, "root-cert.pem"), "rb").read())
    signer = TokenSigner()
    jwks = signer.write_jwks(os.path.join(workdir, "jwks.json"))
    port = free_port()
    replicas = {"127.0.0.1": start_replica(workdir, old, jwks, "127.0.0.1", port),
                "127.0.0.2": start_replica(workdir, new, jwks, "127.0.0.2", port)}
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    node.signer = signer
    node.jwks = jwks
    try:
        node.start_agent("--upstream-ca", f"127.0.0.1:{port},127.0.0.2:{port}", "--upstream-ca-bundle", bundle,
                         "--upstream-ca-server-name", "ca.mesh.test", "--audience", "istio-ca", "--cert-ttl", "10s")
        backend, frontend = envoy_pair(node, node)
        load = Load(frontend)
        # Renewals every ~5 s per identity, round-robin over the two: both replicas sign repeatedly.
        wait_until(lambda: all(len(issued_serials(r)) >= 3 for r in replicas.values()), 60, "renewals from both replicas")
        changes = node.agent.output().count("trust bundle changed")
        assert changes <= 2, f"the bundle changed {changes} times: it flapped"
        assert "roots=2" in node.agent.output()
        result = load.stop()
        assert set(result) == {200} and result[200] > 20, (result, load.errors)
        print(f"mid-update: {changes} bundle change(s) over {sum(len(issued_serials(r)) for r in replicas.values())} "
              f"renewals from two replicas that disagree; {result[200]} requests, 0 failed")
    finally:
        node.stop_all()
        for replica in replicas.values():
            replica.stop()


def test_an_agents_own_ca_dir_taint_refuses_signing_counts_and_marks_the_leaves_then_replaces_them(workdir):
    """`serve --ca-dir` reads the same tainted-certs.pem: the intermediate it signs with tainted
    and no replacement yet, it refuses to sign (a new identity gets `unavailable`), says so in
    `sds_agent_ca_signer_tainted`, and counts and marks the leaves it serves under it; once the
    replacement is in the directory every one is re-issued and the count goes to 0, with traffic
    flowing throughout."""
    v1 = os.path.join(workdir, "ca-v1")
    assert ca_init(v1).returncode == 0
    secret = os.path.join(workdir, "secret")
    os.makedirs(secret)
    publish(secret, 1, v1)
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    try:
        node.start_agent("--ca-dir", secret, "--cert-ttl", "1h", "--taint-reissue-window", "5s", "--metrics-address", "127.0.0.1:0")
        app = node.start_app("backend")
        backend = node.start_envoy("backend", node.token_file("backend", "demo", "backend"), app_port=app,
                                   allow_ids=[f"{TD}/ns/demo/sa/frontend"])
        frontend = node.start_envoy("frontend", node.token_file("frontend", "demo", "frontend"),
                                    upstream_port=backend.inbound_port, upstream_ids=[f"{TD}/ns/demo/sa/backend"])
        load = Load(frontend)
        files = read_files(v1)
        files["tainted-certs.pem"] = open(os.path.join(v1, "ca-cert.pem"), "rb").read()
        publish_files(secret, 2, files)
        wait_until(lambda: node.agent_metrics().get("sds_agent_ca_signer_tainted") == 1, 20, "the signer marked tainted")
        wait_until(lambda: node.agent_metrics().get("sds_agent_tainted_leaves") == 2, 20, "both leaves counted")
        table = subprocess.run([AGENT_BIN, "inspect", "--admin-socket", os.path.join(node.workdir, "state", "admin.sock")],
                               capture_output=True, text=True, timeout=30).stdout
        assert table.count("(TAINTED)") == 2, table
        with pytest.raises(grpc.RpcError) as refused:
            fetch(node, node.signer.token("demo", "newcomer"), ("default",), timeout=20)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "tainted" in refused.value.details()

        # The replacement: a new intermediate under the same root, the old one still tainted.
        v2 = os.path.join(workdir, "ca-v2")
        assert ca_init(v2, "--root-cert", os.path.join(v1, "root-cert.pem"), "--root-key", v1 + "-root-key.pem").returncode == 0
        files = read_files(v2)
        files["tainted-certs.pem"] = open(os.path.join(v1, "ca-cert.pem"), "rb").read()
        publish_files(secret, 3, files)
        wait_until(lambda: node.agent_metrics().get("sds_agent_tainted_leaves") == 0 and
                   node.agent_metrics().get("sds_agent_ca_signer_tainted") == 0, 30, "every leaf replaced")
        assert len(fetch(node, node.signer.token("demo", "newcomer"), ("default",)).resources) == 1
        result = load.stop()
        assert set(result) == {200} and result[200] > 20, (result, load.errors)
    finally:
        node.stop_all()


def upstream_context(node, signer):
    """The validation context (ROOTCA) the agent serves now."""
    resources = fetch(node, signer.token("demo", "frontend", audience="istio-ca"), ["ROOTCA"]).resources
    secret = secret_pb2.Secret()
    resources[0].Unpack(secret)
    return secret.validation_context


def test_a_crl_in_the_secret_reaches_agents_in_upstream_mode_and_a_real_envoy_refuses_the_revoked_peer(workdir):
    """Istio 1.27's ca-crl.pem in the replicas' Secret: each answer of `ca serve` (refusals and
    probes included) announces the lists it serves, and an agent in upstream mode serves them in
    its validation contexts as an agent with the directory does, `only_verify_leaf_cert_crl` set
    when only the intermediate publishes one. With 1 h certificates no CSR is due: the probe
    brings each change. A broken list is refused by the replicas; the one in force stays."""
    from test_ca_operators import make_crl
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    hosts = HOSTS[:2]
    ca = CA(workdir, hosts)
    bundle = os.path.join(workdir, "bundle.pem")
    shutil.copy(os.path.join(ca.v1, "root-cert.pem"), bundle)
    (int1,) = x509.load_pem_x509_certificates(open(os.path.join(ca.v1, "ca-cert.pem"), "rb").read())
    intermediate = (int1, load_pem_private_key(open(os.path.join(ca.v1, "ca-key.pem"), "rb").read(), None))
    files = read_files(ca.v1)
    publish_files(ca.secret, 2, {**files, "ca-crl.pem": make_crl(intermediate).public_bytes(Encoding.PEM)})
    node = Node(os.path.join(workdir, "node"), AGENT_BIN, ENVOY_BIN)
    node.signer, node.jwks = ca.signer, ca.jwks
    try:
        node.start_agent("--upstream-ca", ca.endpoints, "--upstream-ca-bundle", bundle, "--upstream-ca-server-name",
                         "ca.mesh.test", "--audience", "istio-ca", "--cert-ttl", "1h", "--metrics-address", "127.0.0.1:0")
        reports_id = f"{TD}/ns/demo/sa/reports"
        app = node.start_app("backend")
        backend = node.start_envoy("backend", node.token_file("backend", "demo", "backend", audience="istio-ca"),
                                   app_port=app, allow_ids=[f"{TD}/ns/demo/sa/frontend", reports_id])
        clients = [node.start_envoy(name, node.token_file(name, "demo", name, audience="istio-ca"),
                                    upstream_port=backend.inbound_port, upstream_ids=[f"{TD}/ns/demo/sa/backend"],
                                    max_requests_per_connection=1) for name in ("frontend", "reports")]
        frontend, reports = clients
        wait_until(lambda: upstream_context(node, ca.signer).crl.inline_bytes, 40, "the CRL in the validation context")
        context = upstream_context(node, ca.signer)
        assert x509.load_pem_x509_crl(context.crl.inline_bytes).issuer == int1.subject
        assert context.only_verify_leaf_cert_crl is True, "only the intermediate publishes a list"
        assert frontend.get("/hello")[0] == 200 and reports.get("/hello")[0] == 200, "an empty list revokes no one"

        revoked = int(next(iter(reports.serials_for(reports_id))), 16)
        publish_files(ca.secret, 3, {**files, "ca-crl.pem": make_crl(intermediate, [revoked]).public_bytes(Encoding.PEM)})
        wait_until(lambda: x509.load_pem_x509_crl(upstream_context(node, ca.signer).crl.inline_bytes)
                   .get_revoked_certificate_by_serial_number(revoked) is not None, 40, "the new list at the agent")
        wait_until(lambda: reports.get("/hello")[0] != 200, 20, "the revoked peer refused by the backend's Envoy")
        assert frontend.get("/hello")[0] == 200 and reports.get("/hello")[0] == 503
        assert node.agent_metrics().get("sds_agent_crl_reloads_total", 0) >= 2

        in_force = upstream_context(node, ca.signer).crl.inline_bytes
        publish_files(ca.secret, 4, {**files, "ca-crl.pem": b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"})
        for replica in ca.replicas.values():
            wait_until(lambda: "CRL REFUSED" in replica.output(), 30, "each replica refusing the broken list")
        # A new identity's CSR after the refusal: its answer carries what the replica serves now.
        token = ca.signer.token("demo", "after-broken-crl", audience="istio-ca")
        wait_until(lambda: served_new_identity(node, token), 30, "a new identity after the broken list")
        assert upstream_context(node, ca.signer).crl.inline_bytes == in_force
        assert frontend.get("/hello")[0] == 200 and reports.get("/hello")[0] == 503
        assert "CRL REFUSED" not in node.agent.output(), "the replicas kept the list in force: nothing new reached the agent"
    finally:
        node.stop_all()
        ca.stop()
