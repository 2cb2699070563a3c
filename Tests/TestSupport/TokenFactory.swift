import Crypto
import Foundation

/// Signs Kubernetes-shaped service-account JWTs with a real ES256 key, and publishes its JWKS.
///
/// Signing is done here with swift-crypto directly (not jwt-kit, which the verifier uses), so the
/// tests check the verifier against an independent JWS implementation.
public struct TokenFactory: Sendable {
    public static let issuer = "https://kubernetes.default.svc.cluster.local"
    public static let audience = "sds-agent"

    public let key: P256.Signing.PrivateKey
    public let kid: String

    public init(kid: String = "test-key-1", key: P256.Signing.PrivateKey = P256.Signing.PrivateKey()) {
        self.key = key
        self.kid = kid
    }

    /// The public key as a JWK.
    public var jwk: [String: String] {
        let point = key.publicKey.x963Representation  // 0x04 || x || y
        return [
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": Self.base64URL(point.dropFirst().prefix(32)), "y": Self.base64URL(point.suffix(32)),
        ]
    }

    /// A JWKS document with this factory's key and any others.
    public func jwksJSON(including others: [TokenFactory] = []) -> Data {
        let keys = [jwk] + others.map(\.jwk)
        return try! JSONSerialization.data(withJSONObject: ["keys": keys])
    }

    /// Claims of a bound token for `namespace`/`serviceAccount`, valid from `now` for `ttl` seconds.
    public static func claims(
        namespace: String, serviceAccount: String, now: Date, ttl: TimeInterval = 3600, podUID: String? = nil
    ) -> [String: Any] {
        let t = Int(now.timeIntervalSince1970)
        return [
            "iss": issuer, "aud": [audience], "sub": "system:serviceaccount:\(namespace):\(serviceAccount)",
            "iat": t, "nbf": t, "exp": t + Int(ttl),
            "kubernetes.io": [
                "namespace": namespace,
                "serviceaccount": ["name": serviceAccount, "uid": UUID().uuidString.lowercased()],
                "pod": ["name": "\(serviceAccount)-abcde", "uid": podUID ?? UUID().uuidString.lowercased()],
            ],
        ]
    }

    /// A signed token for `namespace`/`serviceAccount`.
    public func token(
        namespace: String = "demo", serviceAccount: String = "frontend", now: Date = Date(), ttl: TimeInterval = 3600,
        podUID: String? = nil
    ) -> String {
        sign(claims: Self.claims(namespace: namespace, serviceAccount: serviceAccount, now: now, ttl: ttl, podUID: podUID))
    }

    /// Signs arbitrary claims with ES256 under `header` (default `{"alg":"ES256","kid":kid}`).
    public func sign(claims: [String: Any], header: [String: Any]? = nil) -> String {
        let input = Self.signingInput(header: header ?? ["alg": "ES256", "kid": kid, "typ": "JWT"], claims: claims)
        let signature = try! key.signature(for: Data(input.utf8)).rawRepresentation
        return input + "." + Self.base64URL(signature)
    }

    /// `base64url(header) + "." + base64url(claims)`.
    public static func signingInput(header: [String: Any], claims: [String: Any]) -> String {
        let h = try! JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        let c = try! JSONSerialization.data(withJSONObject: claims, options: [.sortedKeys])
        return base64URL(h) + "." + base64URL(c)
    }

    public static func base64URL(_ data: some DataProtocol) -> String {
        Data(data).base64EncodedString().replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }
}
