import SDSModel
import WorkloadAuthentication

/// Which secret names the server answers, how callers present their token, and who is allowed.
public struct SDSServerConfiguration: Sendable {
    /// The name under which a workload gets its own certificate and key (Istio's `default`).
    public var workloadSecretName: String
    /// Names under which the trust bundle is served (e.g. `ROOTCA`, `spiffe://cluster.local`).
    public var validationContextNames: Set<String>
    /// gRPC metadata key carrying the raw token (Envoy's file-based call credentials).
    /// `authorization: Bearer <token>` is accepted as well.
    public var tokenHeaderKey: String
    /// Most resource names accepted in one request (a guard against garbage, not a real limit).
    public var maxResourceNamesPerRequest: Int
    /// A stream ends this long before the token it was opened with expires.
    public var tokenExpiryMargin: Duration
    /// Who may get identities, decided after authentication.
    public var authorization: AuthorizationPolicy
    /// Checks on the caller's Unix peer credentials (allowed UIDs, pod binding).
    public var peerPolicy: PeerPolicy
    /// Bounds on streams, so no caller can hold more than its share.
    public var limits: StreamLimits = .defaults
    /// Other trust domains whose bundles are served, each as `spiffe://<td>` and in ``allBundlesName``.
    public var federatedTrustDomains: Set<String> = []
    /// The name of the all-bundles validation context (Envoy's SPIFFE validator, one entry per
    /// trust domain, ours included); nil for none.
    public var allBundlesName: String? = Defaults.Names.allBundles

    public init(
        workloadSecretName: String = Defaults.Names.workloadSecret, validationContextNames: Set<String>,
        tokenHeaderKey: String = Defaults.Tokens.header, maxResourceNamesPerRequest: Int = 64,
        tokenExpiryMargin: Duration = Defaults.Tokens.expiryMargin, authorization: AuthorizationPolicy = .allowAll,
        peerPolicy: PeerPolicy = .none, limits: StreamLimits = .defaults
    ) {
        self.limits = limits
        self.peerPolicy = peerPolicy
        self.authorization = authorization
        self.tokenExpiryMargin = tokenExpiryMargin
        self.workloadSecretName = workloadSecretName
        self.validationContextNames = validationContextNames
        self.tokenHeaderKey = tokenHeaderKey.lowercased()
        self.maxResourceNamesPerRequest = maxResourceNamesPerRequest
    }

    /// The validation-context names of federated trust domains.
    package var federatedNames: [String: String] {
        Dictionary(uniqueKeysWithValues: federatedTrustDomains.map { ("spiffe://\($0)", $0) })
    }

    /// Every name this server answers, sorted, for error messages.
    package var servedNames: [String] {
        [workloadSecretName] + (validationContextNames.sorted() + federatedNames.keys.sorted() + (allBundlesName.map { [$0] } ?? []))
    }
}

/// Bounds on the streams the server holds; each answered to the offending caller only.
public struct StreamLimits: Sendable, Hashable {
    /// Most streams (StreamSecrets and DeltaSecrets together) open at once; one more gets
    /// `resource_exhausted`. About 66 KiB each (docs/BENCHMARKS.md): 2048 fit the DaemonSet's
    /// memory limit with room, and a node of 110 pods opens about 220.
    public var maxStreams: Int
    /// Most streams one caller holds at once: its pod's, where the token is bound to a pod, else
    /// its identity's. One more gets `resource_exhausted`, and no other caller notices. A pod's
    /// Envoy holds 2–3 (one per secret name); 110 pods of one service account on a node without
    /// pod-bound tokens hold about 330.
    public var maxStreamsPerCaller: Int
    /// A stream must send its first request this soon after opening, or it ends with
    /// `deadline_exceeded` (Envoy sends its first request at once).
    public var firstRequestTimeout: Duration

    /// 2048 streams, 512 per caller, 10 s to the first request.
    public static let defaults = StreamLimits(maxStreams: 2048, maxStreamsPerCaller: 512, firstRequestTimeout: .seconds(10))

    public init(maxStreams: Int, maxStreamsPerCaller: Int = 512, firstRequestTimeout: Duration) {
        self.maxStreams = maxStreams
        self.maxStreamsPerCaller = maxStreamsPerCaller
        self.firstRequestTimeout = firstRequestTimeout
    }
}
