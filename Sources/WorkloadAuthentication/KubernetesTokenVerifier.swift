import FoundationEssentials
import Glibc
import JWTKit
import SDSModel

/// Verifies Kubernetes service-account JWTs locally against a JWKS, and maps them to SPIFFE IDs.
///
/// Checks, in order: size, `alg` against an allow-list (never `none` or HMAC), `kid` present in
/// the key set, signature, then `iss`, `aud`, `exp`, `nbf`/`iat` with a configurable clock skew
/// (jwt-kit has none, so these are done here after the signature is verified), and finally
/// namespace and service account from the `kubernetes.io` claim, falling back to the
/// `system:serviceaccount:<ns>:<sa>` form of `sub`. Tokens without `exp` are rejected, except
/// legacy secret-based tokens when ``Configuration/allowLegacyTokens`` is set: those carry no
/// `exp` and no `aud`, and are re-verified every ``Configuration/legacyReauthenticationInterval``
/// (a stream bound to one ends then, and Envoy reconnects with the token again).
public struct KubernetesTokenVerifier: WorkloadAuthenticator {
    /// What the verifier accepts.
    public struct Configuration: Sendable {
        /// The SPIFFE trust domain identities are minted in.
        public var trustDomain: String
        /// Accepted `iss` values; at least one.
        public var issuers: [String]
        /// Accepted audiences; a token must name at least one of them in `aud`.
        public var audiences: [String]
        /// Tolerated clock difference for `exp`, `nbf` and `iat`.
        public var clockSkew: Duration
        /// Largest token accepted, in bytes.
        public var maxTokenBytes: Int
        /// Signature algorithms accepted in the token header.
        public var allowedAlgorithms: Set<String>
        /// Accept legacy secret-based tokens (no `exp`, no `aud`). Off by default: such a token
        /// never expires, so a leaked one is good until its Secret is deleted.
        public var allowLegacyTokens: Bool
        /// Refuse tokens issued (`iat`) longer ago than this; nil for no limit.
        public var maxTokenAge: Duration?
        /// How long an accepted legacy token counts as valid before it is verified again.
        public var legacyReauthenticationInterval: Duration

        /// Asymmetric algorithms a Kubernetes API server can sign with.
        public static let defaultAlgorithms: Set<String> = [
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
        ]

        public init(
            trustDomain: String, issuers: [String], audiences: [String], clockSkew: Duration = Defaults.Tokens.clockSkew,
            maxTokenBytes: Int = 16 * 1024, allowedAlgorithms: Set<String> = Self.defaultAlgorithms,
            allowLegacyTokens: Bool = false, maxTokenAge: Duration? = nil,
            legacyReauthenticationInterval: Duration = .seconds(3600)
        ) {
            self.allowLegacyTokens = allowLegacyTokens
            self.maxTokenAge = maxTokenAge
            self.legacyReauthenticationInterval = legacyReauthenticationInterval
            self.trustDomain = trustDomain
            self.issuers = issuers
            self.audiences = audiences
            self.clockSkew = clockSkew
            self.maxTokenBytes = maxTokenBytes
            self.allowedAlgorithms = allowedAlgorithms
        }
    }

    private let configuration: Configuration
    private let keys: any VerificationKeySource
    private let now: @Sendable () -> Date
    private let verified = VerifiedTokenCache()

    /// Tokens held verified (for tests and diagnostics).
    package var cachedTokens: Int { verified.count }

    /// Creates a verifier; `now` is injectable for tests.
    public init(
        configuration: Configuration, keys: any VerificationKeySource, now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.configuration = configuration
        self.keys = keys
        self.now = now
    }

    public func authenticate(token: String) async throws(AuthenticationError) -> AuthenticatedCaller {
        let token = token.trimmed
        guard !token.isEmpty else {
            throw AuthenticationError(code: .missingCredential, message: "the call carries an empty token")
        }
        guard token.utf8.count <= configuration.maxTokenBytes else {
            throw AuthenticationError(
                code: .tokenTooLarge,
                message: "token is \(token.utf8.count) bytes; the limit is \(configuration.maxTokenBytes)")
        }
        // Verified before, under a key still in the set: the claims are checked again (time,
        // issuer, audience, age); the header (checked when it was verified) and the signature are not.
        let cacheKey = VerifiedTokenCache.key(for: token)
        if let hit = verified.entry(for: cacheKey, now: now()), let keySet = await keys.currentKeys(),
            keySet.keyIDs.contains(hit.keyID)
        {
            return try check(hit.claims, keyID: hit.keyID)
        }
        let (kid, keySet) = try await key(for: token)
        let claims: ServiceAccountClaims
        do {
            claims = try await keySet.collection.verify(token, as: ServiceAccountClaims.self)
        } catch let error as JWTError where error.errorType == .malformedToken {
            throw AuthenticationError(code: .malformedToken, message: "token payload is not valid JSON claims", keyID: kid)
        } catch is DecodingError {
            throw AuthenticationError(code: .malformedToken, message: "token claims have unexpected types", keyID: kid)
        } catch {
            throw AuthenticationError(code: .badSignature, message: "signature does not verify with key '\(kid)'", keyID: kid)
        }
        let caller = try check(claims, keyID: kid)
        // Only a token that passed every check is kept, until it expires (plus the skew).
        verified.insert(
            .init(claims: claims, keyID: kid, validUntil: caller.credentialExpiry.addingTimeInterval(configuration.clockSkew.timeInterval)),
            for: cacheKey, now: now())
        return caller
    }

    /// The token's key ID and a key set holding it (fetched again once for an unknown ID), after
    /// the header's algorithm is checked against the allow-list: no signature work before that.
    private func key(for token: String) async throws(AuthenticationError) -> (String, VerificationKeySet) {
        guard let header = JWTHeaderFields.decode(compactToken: token[...]) else {
            throw AuthenticationError(
                code: .malformedToken, message: "not a JWT (expected three base64url parts with a JSON header)")
        }
        let kid = header.kid
        guard let alg = header.alg, configuration.allowedAlgorithms.contains(alg) else {
            throw AuthenticationError(
                code: .disallowedAlgorithm,
                message: "algorithm '\(header.alg ?? "<none>")' is not allowed; allowed: \(configuration.allowedAlgorithms.sorted().joined(separator: ","))",
                keyID: kid)
        }
        guard let kid else {
            throw AuthenticationError(code: .unknownKey, message: "the token header names no key ID ('kid')")
        }
        guard var keySet = await keys.currentKeys() else {
            throw AuthenticationError(
                code: .keysUnavailable, message: "no verification keys are loaded yet (OIDC discovery has not succeeded)",
                keyID: kid)
        }
        if !keySet.keyIDs.contains(kid) {
            keySet = await keys.keys(afterUnknownKeyID: kid) ?? keySet
        }
        guard keySet.keyIDs.contains(kid) else {
            throw AuthenticationError(
                code: .unknownKey, message: "key ID '\(kid)' is not in the verification key set", keyID: kid)
        }
        return (kid, keySet)
    }

    private func check(_ claims: ServiceAccountClaims, keyID: String) throws(AuthenticationError) -> AuthenticatedCaller {
        let sub = claims.sub
        func fail(_ code: AuthenticationError.Code, _ message: String) -> AuthenticationError {
            AuthenticationError(code: code, message: message, keyID: keyID, subject: sub)
        }
        if claims.isLegacy, !configuration.allowLegacyTokens {
            throw fail(.legacyToken, "a non-expiring secret-based (legacy) token is not accepted; use a projected service-account token, or allow legacy tokens explicitly")
        }
        guard let iss = claims.iss, configuration.issuers.contains(iss) else {
            throw fail(.wrongIssuer, "issuer '\(claims.iss ?? "<none>")' is not accepted; accepted: \(configuration.issuers.joined(separator: ","))")
        }
        let now = self.now().timeIntervalSince1970
        let skew = configuration.clockSkew.timeInterval
        let expiry: Double
        if claims.isLegacy {
            // Legacy tokens have neither `aud` nor `exp`: re-verify them periodically instead.
            expiry = now + configuration.legacyReauthenticationInterval.timeInterval
        } else {
            let audiences = claims.aud?.value ?? []
            guard audiences.contains(where: configuration.audiences.contains) else {
                throw fail(.wrongAudience, "audience \(audiences) names none of \(configuration.audiences)")
            }
            guard let exp = claims.exp else {
                throw fail(.expired, "token has no 'exp': non-expiring tokens are not accepted")
            }
            guard now < exp + skew else {
                throw fail(.expired, "token expired at \(Self.format(exp)) (now \(Self.format(now)), skew \(Int(skew))s)")
            }
            expiry = exp
        }
        if let nbf = claims.nbf, now + skew < nbf {
            throw fail(.notYetValid, "token not valid before \(Self.format(nbf)) (now \(Self.format(now)))")
        }
        if let iat = claims.iat, now + skew < iat {
            throw fail(.notYetValid, "token issued in the future at \(Self.format(iat)) (now \(Self.format(now)))")
        }
        if let maxAge = configuration.maxTokenAge {
            guard let iat = claims.iat else {
                throw fail(.tooOld, "token has no 'iat', so its age cannot be checked against the maximum of \(maxAge)")
            }
            guard now - iat <= maxAge.timeInterval + skew else {
                throw fail(.tooOld, "token was issued at \(Self.format(iat)), longer ago than the maximum age of \(Int(maxAge.timeInterval))s")
            }
        }

        let (namespace, serviceAccount) = try serviceAccount(of: claims, fail: fail)
        let spiffeID: SPIFFEID
        do {
            spiffeID = try SPIFFEID(
                trustDomain: configuration.trustDomain, namespace: namespace, serviceAccount: serviceAccount)
        } catch {
            throw fail(.missingClaims, "cannot form a SPIFFE ID: \(error)")
        }
        return AuthenticatedCaller(
            spiffeID: spiffeID, namespace: namespace, serviceAccount: serviceAccount,
            credentialExpiry: Date(timeIntervalSince1970: expiry), podName: claims.kubernetes?.pod?.name,
            podUID: claims.kubernetes?.pod?.uid,
            serviceAccountUID: claims.kubernetes?.serviceaccount?.uid ?? claims.legacyServiceAccountUID,
            subject: sub ?? "", keyID: keyID)
    }

    /// Namespace and service account from `kubernetes.io`, else from `sub`; both must agree when both exist.
    private func serviceAccount(
        of claims: ServiceAccountClaims, fail: (AuthenticationError.Code, String) -> AuthenticationError
    ) throws(AuthenticationError) -> (String, String) {
        var fromSub: (String, String)?
        if let sub = claims.sub {
            let parts = sub.split(separator: ":", omittingEmptySubsequences: false)
            if parts.count == 4, parts[0] == "system", parts[1] == "serviceaccount", !parts[2].isEmpty, !parts[3].isEmpty {
                fromSub = (String(parts[2]), String(parts[3]))
            }
        }
        if claims.isLegacy, let namespace = claims.legacyNamespace, let name = claims.legacyServiceAccountName {
            fromSub = fromSub ?? (namespace, name)
            guard fromSub! == (namespace, name) else {
                throw fail(.missingClaims, "'sub' and the legacy claims name different service accounts")
            }
            return (namespace, name)
        }
        if let k8s = claims.kubernetes {
            guard let namespace = k8s.namespace, let name = k8s.serviceaccount?.name else {
                throw fail(.missingClaims, "'kubernetes.io' claim lacks namespace or serviceaccount.name")
            }
            if let fromSub, fromSub != (namespace, name) {
                throw fail(.missingClaims, "'sub' names \(fromSub.0)/\(fromSub.1) but 'kubernetes.io' names \(namespace)/\(name)")
            }
            return (namespace, name)
        }
        guard let fromSub else {
            throw fail(.missingClaims, "no 'kubernetes.io' claim and 'sub' is not system:serviceaccount:<ns>:<sa>")
        }
        return fromSub
    }

    private static func format(_ seconds: Double) -> String {
        Date(timeIntervalSince1970: seconds).formatted(.iso8601)
    }
}
