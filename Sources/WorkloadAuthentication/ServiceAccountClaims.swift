import JWTKit

/// The claims of a Kubernetes service-account token (bound or legacy).
///
/// `verify(using:)` checks nothing: jwt-kit has no clock skew, so ``KubernetesTokenVerifier``
/// checks time, issuer and audience itself after the signature is verified.
struct ServiceAccountClaims: JWTPayload {
    struct Kubernetes: Codable, Sendable {
        struct Reference: Codable, Sendable {
            var name: String?
            var uid: String?
        }
        var namespace: String?
        var serviceaccount: Reference?
        var pod: Reference?
    }

    var iss: String?
    var sub: String?
    var aud: AudienceClaim?
    var exp: Double?
    var nbf: Double?
    var iat: Double?
    var kubernetes: Kubernetes?
    // Legacy (secret-based, non-expiring) tokens name the account in flat claims instead.
    var legacyNamespace: String?
    var legacyServiceAccountName: String?
    var legacyServiceAccountUID: String?

    enum CodingKeys: String, CodingKey {
        case iss, sub, aud, exp, nbf, iat
        case kubernetes = "kubernetes.io"
        case legacyNamespace = "kubernetes.io/serviceaccount/namespace"
        case legacyServiceAccountName = "kubernetes.io/serviceaccount/service-account.name"
        case legacyServiceAccountUID = "kubernetes.io/serviceaccount/service-account.uid"
    }

    /// A secret-based token of the kind Kubernetes minted before bound tokens: no `exp`, flat claims.
    var isLegacy: Bool { exp == nil && legacyNamespace != nil }

    func verify(using algorithm: some JWTAlgorithm) async throws {}
}
