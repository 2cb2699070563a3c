import EnvoyAPI
import Foundation
import GRPCCore
import Logging
import SDSModel
import SecretCache
import WorkloadAuthentication

/// Envoy's `envoy.service.secret.v3.SecretDiscoveryService` over the agent's cache.
///
/// Data flows one way: call metadata -> authenticate (once, when the stream opens; the verified
/// identity is bound to the stream) -> per-stream state machine -> cache -> response; and cache
/// updates -> the identity's streams -> push. A stream ends with `unavailable` shortly before the
/// token it was opened with expires, so Envoy reconnects with its re-read token file.
/// Uses the generated `ServiceProtocol` (not the simple one) because the token is call metadata.
public struct SecretDiscoveryService: Envoy_Service_Secret_V3_SecretDiscoveryService.ServiceProtocol {
    let configuration: SDSServerConfiguration
    let authenticator: any WorkloadAuthenticator
    let secrets: any SecretSource
    let logger: Logger
    let now: @Sendable () -> Date

    public init(
        configuration: SDSServerConfiguration, authenticator: any WorkloadAuthenticator, secrets: any SecretSource,
        logger: Logger, now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.configuration = configuration
        self.authenticator = authenticator
        self.secrets = secrets
        self.logger = logger
        self.now = now
    }

    // MARK: StreamSecrets (state of the world)

    public func streamSecrets(
        request: StreamingServerRequest<Envoy_Service_Discovery_V3_DiscoveryRequest>, context: ServerContext
    ) async throws -> StreamingServerResponse<Envoy_Service_Discovery_V3_DiscoveryResponse> {
        let caller = try await authenticate(request.metadata, context: context)
        let stream = SotWStream(resolver: resolver(for: caller, context: context), configuration: configuration)
        let wait = streamLifetime(for: caller)
        return StreamingServerResponse { writer in
            let events = StreamEvents.merged(request.messages, secrets.updates(for: caller.spiffeID), credentialExpiresIn: wait)
            try await stream.run(events, writer: writer)
            return [:]
        }
    }

    // MARK: DeltaSecrets (incremental)

    public func deltaSecrets(
        request: StreamingServerRequest<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest>, context: ServerContext
    ) async throws -> StreamingServerResponse<Envoy_Service_Discovery_V3_DeltaDiscoveryResponse> {
        let caller = try await authenticate(request.metadata, context: context)
        let stream = DeltaStream(resolver: resolver(for: caller, context: context), configuration: configuration)
        let wait = streamLifetime(for: caller)
        return StreamingServerResponse { writer in
            let events = StreamEvents.merged(request.messages, secrets.updates(for: caller.spiffeID), credentialExpiresIn: wait)
            try await stream.run(events, writer: writer)
            return [:]
        }
    }

    // MARK: FetchSecrets

    public func fetchSecrets(
        request: ServerRequest<Envoy_Service_Discovery_V3_DiscoveryRequest>, context: ServerContext
    ) async throws -> ServerResponse<Envoy_Service_Discovery_V3_DiscoveryResponse> {
        let caller = try await authenticate(request.metadata, context: context)
        let resolver = resolver(for: caller, context: context)
        try validate(typeURL: request.message.typeURL, names: request.message.resourceNames, resolver: resolver)
        let names = request.message.resourceNames.isEmpty ? resolver.allNames : request.message.resourceNames
        return ServerResponse(message: try await resolver.sotwResponse(for: names))
    }

    // MARK: Shared steps

    private func resolver(for caller: AuthenticatedCaller, context: ServerContext) -> ResourceResolver {
        var logger = self.logger
        logger[metadataKey: "spiffe_id"] = "\(caller.spiffeID)"
        logger[metadataKey: "method"] = "\(context.descriptor.method)"
        if let pod = caller.podName { logger[metadataKey: "pod"] = "\(caller.namespace)/\(pod)" }
        return ResourceResolver(configuration: configuration, secrets: secrets, caller: caller, logger: logger)
    }

    /// How long the stream may live: until the token's expiry minus the margin (at least a second).
    private func streamLifetime(for caller: AuthenticatedCaller) -> Duration {
        let seconds = caller.credentialExpiry.timeIntervalSince(now()) - configuration.tokenExpiryMargin.seconds
        return .milliseconds(Int64(max(1, seconds) * 1000))
    }

    /// Verifies the caller's token (failures: `unauthenticated`, with the reason, never the token),
    /// then the authorization policy (refusals: `permission_denied`).
    private func authenticate(_ metadata: Metadata, context: ServerContext) async throws -> AuthenticatedCaller {
        guard let token = CallerToken.extract(from: metadata, headerKey: configuration.tokenHeaderKey) else {
            let isProbe = metadata[stringValues: CallerToken.probeHeader].contains { _ in true }
            logger.log(
                level: isProbe ? .debug : .warning,
                "rejected SDS call: no service-account token in the call",
                metadata: [
                    "method": "\(context.descriptor.method)", "expected_header": "\(configuration.tokenHeaderKey)",
                ])
            throw RPCError(
                code: .unauthenticated,
                message: "no service-account token: send it in '\(configuration.tokenHeaderKey)' or 'authorization: Bearer'")
        }
        let caller: AuthenticatedCaller
        do {
            caller = try await authenticator.authenticate(token: token)
        } catch {
            logger.warning(
                "rejected SDS call: token failed verification",
                metadata: [
                    "method": "\(context.descriptor.method)", "reason": "\(error.code)", "detail": "\(error.message)",
                    "kid": "\(error.keyID ?? "-")", "sub": "\(error.subject ?? "-")",
                ])
            throw RPCError(code: .unauthenticated, message: "token rejected: \(error)")
        }
        if case .denied(let reason) = configuration.authorization.evaluate(caller) {
            logger.warning(
                "refused SDS call: caller not authorized by policy",
                metadata: [
                    "method": "\(context.descriptor.method)", "spiffe_id": "\(caller.spiffeID)", "reason": "\(reason)",
                    "sub": "\(caller.subject)", "kid": "\(caller.keyID ?? "-")",
                ])
            throw RPCError(code: .permissionDenied, message: "\(caller.spiffeID) is not allowed here: \(reason)")
        }
        return caller
    }
}

extension SecretDiscoveryService {
    /// Checks a request's type URL and names; the error tells Envoy's operator what is served.
    func validate(typeURL: String, names: [String], resolver: ResourceResolver) throws {
        try SecretResources.checkTypeURL(typeURL)
        try Self.validate(names: names, configuration: configuration, resolver: resolver)
    }

    static func validate(names: [String], configuration: SDSServerConfiguration, resolver: ResourceResolver) throws {
        guard names.count <= configuration.maxResourceNamesPerRequest else {
            throw RPCError(
                code: .invalidArgument,
                message: "\(names.count) resource names in one request; the limit is \(configuration.maxResourceNamesPerRequest)")
        }
        let unknown = resolver.unknown(names.filter { $0 != "*" })
        guard unknown.isEmpty else {
            throw RPCError(
                code: .notFound, message: "unknown secret name(s) \(unknown); this agent serves \(configuration.servedNames)")
        }
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
