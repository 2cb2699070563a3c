import Foundation
import KubernetesAPI
import Logging
import SDSModel
import WorkloadAuthentication

/// How callers' service-account tokens are verified: shared by `serve` (the SDS side) and
/// `ca serve` (the CSR API), which authenticate callers the same way.
public struct TokenVerification: Sendable {
    /// SPIFFE trust domain the identities belong to.
    public var trustDomain: String
    /// JWKS file with the keys that sign tokens; nil with OIDC discovery or TokenReview only.
    public var jwksFile: String?
    /// Fetch the keys from the API server's OIDC discovery.
    public var oidcDiscovery = false
    /// How often discovered keys are fetched again.
    public var jwksRefreshInterval: Duration = .seconds(3600)
    /// Have the API server review every token.
    public var tokenReview = false
    /// How to reach the API server.
    public var kubernetesAPI: KubernetesAPIClient.Configuration?
    /// Accepted issuers.
    public var issuers: [String]
    /// Accepted audiences.
    public var audiences: [String]
    /// Tolerated clock skew.
    public var clockSkew: Duration
    /// Accept legacy non-expiring secret-based tokens.
    public var allowLegacyTokens = false
    /// Refuse tokens issued longer ago than this.
    public var maxTokenAge: Duration?

    public init(trustDomain: String, jwksFile: String?, issuers: [String], audiences: [String], clockSkew: Duration) {
        self.trustDomain = trustDomain
        self.jwksFile = jwksFile
        self.issuers = issuers
        self.audiences = audiences
        self.clockSkew = clockSkew
    }

    /// Checks the settings; the error names the flag.
    public func validate() throws(ConfigurationError) {
        func fail(_ message: String) -> ConfigurationError { ConfigurationError(message: message) }
        guard SPIFFEID.isValidTrustDomain(trustDomain) else {
            throw fail("--trust-domain '\(trustDomain)' is not a valid trust domain (lowercase letters, digits, '.', '-', '_')")
        }
        guard !issuers.isEmpty else { throw fail("at least one --issuer is required") }
        guard jwksFile != nil || oidcDiscovery || tokenReview else {
            throw fail("tokens need a verifier: --jwks FILE, --oidc-discovery or --token-review")
        }
        guard !(jwksFile != nil && oidcDiscovery) else {
            throw fail("--jwks and --oidc-discovery both name the verification keys; use one")
        }
        if oidcDiscovery || tokenReview {
            guard let api = kubernetesAPI, api.serverURL.hasPrefix("https://") else {
                throw fail("--oidc-discovery and --token-review need the API server: --kube-api-server https://… (in a pod, KUBERNETES_SERVICE_HOST sets it)")
            }
        }
        guard !audiences.isEmpty else { throw fail("at least one --audience is required") }
        if let maxTokenAge, maxTokenAge <= .zero { throw fail("--max-token-age must be positive") }
    }

/// The token verifiers the configuration asks for, cheapest first: local keys (a JWKS file or
/// OIDC discovery), then the API server's TokenReview; all of them must accept a token.
func makeAuthenticator(logger: Logger, now: @escaping @Sendable () -> Date, needsAPI: Bool = false)
    async throws -> (any WorkloadAuthenticator, OIDCDiscoveryKeySource?, KubernetesAPIClient?)
{
    let configuration = self
    var fileKeys: VerificationKeySet?
    if let jwksFile = configuration.jwksFile {
        fileKeys = try await VerificationKeySet(jwksFile: jwksFile)
        logger.info("JWKS loaded", metadata: ["jwks": "\(jwksFile)", "key_ids": "\(fileKeys!.keyIDs.sorted())"])
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
    return (authenticator, keySource, api)
}

}
