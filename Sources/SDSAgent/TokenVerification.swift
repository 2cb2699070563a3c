import FoundationEssentials
import Glibc
import KubernetesAPI
import Logging
import SDSModel
import WorkloadAuthentication

/// How callers' service-account tokens are verified: shared by `serve` (the SDS side) and
/// `ca serve` (the CSR API), which authenticate callers the same way.
package struct TokenVerification: Sendable {
    /// SPIFFE trust domain the identities belong to.
    package var trustDomain: String
    /// JWKS file with the keys that sign tokens; nil with OIDC discovery or TokenReview only.
    package var jwksFile: String?
    /// Fetch the keys from the API server's OIDC discovery.
    package var oidcDiscovery = false
    /// How often discovered keys are fetched again.
    package var jwksRefreshInterval: Duration = .seconds(3600)
    /// Have the API server review every token.
    package var tokenReview = false
    /// How to reach the API server.
    package var kubernetesAPI: KubernetesAPIClient.Configuration?
    /// Accepted issuers.
    package var issuers: [String]
    /// Accepted audiences.
    package var audiences: [String]
    /// Tolerated clock skew.
    package var clockSkew: Duration
    /// Accept legacy non-expiring secret-based tokens.
    package var allowLegacyTokens = false
    /// Refuse tokens issued longer ago than this.
    package var maxTokenAge: Duration?

    package init(trustDomain: String, jwksFile: String?, issuers: [String], audiences: [String], clockSkew: Duration) {
        self.trustDomain = trustDomain
        self.jwksFile = jwksFile
        self.issuers = issuers
        self.audiences = audiences
        self.clockSkew = clockSkew
    }

    /// The largest `--clock-skew` accepted (Kubernetes' own token leeway is 60 s).
    package static let maxClockSkew: Duration = .seconds(600)

    /// Checks the settings; the error names the flag.
    package func validate() throws(ConfigurationError) {
        func fail(_ code: ConfigurationError.Code, _ message: String) -> ConfigurationError {
            ConfigurationError(code, message: message)
        }
        guard SPIFFEID.isValidTrustDomain(trustDomain) else {
            throw fail(.invalidValue, "--trust-domain '\(trustDomain)' is not a valid trust domain (lowercase letters, digits, '.', '-', '_')")
        }
        guard !issuers.isEmpty else { throw fail(.missingSetting, "at least one --issuer is required") }
        if issuers.contains(where: { $0.trimmed.isEmpty }) {
            throw fail(.invalidValue, "--issuer must not be empty (an empty ConfigMap key gives an empty value): every token would be refused")
        }
        guard jwksFile != nil || oidcDiscovery || tokenReview else {
            throw fail(.missingSetting, "tokens need a verifier: --jwks FILE, --oidc-discovery or --token-review")
        }
        guard !(jwksFile != nil && oidcDiscovery) else {
            throw fail(.conflictingSettings, "--jwks and --oidc-discovery both name the verification keys; use one")
        }
        if oidcDiscovery || tokenReview {
            guard let api = kubernetesAPI, api.serverURL.hasPrefix("https://") else {
                throw fail(.missingSetting, "--oidc-discovery and --token-review need the API server: --kube-api-server https://… (in a pod, KUBERNETES_SERVICE_HOST sets it)")
            }
        }
        guard !audiences.isEmpty else { throw fail(.missingSetting, "at least one --audience is required") }
        if audiences.contains(where: { $0.trimmed.isEmpty }) {
            throw fail(.invalidValue, "--audience must not be empty (an empty ConfigMap key gives an empty value): every token would be refused")
        }
        if let maxTokenAge, maxTokenAge <= .zero { throw fail(.invalidValue, "--max-token-age must be positive") }
        // A token expired a year ago must not pass: the tolerance is for clocks, not calendars.
        guard clockSkew >= .zero, clockSkew <= Self.maxClockSkew else {
            throw fail(.invalidValue, "--clock-skew must be between 0s and \(DurationText.format(Self.maxClockSkew))")
        }
    }

    /// The token verifiers the configuration asks for, cheapest first: local keys (a JWKS file or
    /// OIDC discovery), then the API server's TokenReview; all of them must accept a token.
    func makeAuthenticator(logger: Logger, now: @escaping @Sendable () -> Date, needsAPI: Bool = false)
        async throws -> Verifiers
    {
        let configuration = self
        var fileKeys: JWKSFileKeySource?
        if let jwksFile = configuration.jwksFile {
            let loaded = try await JWKSFileKeySource(path: jwksFile)
            logger.info("JWKS loaded", metadata: ["jwks": "\(jwksFile)", "key_ids": .list(loaded.keyIDs.sorted())])
            fileKeys = loaded
        }
        // The HTTPS client is created last: once it exists, nothing here throws.
        var api: KubernetesAPIClient?
        if let apiConfiguration = configuration.kubernetesAPI, configuration.oidcDiscovery || configuration.tokenReview || needsAPI {
            api = try KubernetesAPIClient(configuration: apiConfiguration)
        }
        var authenticators: [any WorkloadAuthenticator] = []
        var keySource: OIDCDiscoveryKeySource?
        let keys: (any VerificationKeySource)?
        if let fileKeys {
            keys = fileKeys
        } else if configuration.oidcDiscovery, let api {
            keySource = OIDCDiscoveryKeySource(api: api, refreshInterval: configuration.jwksRefreshInterval, logger: logger)
            keys = keySource
        } else {
            keys = nil
        }
        if let keys {
            authenticators.append(
                KubernetesTokenVerifier(
                    configuration: .init(
                        trustDomain: configuration.trustDomain, issuers: configuration.issuers,
                        audiences: configuration.audiences, clockSkew: configuration.clockSkew,
                        allowLegacyTokens: configuration.allowLegacyTokens, maxTokenAge: configuration.maxTokenAge),
                    keys: keys, now: now))
        }
        if configuration.tokenReview, let api {
            authenticators.append(
                TokenReviewAuthenticator(
                    configuration: .init(
                        trustDomain: configuration.trustDomain, audiences: configuration.audiences,
                        allowLegacyTokens: configuration.allowLegacyTokens),
                    api: api, now: now))
        }
        let authenticator = authenticators.count == 1 ? authenticators[0] : CombinedAuthenticator(authenticators)
        return Verifiers(authenticator: authenticator, keySource: keySource, fileKeys: fileKeys, api: api)
    }

    /// What ``makeAuthenticator(logger:now:needsAPI:)`` built.
    struct Verifiers {
        var authenticator: any WorkloadAuthenticator
        /// Keys from OIDC discovery (run it; readiness waits for its first keys).
        var keySource: OIDCDiscoveryKeySource?
        /// Keys from a JWKS file (reloaded on SIGHUP).
        var fileKeys: JWKSFileKeySource?
        /// The API server client, to shut down.
        var api: KubernetesAPIClient?
    }
}
