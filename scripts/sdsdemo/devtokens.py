"""Dev-only stand-in for the Kubernetes API server's token signer.

Creates an RSA signing key with a JWKS (kid = base64url(SHA-256(DER public key)), as Kubernetes
does) and signs service-account-shaped bound tokens with it. Real keys, real RS256 JWTs.
"""
import base64
import hashlib
import json
import os
import time
import uuid

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"
DEFAULT_AUDIENCE = "sds-agent"


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class TokenSigner:
    """An RSA key that signs tokens, and the JWKS that verifies them."""

    def __init__(self, key=None):
        self.key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.kid = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()

    def jwk(self) -> dict:
        numbers = self.key.public_key().public_numbers()
        return {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
                "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}

    def write_jwks(self, path: str, extra_keys=()) -> str:
        with open(path, "w") as f:
            json.dump({"keys": [self.jwk(), *[k.jwk() for k in extra_keys]]}, f)
        return path

    def claims(self, namespace: str, service_account: str, ttl: int = 3600,
               issuer: str = DEFAULT_ISSUER, audience=DEFAULT_AUDIENCE, now=None, pod_uid=None) -> dict:
        now = int(now if now is not None else time.time())
        pod = f"{service_account}-{uuid.uuid4().hex[:5]}"
        return {
            "iss": issuer, "aud": [audience] if isinstance(audience, str) else list(audience),
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "iat": now, "nbf": now, "exp": now + ttl,
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
                "pod": {"name": pod, "uid": pod_uid or str(uuid.uuid4())},
            },
        }

    def sign(self, claims: dict, kid=None) -> str:
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": kid or self.kid})

    def token(self, namespace: str, service_account: str, **kwargs) -> str:
        return self.sign(self.claims(namespace, service_account, **kwargs))


def write_token(path: str, token: str) -> str:
    """Writes a token file the way kubelet does: to a temporary file, then an atomic rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(token)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path
