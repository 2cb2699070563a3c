"""A local HTTPS stand-in for the Kubernetes API server, for the end-to-end suites.

There is no API server on these machines. This one answers the calls the agent makes,
with the JSON shapes the real one uses: OIDC discovery, the JWKS, TokenReview, and (for `ca serve`'s
node authorization) GET of a pod and the list of a namespace's pods on a node (which it
decides by verifying the token against the signer's key, as the API server would, plus a set of
revoked tokens standing in for deleted pods). For pod attestation it also answers the list of a
node's pods across namespaces (`GET /api/v1/pods?fieldSelector=spec.nodeName%3DNODE`), its watch
(`&watch=1&resourceVersion=N`: newline-separated watch events, as the API server streams them, until
`timeoutSeconds`), and `GET /api/v1/nodes/NAME`. It serves TLS with a certificate for 127.0.0.1
from a CA of its own, and answers only callers presenting the agent's bearer token.
"""
import datetime
import ipaddress
import json
import os
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sdsdemo.devtokens import DEFAULT_ISSUER


def _certificates(directory):
    """A CA and a server certificate for 127.0.0.1; returns (ca_file, cert_file, key_file)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-apiserver-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [os.path.join(directory, n) for n in ("apiserver-ca.pem", "apiserver.pem", "apiserver.key")]
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


class FakeAPIServer:
    def __init__(self, directory, signer, agent_token="agent-own-token", audience="sds-agent", port=0):
        self.signer = signer
        self.audience = audience
        self.agent_token = agent_token
        self.token_file = os.path.join(directory, "agent.token")
        with open(self.token_file, "w") as f:
            f.write(agent_token)
        self.ca_file, cert_file, key_file = _certificates(directory)
        self.revoked = set()
        self.requests = []
        # Pods by (namespace, name): {"uid", "serviceAccountName", "nodeName"}, and optionally
        # "labels" and "containers" [(name, image, imageID)] (for attestation).
        self.pods = {}
        # Node labels by node name.
        self.nodes = {}
        # Watch events: (resourceVersion, type, namespace, name, pod); put_pod/delete_pod add them.
        self.events = []
        self.version = 1
        self.changed = threading.Condition()
        self.closing = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self):
                server.requests.append((self.command, self.path, self.headers.get("Authorization")))
                if self.headers.get("Authorization") != f"Bearer {server.agent_token}":
                    self._answer(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
                    return False
                return True

            def do_GET(self):
                if not self._authorized():
                    return
                if self.path == "/.well-known/openid-configuration":
                    self._answer(200, {"issuer": DEFAULT_ISSUER, "jwks_uri": "https://172.18.0.2:6443/openid/v1/jwks",
                                       "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                                       "id_token_signing_alg_values_supported": ["RS256"]})
                elif self.path == "/openid/v1/jwks":
                    self._answer(200, {"keys": [server.signer.jwk()]})
                elif self.path.startswith("/api/v1/namespaces/"):
                    server.answer_pods(self)
                elif self.path.startswith("/api/v1/pods?"):
                    server.answer_node_pods(self)
                elif self.path.startswith("/api/v1/nodes/"):
                    name = self.path[len("/api/v1/nodes/"):]
                    if name not in server.nodes:
                        return self._answer(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                    self._answer(200, {"apiVersion": "v1", "kind": "Node",
                                       "metadata": {"name": name, "labels": server.nodes[name]}})
                else:
                    self._answer(404, {"kind": "Status", "code": 404})

            def do_POST(self):
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                token = body["spec"]["token"]
                status = server.review(token, body["spec"].get("audiences", []))
                self._answer(201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def _pod(namespace, name, pod):
        containers = pod.get("containers", [])
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "uid": pod["uid"],
                             "labels": pod.get("labels", {})},
                "spec": {"serviceAccountName": pod["serviceAccountName"], "nodeName": pod["nodeName"],
                         "containers": [{"name": c, "image": image} for c, image, _ in containers]},
                "status": {"phase": "Running",
                           "containerStatuses": [{"name": c, "image": image, "imageID": image_id, "ready": True}
                                                 for c, image, image_id in containers]}}

    def put_pod(self, namespace, name, **pod):
        """Adds or changes a pod; watchers get ADDED or MODIFIED."""
        with self.changed:
            kind = "MODIFIED" if (namespace, name) in self.pods else "ADDED"
            self.pods[(namespace, name)] = pod
            self.version += 1
            self.events.append((self.version, kind, namespace, name, pod))
            self.changed.notify_all()

    def delete_pod(self, namespace, name):
        with self.changed:
            pod = self.pods.pop((namespace, name))
            self.version += 1
            self.events.append((self.version, "DELETED", namespace, name, pod))
            self.changed.notify_all()

    def answer_node_pods(self, handler):
        """The list of a node's pods in every namespace, or (watch=1) its watch, as the API server streams it."""
        from urllib.parse import parse_qs, urlparse
        query = {k: v[0] for k, v in parse_qs(urlparse(handler.path).query).items()}
        node = query.get("fieldSelector", "").removeprefix("spec.nodeName=")
        if query.get("watch") not in ("1", "true"):
            with self.changed:
                items = [self._pod(ns, name, pod) for (ns, name), pod in self.pods.items() if pod["nodeName"] == node]
                version = self.version
            return handler._answer(200, {"apiVersion": "v1", "kind": "PodList",
                                         "metadata": {"resourceVersion": str(version)}, "items": items})
        since = int(query.get("resourceVersion", "0") or 0)
        deadline = time.monotonic() + min(float(query.get("timeoutSeconds", "60")), 60)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        try:
            while time.monotonic() < deadline and not self.closing:
                with self.changed:
                    fresh = [e for e in self.events if e[0] > since]
                    if not fresh:
                        self.changed.wait(timeout=0.2)
                        continue
                for version, kind, ns, name, pod in fresh:
                    since = version
                    if pod["nodeName"] != node:
                        continue
                    obj = self._pod(ns, name, pod)
                    obj["metadata"]["resourceVersion"] = str(version)
                    handler.wfile.write((json.dumps({"type": kind, "object": obj}) + "\n").encode())
                    handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass

    def answer_pods(self, handler):
        """GET /api/v1/namespaces/NS/pods/NAME and GET /api/v1/namespaces/NS/pods?fieldSelector=spec.nodeName%3DNODE."""
        path, _, query = handler.path.partition("?")
        parts = path.split("/")
        if len(parts) == 7 and parts[5] == "pods":
            pod = self.pods.get((parts[4], parts[6]))
            if pod is None:
                return handler._answer(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
            return handler._answer(200, self._pod(parts[4], parts[6], pod))
        if len(parts) == 6 and parts[5] == "pods" and query.startswith("fieldSelector=spec.nodeName%3D"):
            node = query[len("fieldSelector=spec.nodeName%3D"):]
            items = [self._pod(ns, name, pod) for (ns, name), pod in self.pods.items()
                     if ns == parts[4] and pod["nodeName"] == node]
            return handler._answer(200, {"apiVersion": "v1", "kind": "PodList", "items": items})
        return handler._answer(404, {"kind": "Status", "code": 404})

    def review(self, token, audiences):
        if token in self.revoked:
            return {"authenticated": False, "error": "[invalid bearer token, pod frontend-gone not found]"}
        try:
            claims = jwt.decode(token, self.signer.key.public_key(), algorithms=["RS256"], audience=audiences)
        except jwt.PyJWTError as e:
            return {"authenticated": False, "error": f"invalid bearer token: {e}"}
        k8s = claims["kubernetes.io"]
        return {"authenticated": True, "audiences": [a for a in claims["aud"] if a in audiences],
                "user": {"username": claims["sub"], "uid": k8s["serviceaccount"]["uid"],
                         "groups": ["system:serviceaccounts", f"system:serviceaccounts:{k8s['namespace']}"],
                         "extra": {"authentication.kubernetes.io/pod-name": [k8s["pod"]["name"]],
                                   "authentication.kubernetes.io/pod-uid": [k8s["pod"]["uid"]]}}}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def agent_args(self):
        return ["--kube-api-server", self.url, "--kube-ca-file", self.ca_file, "--kube-token-file", self.token_file]
