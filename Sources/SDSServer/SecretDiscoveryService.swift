import CoreMetrics
import EnvoyAPI
import FoundationEssentials
import Glibc
import GRPCCore
import Logging
import SDSModel
import WorkloadAuthentication
import WorkloadServing

/// Envoy's `envoy.service.secret.v3.SecretDiscoveryService` over the agent's cache.
///
/// Data flows one way: call metadata -> authenticate (once, when the stream opens; the verified
/// identity is bound to the stream) -> per-stream state machine -> cache -> response; and cache
/// updates -> the identity's streams -> push. A stream ends with `unavailable` shortly before the
/// token it was opened with expires, so Envoy reconnects with its re-read token file.
/// Uses the generated `ServiceProtocol` (not the simple one) because the token is call metadata.
public struct SecretDiscoveryService: Envoy_Service_Secret_V3_SecretDiscoveryService.ServiceProtocol {
    let configuration: SDSServerConfiguration
    /// Who is calling: shared with the other services on the agent's sockets.
    public let admission: CallerAdmission
    let secrets: any SecretSource
    let logger: Logger
    let metrics: SDSMetrics
    let now: @Sendable () -> Date
    let streams: StreamSlots
    let refusalThrottle = LogThrottle(interval: .seconds(1))
    /// The authorization policy in force: starts as the configuration's, replaced by a reload.
    public var authorization: Reloadable<AuthorizationPolicy> { admission.authorization }
    /// Who holds streams open now (for `sds-agent inspect`).
    public let openStreams = OpenStreams()
    /// Other trust domains' bundles (``SDSServerConfiguration/federatedTrustDomains``).
    let federation: (any FederatedBundleSource)?

    /// Counts refused calls, by gRPC status (`code`) and `reason` (``RefusedCalls``).
    public static let refusedCallsMetric = RefusedCalls.metric
    /// Streams open now, by `api` (`sotw` or `delta`).
    public static let openStreamsMetric = "sds_agent_open_streams"
    /// NACKs received (Envoy rejected a response), by `api`.
    public static let rejectionsMetric = "sds_agent_nacks_total"

    public init(
        configuration: SDSServerConfiguration, authenticator: any WorkloadAuthenticator, secrets: any SecretSource,
        logger: Logger, metrics: any MetricsFactory = MetricsSystem.factory, now: @escaping @Sendable () -> Date = { Date() },
        readiness: @escaping @Sendable () -> String? = { nil }, federation: (any FederatedBundleSource)? = nil,
        attestor: WorkloadAttestor? = nil
    ) {
        self.federation = federation
        self.metrics = SDSMetrics(factory: metrics)
        self.admission = CallerAdmission(
            tokenHeaderKey: configuration.tokenHeaderKey, peerPolicy: configuration.peerPolicy,
            authorization: configuration.authorization, authenticator: authenticator, attestor: attestor, readiness: readiness,
            logger: logger, refusals: self.metrics.refusals)
        self.configuration = configuration
        self.secrets = secrets
        self.logger = logger
        self.now = now
        self.streams = StreamSlots(limit: configuration.limits.maxStreams, perCallerLimit: configuration.limits.maxStreamsPerCaller)
    }

    // MARK: StreamSecrets (state of the world)

    public func streamSecrets(
        request: StreamingServerRequest<Envoy_Service_Discovery_V3_DiscoveryRequest>, context: ServerContext
    ) async throws -> StreamingServerResponse<Envoy_Service_Discovery_V3_DiscoveryResponse> {
        let caller = try await escapingErrors { try await authenticate(request.metadata, context: context) }
        let stream = StreamSession<SotW>(resolver: resolver(for: caller, context: context), configuration: configuration, metrics: metrics.sotw)
        return StreamingServerResponse { writer in
            try await withStreamSlot(caller, context: context) {
                let source = events(request.messages, for: caller)
                defer { source.finish() }
                try await stream.run(FirstRequestDeadline(base: source, timeout: configuration.limits.firstRequestTimeout), writer: writer)
            }
            return [:]
        }
    }

    // MARK: DeltaSecrets (incremental)

    public func deltaSecrets(
        request: StreamingServerRequest<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest>, context: ServerContext
    ) async throws -> StreamingServerResponse<Envoy_Service_Discovery_V3_DeltaDiscoveryResponse> {
        let caller = try await escapingErrors { try await authenticate(request.metadata, context: context) }
        let stream = StreamSession<Delta>(resolver: resolver(for: caller, context: context), configuration: configuration, metrics: metrics.delta)
        return StreamingServerResponse { writer in
            try await withStreamSlot(caller, context: context) {
                let source = events(request.messages, for: caller)
                defer { source.finish() }
                try await stream.run(FirstRequestDeadline(base: source, timeout: configuration.limits.firstRequestTimeout), writer: writer)
            }
            return [:]
        }
    }

    // MARK: FetchSecrets

    public func fetchSecrets(
        request: ServerRequest<Envoy_Service_Discovery_V3_DiscoveryRequest>, context: ServerContext
    ) async throws -> ServerResponse<Envoy_Service_Discovery_V3_DiscoveryResponse> {
        try await escapingErrors {
            let caller = try await authenticate(request.metadata, context: context)
            let resolver = resolver(for: caller, context: context)
            try SecretResources.checkTypeURL(request.message.typeURL)
            _ = try RequestedNames(request.message.resourceNames, configuration: configuration)
            let names = resolver.expand(request.message.resourceNames)
            return ServerResponse(message: try await resolver.sotwResponse(for: names))
        }
    }

    // MARK: Shared steps

    /// Runs `body` (a stream) in one of the ``StreamLimits/maxStreams`` slots, freed when it ends;
    /// with none free, or the caller holding ``StreamLimits/maxStreamsPerCaller``, the stream gets
    /// `resource_exhausted`, counted and logged (throttled per caller).
    private func withStreamSlot(
        _ caller: AuthenticatedCaller, context: ServerContext, _ body: () async throws -> Void
    ) async throws {
        try await escapingErrors {
            let key = caller.podUID.map { "pod:\($0)" } ?? "id:\(caller.spiffeID)"
            if let refusal = streams.acquire(for: key) {
                let limits = configuration.limits
                let (reason, limit, words) = refusal == .agentFull
                    ? ("stream_limit", limits.maxStreams, "the agent holds its maximum of \(limits.maxStreams) open streams")
                    : ("caller_stream_limit", limits.maxStreamsPerCaller,
                        "this caller holds its maximum of \(limits.maxStreamsPerCaller) open streams (--max-streams-per-caller)")
                metrics.refusals.count(.resourceExhausted, reason: reason)
                if let held = refusalThrottle.admit(refusal == .agentFull ? reason : "\(reason) \(key)") {
                    var metadata: Logger.Metadata = [
                        "limit": .number(limit), "spiffe_id": "\(caller.spiffeID)",
                        "method": "\(context.descriptor.method)", "suppressed_since_last": .number(held),
                    ]
                    if let pod = caller.podName { metadata["pod"] = "\(caller.namespace)/\(pod)" }
                    logger.warning("refused SDS stream: \(words)", metadata: metadata)
                }
                throw RPCError(code: .resourceExhausted, message: "\(words); retry later")
            }
            defer { streams.release(for: key) }
            openStreams.opened(by: caller)
            defer { openStreams.closed(by: caller) }
            try await body()
        }
    }

    /// What a stream of `caller` reacts to: its requests, its identity's updates, its token's
    /// deadline and the first-request deadline, in one source.
    private func events<Request: Sendable>(
        _ requests: RPCAsyncSequence<Request, any Error>, for caller: AuthenticatedCaller
    ) -> StreamEventSource<Request> {
        StreamEventSource(
            requests: requests, secrets: secrets, identity: caller.spiffeID,
            firstRequestTimeout: configuration.limits.firstRequestTimeout, credentialExpiresIn: streamLifetime(for: caller))
    }

    private func resolver(for caller: AuthenticatedCaller, context: ServerContext) -> ResourceResolver {
        var logger = self.logger
        logger[metadataKey: "spiffe_id"] = "\(caller.spiffeID)"
        logger[metadataKey: "method"] = "\(context.descriptor.method)"
        if let pod = caller.podName { logger[metadataKey: "pod"] = "\(caller.namespace)/\(pod)" }
        return ResourceResolver(configuration: configuration, secrets: secrets, caller: caller, federation: federation, logger: logger)
    }

    /// How long the stream may live: until the token's expiry minus the margin (at least a second).
    private func streamLifetime(for caller: AuthenticatedCaller) -> Duration {
        let seconds = caller.credentialExpiry.timeIntervalSince(now()) - configuration.tokenExpiryMargin.timeInterval
        // Clamped: `exp` comes from the token, and no stream needs to outlive a year.
        return .milliseconds(Int64(min(max(1, seconds), 365 * 86400) * 1000))
    }

    /// The caller, through ``CallerAdmission`` (token or peer attestation, policies).
    ///
    /// The token stays with the caller only when the CA is asked on the caller's behalf: a stream
    /// holds its caller for its whole life, and the token is most of it.
    private func authenticate(_ metadata: Metadata, context: ServerContext) async throws -> AuthenticatedCaller {
        var caller = try await admission.admit(metadata, method: context.descriptor.method)
        if !secrets.usesCallerCredential { caller.credential = nil }
        return caller
    }
}
