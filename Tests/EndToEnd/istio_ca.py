"""Istio's CSR API from Python: stubs compiled from the repository's copy of Istio's ca.proto
(istio/api security/v1alpha1/ca.proto, same package, names and numbers), and a stand-in for istiod.

There is no istiod on these machines. `IstiodStandIn` is written from Istio's proto and from what
istiod's server does (istio/istio security/pkg/server/ca/server.go and node_auth.go, summarised in
docs/ISTIO-FACTS.md): a bearer token checked with audience `istio-ca`; the certificate's SAN is the
caller's identity, or `metadata["ImpersonatedIdentity"]` when the caller is a trusted node account
and a pod of the requested service account runs on the caller's node; every refusal is
`UNAUTHENTICATED`; the answer is leaf, intermediate, root (root last). It signs with a
root -> intermediate chain, as an operator's istiod with plug-in certificates does.
"""
import datetime
import importlib
import ipaddress
import os
import subprocess
import sys
from concurrent import futures

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
_compiled = {}


def stubs(directory):
    """(ca_pb2, ca_pb2_grpc) compiled by grpcio-tools from Protos/security/v1alpha1/ca.proto."""
    if "modules" not in _compiled:
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(REPO, "Protos"),
                        f"--python_out={directory}", f"--grpc_python_out={directory}",
                        os.path.join(REPO, "Protos", "security", "v1alpha1", "ca.proto")], check=True, timeout=60)
        sys.path.insert(0, str(directory))
        _compiled["modules"] = (importlib.import_module("security.v1alpha1.ca_pb2"),
                                importlib.import_module("security.v1alpha1.ca_pb2_grpc"))
    return _compiled["modules"]


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _ca(name, issuer_name=None, issuer_key=None, path_length=None):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "istiod stand-in"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=1)).not_valid_after(_now() + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(issuer_key or key, hashes.SHA256()))
    return key, cert


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class IstiodStandIn:
    """A TLS gRPC server answering IstioCertificateService.CreateCertificate as istiod does."""

    def __init__(self, workdir, signer, trust_domain="cluster.local", audience="istio-ca",
                 trusted_node_accounts=(), pods_on_node=(), port=0):
        self.pb2, self.pb2_grpc = stubs(workdir)
        self.signer = signer
        self.trust_domain = trust_domain
        self.audience = audience
        self.trusted_node_accounts = set(trusted_node_accounts)
        # (namespace, service account) pairs with a pod on the caller's node (one node here).
        self.pods_on_node = set(pods_on_node)
        self.requests = []      # (caller sub, impersonated, cluster id) of every call that reached it
        self.refusals = []      # reasons, as istiod logs them
        self.root_key, self.root = _ca("stand-in root")
        self.int_key, self.intermediate = _ca("stand-in intermediate", self.root.subject, self.root_key, 0)
        self.server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = (x509.CertificateBuilder()
                       .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "istiod.istio-system.svc")]))
                       .issuer_name(self.root.subject).public_key(self.server_key.public_key())
                       .serial_number(x509.random_serial_number())
                       .not_valid_before(_now() - datetime.timedelta(minutes=1))
                       .not_valid_after(_now() + datetime.timedelta(days=1))
                       .add_extension(x509.SubjectAlternativeName([
                           x509.DNSName("istiod.istio-system.svc"),
                           x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                       .sign(self.root_key, hashes.SHA256()))
        self.server_pem = pem(server_cert).encode()
        self.bundle_file = os.path.join(workdir, "istiod-root.pem")
        with open(self.bundle_file, "w") as f:
            f.write(pem(self.root))
        self.port = port
        self.server = None

    # -- istiod's rules ----------------------------------------------------------------------
    def _refuse(self, context, reason):
        self.refusals.append(reason)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "request authenticate failure")

    def CreateCertificate(self, request, context):
        metadata = dict(context.invocation_metadata())
        auth = metadata.get("authorization", "")
        if not auth.startswith("Bearer "):
            self._refuse(context, "no bearer token")
        try:
            claims = jwt.decode(auth[len("Bearer "):], self.signer.key.public_key(), algorithms=["RS256"],
                                audience=self.audience)
        except jwt.PyJWTError as e:
            self._refuse(context, f"token: {e}")
        k8s = claims["kubernetes.io"]
        caller = (k8s["namespace"], k8s["serviceaccount"]["name"])
        identity = f"spiffe://{self.trust_domain}/ns/{caller[0]}/sa/{caller[1]}"
        impersonated = request.metadata.fields.get("ImpersonatedIdentity")
        impersonated = impersonated.string_value if impersonated is not None else ""
        self.requests.append((claims["sub"], impersonated, metadata.get("clusterid")))
        if impersonated:
            if "/".join(caller) not in self.trusted_node_accounts:
                self._refuse(context, f"caller {'/'.join(caller)} is not in CA_TRUSTED_NODE_ACCOUNTS")
            parts = impersonated.split("/")
            if not impersonated.startswith(f"spiffe://{self.trust_domain}/ns/") or len(parts) != 7 or parts[5] != "sa":
                self._refuse(context, f"bad impersonated identity {impersonated}")
            if (parts[4], parts[6]) not in self.pods_on_node:
                self._refuse(context, f"no pod of {parts[4]}/{parts[6]} on the caller's node")
            identity = impersonated
        csr = x509.load_pem_x509_csr(request.csr.encode())
        if not csr.is_signature_valid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad CSR signature")
        ttl = request.validity_duration or 3600
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.intermediate.subject)
                .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(_now() - datetime.timedelta(minutes=1))
                .not_valid_after(_now() + datetime.timedelta(seconds=ttl))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, True, False, False, False, False, False, False, False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
                .sign(self.int_key, hashes.SHA256()))
        return self.pb2.IstioCertificateResponse(cert_chain=[pem(leaf), pem(self.intermediate), pem(self.root)])

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.method_handlers_generic_handler("istio.v1.auth.IstioCertificateService", {
            "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                self.CreateCertificate, request_deserializer=self.pb2.IstioCertificateRequest.FromString,
                response_serializer=self.pb2.IstioCertificateResponse.SerializeToString)})
        server.add_generic_rpc_handlers((handler,))
        key = self.server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
        credentials = grpc.ssl_server_credentials([(key, self.server_pem)])
        self.port = server.add_secure_port(f"127.0.0.1:{self.port}", credentials)
        server.start()
        self.server = server
        return self

    def stop(self):
        if self.server is not None:
            self.server.stop(grace=None).wait(10)
            self.server = None

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"


def client_call(pb2, pb2_grpc, address, root_pem_file, token, csr_pem, impersonated=None, server_name=None):
    """One CreateCertificate call with a client generated from Istio's ca.proto; the chain or a grpc.RpcError."""
    with open(root_pem_file, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    with grpc.secure_channel(address, credentials, options=options) as channel:
        stub = pb2_grpc.IstioCertificateServiceStub(channel)
        request = pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=3600)
        if impersonated:
            request.metadata.update({"ImpersonatedIdentity": impersonated})
        metadata = [("authorization", f"Bearer {token}"), ("clusterid", "Kubernetes")]
        return list(stub.CreateCertificate(request, metadata=metadata, timeout=10).cert_chain)


def make_csr(uri="spiffe://cluster.local/ns/evil/sa/admin"):
    """A CSR (and its key) asking for `uri`, as a hostile or careless client would."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def leaf_uris(chain_pem):
    leaf = x509.load_pem_x509_certificate(chain_pem.encode())
    return leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
