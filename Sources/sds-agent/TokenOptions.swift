import ArgumentParser
import KubernetesAPI
import SDSAgent
import SDSModel

/// How callers' tokens are verified: the same flags for `serve` (the SDS side) and `ca serve`
/// (the CSR API), which authenticate callers the same way.
struct TokenOptions: ParsableArguments {
    @Option(help: "JWKS file with the public keys that sign service-account tokens (reloaded on SIGHUP).")
    var jwks: String?

    @Flag(help: "Fetch the token signing keys from the API server's OIDC discovery (instead of --jwks), refreshed on schedule and on an unknown key ID.")
    var oidcDiscovery = false

    @Option(help: ArgumentHelp("How often --oidc-discovery fetches the keys again, e.g. 1h.", valueName: "duration"))
    var jwksRefreshInterval: Duration = .seconds(3600)

    @Flag(help: "Have the API server review every token (TokenReview; needs RBAC 'create tokenreviews'), after any local verification.")
    var tokenReview = false

    @Option(help: "API server URL for --oidc-discovery, --token-review and pod lookups (default: from KUBERNETES_SERVICE_HOST/PORT).")
    var kubeApiServer: String?

    @Option(help: "CA bundle that signs the API server's certificate.")
    var kubeCaFile = KubernetesAPIClient.Configuration.serviceAccountDirectory + "/ca.crt"

    @Option(help: "This process's own service-account token, sent to the API server (re-read per request).")
    var kubeTokenFile = KubernetesAPIClient.Configuration.serviceAccountDirectory + "/token"

    @Option(help: "Accepted token issuer (repeatable; default https://kubernetes.default.svc.cluster.local).")
    var issuer: [String] = []

    @Option(help: "Accepted token audience (repeatable; default sds-agent for serve, istio-ca for ca serve).")
    var audience: [String] = []

    @Option(help: ArgumentHelp("Tolerated clock skew for token exp/nbf/iat, e.g. 30s.", valueName: "duration"))
    var clockSkew: Duration = Defaults.Tokens.clockSkew

    @Flag(help: "Accept legacy non-expiring secret-based service-account tokens (not recommended).")
    var allowLegacyTokens = false

    @Option(help: ArgumentHelp("Refuse tokens issued longer ago than this, e.g. 24h; no limit unless given.", valueName: "duration"))
    var maxTokenAge: Duration?

    /// The verification settings for `trustDomain`, with `defaultAudience` when none is given.
    func verification(trustDomain: String, defaultAudience: String, tlsPolicy: TLSPolicy) -> TokenVerification {
        var tokens = TokenVerification(
            trustDomain: trustDomain, jwksFile: jwks,
            issuers: issuer.isEmpty ? ["https://kubernetes.default.svc.cluster.local"] : issuer,
            audiences: audience.isEmpty ? [defaultAudience] : audience, clockSkew: clockSkew)
        tokens.oidcDiscovery = oidcDiscovery
        tokens.jwksRefreshInterval = jwksRefreshInterval
        tokens.tokenReview = tokenReview
        tokens.allowLegacyTokens = allowLegacyTokens
        tokens.maxTokenAge = maxTokenAge
        if let server = kubeApiServer ?? KubernetesAPIClient.Configuration.inClusterServerURL() {
            tokens.kubernetesAPI = .init(serverURL: server, caFile: kubeCaFile, tokenFile: kubeTokenFile)
            tokens.kubernetesAPI?.tlsPolicy = tlsPolicy
        }
        return tokens
    }
}
