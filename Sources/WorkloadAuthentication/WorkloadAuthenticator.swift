import SDSModel

/// Proves who is calling: turns the credential a caller presented into an ``AuthenticatedCaller``.
///
/// The SDS server depends only on this protocol, so JWKS verification, TokenReview or peer checks
/// can be combined or replaced without touching the protocol code.
public protocol WorkloadAuthenticator: Sendable {
    /// Verifies `token` and returns the caller it proves, or throws an ``AuthenticationError``.
    func authenticate(token: String) async throws(AuthenticationError) -> AuthenticatedCaller
}

/// Why a caller could not be authenticated. Carries what a human needs, never the token.
public struct AuthenticationError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The kind of failure; stable, suitable as a metric label.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Wrapped: String, Hashable, Sendable {
            case missingCredential = "missing_credential"
            case malformedToken = "malformed_token"
            case tokenTooLarge = "token_too_large"
            case disallowedAlgorithm = "disallowed_algorithm"
            case unknownKey = "unknown_key"
            case badSignature = "bad_signature"
            case expired
            case notYetValid = "not_yet_valid"
            case wrongIssuer = "wrong_issuer"
            case wrongAudience = "wrong_audience"
            case missingClaims = "missing_claims"
            case legacyToken = "legacy_token"
            case tooOld = "token_too_old"
            case keysUnavailable = "keys_unavailable"
            case reviewRejected = "token_review_rejected"
            case reviewUnavailable = "token_review_unavailable"
        }
        private var wrapped: Wrapped
        private init(_ wrapped: Wrapped) { self.wrapped = wrapped }

        /// No token in the call's metadata.
        public static let missingCredential = Code(.missingCredential)
        /// Not three base64url parts, or a header/payload that is not JSON.
        public static let malformedToken = Code(.malformedToken)
        /// Larger than the configured limit.
        public static let tokenTooLarge = Code(.tokenTooLarge)
        /// `alg` is `none`, HMAC, or otherwise not allowed.
        public static let disallowedAlgorithm = Code(.disallowedAlgorithm)
        /// The `kid` names no key in the key set.
        public static let unknownKey = Code(.unknownKey)
        /// The signature does not verify.
        public static let badSignature = Code(.badSignature)
        /// `exp` is in the past (beyond the allowed clock skew), or missing.
        public static let expired = Code(.expired)
        /// `nbf` or `iat` is in the future (beyond the allowed clock skew).
        public static let notYetValid = Code(.notYetValid)
        /// `iss` is not an accepted issuer.
        public static let wrongIssuer = Code(.wrongIssuer)
        /// No `aud` value is an accepted audience.
        public static let wrongAudience = Code(.wrongAudience)
        /// No usable namespace/service account in the `kubernetes.io` claim or `sub`.
        public static let missingClaims = Code(.missingClaims)
        /// A non-expiring secret-based token, and legacy tokens are not allowed.
        public static let legacyToken = Code(.legacyToken)
        /// Issued longer ago than the configured maximum token age (or with no `iat` when one is set).
        public static let tooOld = Code(.tooOld)
        /// No verification keys could be loaded yet (transient: OIDC discovery keeps trying).
        public static let keysUnavailable = Code(.keysUnavailable)
        /// The API server's TokenReview says the token is not valid (or not for our audience).
        public static let reviewRejected = Code(.reviewRejected)
        /// The TokenReview could not be done (transient: network, API server error).
        public static let reviewUnavailable = Code(.reviewUnavailable)

        /// Whether the failure is ours, not the caller's, and a retry may succeed: the SDS
        /// server answers these with `unavailable`, which Envoy retries, not `unauthenticated`.
        public var isTransient: Bool { self == .keysUnavailable || self == .reviewUnavailable }

        public var description: String { wrapped.rawValue }
    }

    /// The kind of failure.
    public var code: Code
    /// What went wrong, in words.
    public var message: String
    /// The token's `kid`, if it could be read.
    public var keyID: String?
    /// The token's `sub`, if it could be read.
    public var subject: String?

    public init(code: Code, message: String, keyID: String? = nil, subject: String? = nil) {
        self.code = code
        self.message = message
        self.keyID = keyID
        self.subject = subject
    }

    public var description: String { "\(code): \(message)" }
}
