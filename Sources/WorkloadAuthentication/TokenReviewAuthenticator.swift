import Crypto
import FoundationEssentials
import Glibc
import KubernetesAPI
import Logging
import SDSModel

/// Authenticates callers by asking the API server: a `TokenReview` (`authentication.k8s.io/v1`),
/// for clusters without OIDC discovery, or on top of local verification to catch tokens the API
/// server has revoked (a deleted pod's bound token, a deleted service account).
///
/// Needs RBAC `create` on `tokenreviews`. A positive review is cached, keyed by the token's
/// SHA-256 (the token itself is never kept), until the token expires or the cache's own limit,
/// in a bounded cache. Negative answers and errors are never cached as success; an error (network,
/// API server 5xx) is a transient failure, answered `unavailable` so Envoy retries.
public actor TokenReviewAuthenticator: WorkloadAuthenticator {
    public struct Configuration: Sendable {
        public var trustDomain: String
        /// Audiences the review asks for; the API server must confirm at least one.
        public var audiences: [String]
        /// Most cached positive reviews.
        public var cacheCapacity: Int
        /// Longest a positive review is trusted before the API server is asked again.
        public var cacheTTL: Duration
        /// Largest token sent for review, in bytes.
        public var maxTokenBytes: Int
        /// Accept legacy non-expiring tokens the API server still honours.
        public var allowLegacyTokens: Bool

        public init(
            trustDomain: String, audiences: [String], cacheCapacity: Int = 4096, cacheTTL: Duration = .seconds(300),
            maxTokenBytes: Int = 16 * 1024, allowLegacyTokens: Bool = false
        ) {
            self.trustDomain = trustDomain
            self.audiences = audiences
            self.cacheCapacity = cacheCapacity
            self.cacheTTL = cacheTTL
            self.maxTokenBytes = maxTokenBytes
            self.allowLegacyTokens = allowLegacyTokens
        }
    }

    private let configuration: Configuration
    private let api: KubernetesAPIClient
    private let now: @Sendable () -> Date
    private var cache: [SHA256Digest: (caller: AuthenticatedCaller, until: Date)] = [:]
    /// Reviews sent to the API server so far (for tests and logs).
    package private(set) var reviewsSent = 0

    public init(configuration: Configuration, api: KubernetesAPIClient, now: @escaping @Sendable () -> Date = { Date() }) {
        self.configuration = configuration
        self.api = api
        self.now = now
    }

    public func authenticate(token: String) async throws(AuthenticationError) -> AuthenticatedCaller {
        let token = token.trimmed
        guard !token.isEmpty else { throw AuthenticationError(code: .missingCredential, message: "the call carries an empty token") }
        guard token.utf8.count <= configuration.maxTokenBytes else {
            throw AuthenticationError(code: .tokenTooLarge, message: "token is \(token.utf8.count) bytes; the limit is \(configuration.maxTokenBytes)")
        }
        // Not worth a round trip: the API server would refuse it too.
        guard let header = JWTHeaderFields.decode(compactToken: token[...]), let claims = Self.unverifiedClaims(token) else {
            throw AuthenticationError(code: .malformedToken, message: "not a JWT (expected three base64url parts with JSON)")
        }
        let key = SHA256.hash(data: Data(token.utf8))
        if let hit = cache[key] {
            if now() < hit.until { return hit.caller }
            cache[key] = nil
        }
        let caller = try await review(token, claims: claims, keyID: header.kid)
        remember(caller, for: key)
        return caller
    }

    private func review(_ token: String, claims: ServiceAccountClaims, keyID: String?) async throws(AuthenticationError) -> AuthenticatedCaller {
        let sub = claims.sub
        func fail(_ code: AuthenticationError.Code, _ message: String) -> AuthenticationError {
            AuthenticationError(code: code, message: message, keyID: keyID, subject: sub)
        }
        let request = TokenReview(spec: .init(token: token, audiences: configuration.audiences))
        reviewsSent += 1
        let answer: TokenReview
        do {
            let body = try await api.post("/apis/authentication.k8s.io/v1/tokenreviews", json: try JSONEncoder().encode(request))
            answer = try JSONDecoder().decode(TokenReview.self, from: body)
        } catch let error as KubernetesAPIError where !error.isTransient {
            throw fail(.reviewUnavailable, "TokenReview refused: \(error.message) (may the agent's service account create tokenreviews?)")
        } catch {
            throw fail(.reviewUnavailable, "TokenReview failed: \(error)")
        }
        guard let status = answer.status, status.authenticated == true, let user = status.user else {
            throw fail(.reviewRejected, "the API server did not authenticate the token: \(answer.status?.error ?? "no reason given")")
        }
        let granted = status.audiences ?? []
        guard granted.contains(where: configuration.audiences.contains) else {
            throw fail(.reviewRejected, "the API server confirmed audiences \(granted), none of \(configuration.audiences)")
        }
        let parts = (user.username ?? "").split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 4, parts[0] == "system", parts[1] == "serviceaccount", !parts[2].isEmpty, !parts[3].isEmpty else {
            throw fail(.missingClaims, "the token belongs to '\(user.username ?? "")', not a service account")
        }
        let (namespace, serviceAccount) = (String(parts[2]), String(parts[3]))
        let now = self.now()
        var expiry = now.addingTimeInterval(configuration.cacheTTL.timeInterval)
        if let exp = claims.exp {
            expiry = min(expiry, Date(timeIntervalSince1970: exp))
        } else if !configuration.allowLegacyTokens {
            throw fail(.legacyToken, "a non-expiring (legacy) token is not accepted; use a projected service-account token")
        }
        guard expiry > now else { throw fail(.expired, "the token has expired") }
        let spiffeID: SPIFFEID
        do {
            spiffeID = try SPIFFEID(trustDomain: configuration.trustDomain, namespace: namespace, serviceAccount: serviceAccount)
        } catch {
            throw fail(.missingClaims, "cannot form a SPIFFE ID: \(error)")
        }
        // Bound-token details as the API server reports them (not as the token claims them).
        return AuthenticatedCaller(
            spiffeID: spiffeID, namespace: namespace, serviceAccount: serviceAccount, credentialExpiry: expiry,
            podName: user.extra?["authentication.kubernetes.io/pod-name"]?.first,
            podUID: user.extra?["authentication.kubernetes.io/pod-uid"]?.first, serviceAccountUID: user.uid,
            subject: user.username ?? "", keyID: keyID)
    }

    /// Caches a positive review; when full, drops expired entries, then those expiring first.
    private func remember(_ caller: AuthenticatedCaller, for key: SHA256Digest) {
        guard configuration.cacheCapacity > 0 else { return }
        if cache.count >= configuration.cacheCapacity {
            let now = self.now()
            cache = cache.filter { $0.value.until > now }
            while cache.count >= configuration.cacheCapacity, let first = cache.min(by: { $0.value.until < $1.value.until }) {
                cache[first.key] = nil
            }
        }
        cache[key] = (caller, caller.credentialExpiry)
    }

    /// The payload, decoded without verification: only for `exp` and `sub`, after the API server
    /// has vouched for the token (and for logs when it has not).
    private static func unverifiedClaims(_ token: String) -> ServiceAccountClaims? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let payload = Data(base64URLEncoded: parts[1]) else { return nil }
        return try? JSONDecoder().decode(ServiceAccountClaims.self, from: payload)
    }

    /// `authentication.k8s.io/v1` TokenReview, the fields we use.
    struct TokenReview: Codable {
        struct Spec: Codable {
            var token: String
            var audiences: [String]
        }
        struct Status: Codable {
            struct User: Codable {
                var username: String?
                var uid: String?
                var extra: [String: [String]]?
            }
            var authenticated: Bool?
            var user: User?
            var audiences: [String]?
            var error: String?
        }
        var apiVersion = "authentication.k8s.io/v1"
        var kind = "TokenReview"
        var spec: Spec?
        var status: Status?

        init(spec: Spec) { self.spec = spec }
    }
}
