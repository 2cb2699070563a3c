"""The peer-attested socket (`--workload-socket`), the attestation policy and the SPIFFE Workload API.

Clients are real: the SPIFFE project's Python library (PyPI `spiffe`, its WorkloadApiClient) and
Envoys whose SDS configuration is the one Istio's sidecar bootstrap carries (the `sds-grpc` cluster:
`envoy_grpc` over the Unix socket at `./var/run/secrets/workload-spiffe-uds/socket`, no call
credentials, `default` and `ROOTCA`).

Stand-ins, because no Kubernetes runs here: the API server (fake_apiserver.py, written from core/v1:
a node's pods listed across namespaces and watched, and the node object) and /proc (a fixture
`--proc-root`: each calling process gets `<proc>/<pid>/cgroup` naming its pod's UID the way the
kubelet's systemd cgroup driver does). The peer PIDs themselves are the kernel's (SO_PEERCRED).
"""
import os
import signal
import threading
import uuid

import grpc
import yaml
from spiffe import JwtSvid, TrustDomain, WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc
from cryptography import x509

from conftest import AGENT_BIN, ENVOY_BIN, in_pod, put_in_pod, TRUST_DOMAIN
from fake_apiserver import FakeAPIServer
from sdsdemo.node import Node, wait_until

NODE = "node-a"
ISTIO_SOCKET = "var/run/secrets/workload-spiffe-uds/socket"
DIGEST = "sha256:" + "ab" * 32
HEADER = [("workload.spiffe.io", "true")]


class AttestedNode:
    """An agent with the peer-attested socket at Istio's slot (under `root`, the pods' working
    directory), its fixture /proc, and the API-server stand-in holding this node and its pods."""

    def __init__(self, workdir, *agent_args, node_labels=None):
        self.node = Node(os.path.join(workdir, "n"), AGENT_BIN, ENVOY_BIN)
        self.root = os.path.join(workdir, "root")
        self.workload_socket = os.path.join(self.root, ISTIO_SOCKET)
        self.proc = os.path.join(workdir, "proc")
        os.makedirs(self.proc)
        self.api = FakeAPIServer(workdir, self.node.signer).__enter__()
        self.api.nodes[NODE] = node_labels or {"topology.kubernetes.io/region": "eu-west-1"}
        self.agent_args = agent_args

    def start(self):
        self.node.start_agent("--workload-socket", self.workload_socket, "--node-name", NODE, "--proc-root", self.proc,
                              "--ca-activation-delay", "1s", *self.api.agent_args(), *self.agent_args)
        return self

    def pod(self, namespace, name, service_account, image="registry.example/payments/api:1.0", labels=None,
            node=NODE, digest=DIGEST):
        """Adds a running pod to the API server; returns its UID."""
        uid = str(uuid.uuid4())
        repository = image.split("@")[0].rsplit(":", 1)[0]
        self.api.put_pod(namespace, name, uid=uid, serviceAccountName=service_account, nodeName=node,
                         labels=labels if labels is not None else {"app": "api"},
                         containers=[("main", image, f"{repository}@{digest}")])
        return uid

    def client(self):
        return WorkloadApiClient(socket_path=f"unix:{self.workload_socket}", default_timeout=15)

    def raw_call(self, method, request, metadata=HEADER):
        """One call through a plain gRPC stub: the status code, not the library's wrapping."""
        with grpc.insecure_channel(f"unix:{self.workload_socket}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            call = getattr(stub, method)(request, metadata=metadata, timeout=15)
            return next(call) if method.startswith("FetchX509") else call

    def close(self):
        self.node.stop_all()
        self.api.__exit__(None, None, None)


def status_of(call):
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def test_the_spiffe_client_gets_its_pods_identity_bundles_rotation_and_jwt(workdir):
    attested = AttestedNode(workdir)
    try:
        uid = attested.pod("payments", "api-0", "api")
        put_in_pod(attested.proc, os.getpid(), uid)
        attested.start()
        client = attested.client()

        svid = client.fetch_x509_svid()
        assert str(svid.spiffe_id) == f"spiffe://{TRUST_DOMAIN}/ns/payments/sa/api"
        bundles = client.fetch_x509_bundles()
        roots = bundles.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN)).x509_authorities
        leaf = svid.leaf
        assert any(root.subject == leaf.issuer for root in roots)
        # The leaf verifies with the root the client was given.
        root = next(root for root in roots if root.subject == leaf.issuer)
        leaf.verify_directly_issued_by(root)

        # The stream is pushed again on rotation: SIGUSR1 starts a root rotation (old + new
        # roots first, then a new leaf from the new root after the 1 s activation delay).
        contexts, errors = [], []
        seen = threading.Condition()

        def on_success(context):
            with seen:
                contexts.append(context)
                seen.notify_all()

        handler = client.stream_x509_contexts(on_success=on_success, on_error=errors.append, retry_connect=False)
        try:
            wait_until(lambda: contexts, 15, "the first X.509 context")
            first_serial = contexts[0].default_svid.leaf.serial_number
            os.kill(attested.node.agent.pid, signal.SIGUSR1)
            rotated = wait_until(
                lambda: next((c for c in contexts if c.default_svid.leaf.serial_number != first_serial), None),
                30, "a rotated X.509-SVID pushed on the open stream")
            assert str(rotated.default_svid.spiffe_id) == f"spiffe://{TRUST_DOMAIN}/ns/payments/sa/api"
            new_roots = rotated.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN)).x509_authorities
            assert any(r.subject == rotated.default_svid.leaf.issuer and r != root for r in new_roots)
        finally:
            handler.cancel()
        assert not errors

        # JWT-SVID: fetched, and valid with the JWT bundle fetched from the same API.
        jwt_svid = client.fetch_jwt_svid(audience={"payments-db"})
        jwt_bundles = client.fetch_jwt_bundles()
        jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
        validated = JwtSvid.parse_and_validate(jwt_svid.token, jwt_bundle, {"payments-db"})
        assert str(validated.spiffe_id) == f"spiffe://{TRUST_DOMAIN}/ns/payments/sa/api"
        assert client.validate_jwt_svid(jwt_svid.token, "payments-db").spiffe_id == validated.spiffe_id
        code, detail = status_of(lambda: attested.raw_call(
            "ValidateJWTSVID", workload_pb2.ValidateJWTSVIDRequest(audience="someone-else", svid=jwt_svid.token)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "audience" in detail
        # Only its own identity.
        code, _ = status_of(lambda: attested.raw_call(
            "FetchJWTSVID", workload_pb2.JWTSVIDRequest(audience=["x"], spiffe_id=f"spiffe://{TRUST_DOMAIN}/ns/kube-system/sa/admin")))
        assert code == grpc.StatusCode.PERMISSION_DENIED

        # Without the spec's security header: invalid_argument, and no identity.
        for method, request in [("FetchX509SVID", workload_pb2.X509SVIDRequest()),
                                ("FetchJWTSVID", workload_pb2.JWTSVIDRequest(audience=["x"]))]:
            code, detail = status_of(lambda: attested.raw_call(method, request, metadata=[]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "workload.spiffe.io" in detail, (method, code)
        client.close()
    finally:
        attested.close()


def istio_sds(path):
    """Rewrites a rendered bootstrap's SDS to what Istio's generated bootstrap carries
    (tools/packaging/common/envoy_bootstrap.json): the `sds-grpc` cluster, no call credentials."""
    with open(path) as f:
        bootstrap = yaml.safe_load(f)
    istio = {"resource_api_version": "V3", "initial_fetch_timeout": "0s",
             "api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
                                   "set_node_on_first_message_only": True,
                                   "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]}}

    def replace(node):
        if isinstance(node, dict):
            for key in list(node):
                if key == "sds_config":
                    node[key] = istio
                else:
                    replace(node[key])
        elif isinstance(node, list):
            for item in node:
                replace(item)

    replace(bootstrap)
    bootstrap["static_resources"]["clusters"].append({
        "name": "sds-grpc", "type": "STATIC", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "sds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"pipe": {"path": "./" + ISTIO_SOCKET}}}}]}]}})
    text = yaml.safe_dump(bootstrap)
    assert "credentials" not in text and "token" not in text.lower()
    with open(path, "w") as f:
        f.write(text)


def test_envoys_with_istios_sds_bootstrap_get_certificates_without_tokens_and_do_mtls(workdir):
    attested = AttestedNode(workdir)
    try:
        attested.start()
        node = attested.node
        backend_pod = attested.pod("demo", "backend-0", "backend")
        frontend_pod = attested.pod("demo", "frontend-0", "frontend")
        backend_id, frontend_id = f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/backend", f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/frontend"
        # The rendered template needs a token file; Istio's SDS config below sends none.
        unused = node.token_file("unused", "demo", "unused")
        app = node.start_app("backend")
        server = node.start_envoy("backend", unused, app_port=app, allow_ids=[frontend_id],
                                  launcher=in_pod(attested.proc, backend_pod), cwd=attested.root, transform=istio_sds)
        client = node.start_envoy("frontend", unused, upstream_port=server.inbound_port, upstream_ids=[backend_id],
                                  launcher=in_pod(attested.proc, frontend_pod), cwd=attested.root,
                                  transform=istio_sds)
        assert client.get("/hello")[0] == 200
        assert client.serials_for(frontend_id) and server.serials_for(backend_id)
        log = node.agent.output()
        assert "rejected SDS call" not in log
    finally:
        attested.close()


POLICY = """
rules:
  - name: payments-eu
    namespace: payments
    images: [registry.example/payments/api]
    labels: {app: api}
    nodeLabels: {topology.kubernetes.io/region: eu-west-1}
  - name: us-only
    namespace: us-only
    nodeLabels: {topology.kubernetes.io/region: us-east-1}
  - name: pinned
    spiffeID: spiffe://cluster.local/ns/pinned/sa/job
    images: ["%s"]
""" % DIGEST


def test_attestation_policy_on_images_labels_and_node_labels(workdir):
    policy = os.path.join(workdir, "policy.yaml")
    with open(policy, "w") as f:
        f.write(POLICY)
    attested = AttestedNode(workdir, "--attestation-policy", policy)
    try:
        attested.start()
        me = os.getpid()

        def fetch_as(uid):
            put_in_pod(attested.proc, me, uid)
            return status_of(lambda: attested.raw_call("FetchX509SVID", workload_pb2.X509SVIDRequest()))

        # The matching pod is served; so is a pod no rule selects (the policy is opt-in).
        assert fetch_as(attested.pod("payments", "api-0", "api"))[0] == grpc.StatusCode.OK
        assert fetch_as(attested.pod("other", "x-0", "x", image="evil.example/x:1"))[0] == grpc.StatusCode.OK
        assert fetch_as(attested.pod("pinned", "job-0", "job", image="anything.example/job:2"))[0] == grpc.StatusCode.OK

        refusals = [
            (attested.pod("payments", "api-1", "api", image="evil.example/miner:1"),
             "image: container main runs evil.example/miner:1"),
            (attested.pod("payments", "api-2", "api", labels={"app": "web"}),
             "label app: pod payments/api-2 has another value"),
            (attested.pod("us-only", "svc-0", "svc"),
             f"node label topology.kubernetes.io/region: node {NODE} has another value"),
            (attested.pod("pinned", "job-1", "job", digest="sha256:" + "cd" * 32),
             "image: container main runs registry.example/payments/api:1.0 (sha256:" + "cd" * 32),
        ]
        for uid, selector in refusals:
            code, detail = fetch_as(uid)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (selector, code, detail)
            wait_until(lambda: selector in attested.node.agent.output(), 10, f"the log naming '{selector}'")

        # Applied on the token socket too: the pod is the token's bound pod.
        from envoy.service.discovery.v3 import discovery_pb2
        from envoy.service.secret.v3 import sds_pb2_grpc
        secret_type = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
        bad_pod = attested.pod("payments", "api-3", "api", image="evil.example/miner:2")
        good_pod = attested.pod("payments", "api-4", "api")

        def token_fetch(pod_uid):
            token = attested.node.signer.token("payments", "api", pod_uid=pod_uid)
            with grpc.insecure_channel(f"unix:{attested.node.socket}") as channel:
                stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
                return status_of(lambda: stub.FetchSecrets(
                    discovery_pb2.DiscoveryRequest(resource_names=["default"], type_url=secret_type),
                    metadata=[("istio_sds_credentials_header-bin", token.encode())], timeout=15))

        assert token_fetch(good_pod)[0] == grpc.StatusCode.OK
        code, detail = token_fetch(bad_pod)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "evil.example/miner:2" in detail

        # A pod the API server does not know (yet): unavailable after the brief wait, then
        # served once it appears (through the watch).
        late = str(uuid.uuid4())
        code, detail = fetch_as(late)
        assert code == grpc.StatusCode.UNAVAILABLE and late in detail, (code, detail)
        attested.api.put_pod("payments", "api-late", uid=late, serviceAccountName="api", nodeName=NODE,
                             labels={"app": "api"},
                             containers=[("main", "registry.example/payments/api:1.0", f"registry.example/payments/api@{DIGEST}")])
        assert fetch_as(late)[0] == grpc.StatusCode.OK

        # SIGHUP reloads the policy: a broken file changes nothing; a new one is in force at once.
        with open(policy, "w") as f:
            f.write("rules:\n  - name: typo\n    namespace: payments\n    imagez: [x]\n")
        os.kill(attested.node.agent.pid, signal.SIGHUP)
        wait_until(lambda: "unknown key 'imagez'" in attested.node.agent.output(), 10, "the refused reload")
        assert fetch_as(bad_pod)[0] == grpc.StatusCode.PERMISSION_DENIED
        with open(policy, "w") as f:
            f.write("rules: []\n")
        os.kill(attested.node.agent.pid, signal.SIGHUP)
        wait_until(lambda: "attestation policy reloaded" in attested.node.agent.output(), 10, "the reload")
        assert fetch_as(bad_pod)[0] == grpc.StatusCode.OK
        assert "issued workload certificate" in attested.node.agent.output()
    finally:
        attested.close()


def test_a_process_outside_any_pod_gets_nothing(workdir):
    attested = AttestedNode(workdir)
    try:
        attested.start()
        # No cgroup file for this process: it is in no pod.
        code, detail = status_of(lambda: attested.raw_call("FetchX509SVID", workload_pb2.X509SVIDRequest()))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "pod" in detail
        assert "refused call: attestation failed" in attested.node.agent.output()
    finally:
        attested.close()


def test_a_forged_peer_header_on_the_token_socket_attests_nothing(workdir):
    """The transport replaces whatever a client sends as the peer header: a token-socket caller
    claiming to have come in on the peer-attested socket is still a caller without a token."""
    attested = AttestedNode(workdir)
    try:
        uid = attested.pod("payments", "api-0", "api")
        put_in_pod(attested.proc, os.getpid(), uid)
        attested.start()
        from envoy.service.discovery.v3 import discovery_pb2
        from envoy.service.secret.v3 import sds_pb2_grpc
        secret_type = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
        forged = [("x-sds-agent-peer", f"pid={os.getpid()};uid=0;gid=0;socket=workload")]
        with grpc.insecure_channel(f"unix:{attested.node.socket}") as channel:
            stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
            code, _ = status_of(lambda: stub.FetchSecrets(
                discovery_pb2.DiscoveryRequest(resource_names=["default"], type_url=secret_type),
                metadata=forged, timeout=15))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # The Workload API is not served on the token socket at all.
        with grpc.insecure_channel(f"unix:{attested.node.socket}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            code, _ = status_of(lambda: next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(),
                                                                metadata=HEADER + forged, timeout=15)))
        assert code == grpc.StatusCode.UNIMPLEMENTED
        assert "Workload API: X.509-SVID served" not in attested.node.agent.output()
    finally:
        attested.close()
