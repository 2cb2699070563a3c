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
/// identity is bound to the stream) -> per-stream SotW state machine -> cache -> response.
/// Uses the generated `ServiceProtocol` (not the simple one) because the token is call metadata.
public struct SecretDiscoveryService: Envoy_Service_Secret_V3_SecretDiscoveryService.ServiceProtocol {
    private let configuration: SDSServerConfiguration
    private let authenticator: any WorkloadAuthenticator
    private let secrets: any SecretSource
    private let logger: Logger

    public init(
        configuration: SDSServerConfiguration, authenticator: any WorkloadAuthenticator, secrets: any SecretSource,
        logger: Logger
    ) {
        self.configuration = configuration
        self.authenticator = authenticator
        self.secrets = secrets
        self.logger = logger
    }

    // MARK: StreamSecrets (state of the world)

    public func streamSecrets(
        request: StreamingServerRequest<Envoy_Service_Discovery_V3_DiscoveryRequest>, context: ServerContext
    ) async throws -> StreamingServerResponse<Envoy_Service_Discovery_V3_DiscoveryResponse> {
        let caller = try await authenticate(request.metadata, context: context)
        var logger = self.logger
        logger[metadataKey: "peer"] = "\(context.remotePeer)"
        logger[metadataKey: "spiffe_id"] = "\(caller.spiffeID)"
        let streamLogger = logger

        return StreamingServerResponse { writer in
            var machine = StreamStateMachine()
            var node: NodeSummary?
            let opened = ContinuousClock.now
            do {
                for try await message in request.messages {
                    if node == nil, message.hasNode { node = NodeSummary(message.node) }
                    try validate(message)
                    let action = machine.receive(
                        .init(
                            versionInfo: message.versionInfo, resourceNames: message.resourceNames,
                            responseNonce: message.responseNonce,
                            errorMessage: message.hasErrorDetail ? message.errorDetail.message : nil))
                    switch action {
                    case .respond(let names, let nonce):
                        var response = try await makeResponse(for: names, caller: caller, logger: streamLogger)
                        response.nonce = nonce
                        try await writer.write(response)
                        streamLogger.debug(
                            "sent secrets",
                            metadata: ["names": "\(names)", "version": "\(response.versionInfo)", "nonce": "\(nonce)"])
                    case .acknowledged(let version):
                        streamLogger.debug("Envoy accepted secrets", metadata: ["version": "\(version)"])
                    case .rejected(let nonce, let message):
                        streamLogger.warning(
                            "Envoy rejected secrets (NACK); keeping them unsent until they change",
                            metadata: [
                                "names": "\(machine.subscribed)", "nonce": "\(nonce)", "envoy_error": "\(message)",
                                "node": "\(node?.description ?? "?")",
                            ])
                    case .stale(let nonce):
                        streamLogger.debug("ignored a request for an older response", metadata: ["nonce": "\(nonce)"])
                    }
                }
            } catch {
                streamLogger.info(
                    "SDS stream ended",
                    metadata: Self.endMetadata(node: node, names: machine.subscribed, since: opened, reason: "\(error)"))
                throw error
            }
            streamLogger.info(
                "SDS stream ended",
                metadata: Self.endMetadata(node: node, names: machine.subscribed, since: opened, reason: "Envoy closed it"))
            return [:]
        }
    }

    // MARK: FetchSecrets

    public func fetchSecrets(
        request: ServerRequest<Envoy_Service_Discovery_V3_DiscoveryRequest>, context: ServerContext
    ) async throws -> ServerResponse<Envoy_Service_Discovery_V3_DiscoveryResponse> {
        let caller = try await authenticate(request.metadata, context: context)
        try validate(request.message)
        let response = try await makeResponse(for: request.message.resourceNames, caller: caller, logger: logger)
        return ServerResponse(message: response)
    }

    // MARK: DeltaSecrets

    public func deltaSecrets(
        request: StreamingServerRequest<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest>, context: ServerContext
    ) async throws -> StreamingServerResponse<Envoy_Service_Discovery_V3_DeltaDiscoveryResponse> {
        logger.warning(
            "an Envoy asked for DeltaSecrets, which this agent does not serve yet; use api_type: GRPC",
            metadata: ["peer": "\(context.remotePeer)"])
        throw RPCError(code: .unimplemented, message: "DeltaSecrets is not implemented; configure api_type: GRPC")
    }

    // MARK: Shared steps

    /// Verifies the caller's token; every failure is `unauthenticated` with the reason, never the token.
    private func authenticate(_ metadata: Metadata, context: ServerContext) async throws -> AuthenticatedCaller {
        guard let token = CallerToken.extract(from: metadata, headerKey: configuration.tokenHeaderKey) else {
            let isProbe = metadata[stringValues: CallerToken.probeHeader].contains { _ in true }
            logger.log(
                level: isProbe ? .debug : .warning,
                "rejected SDS call: no service-account token in the call",
                metadata: [
                    "peer": "\(context.remotePeer)", "method": "\(context.descriptor.method)",
                    "expected_header": "\(configuration.tokenHeaderKey)",
                ])
            throw RPCError(
                code: .unauthenticated,
                message: "no service-account token: send it in '\(configuration.tokenHeaderKey)' or 'authorization: Bearer'")
        }
        do {
            return try await authenticator.authenticate(token: token)
        } catch {
            logger.warning(
                "rejected SDS call: token failed verification",
                metadata: [
                    "peer": "\(context.remotePeer)", "method": "\(context.descriptor.method)", "reason": "\(error.code)",
                    "detail": "\(error.message)", "kid": "\(error.keyID ?? "-")", "sub": "\(error.subject ?? "-")",
                ])
            throw RPCError(code: .unauthenticated, message: "token rejected: \(error)")
        }
    }

    private func validate(_ request: Envoy_Service_Discovery_V3_DiscoveryRequest) throws {
        guard request.typeURL.isEmpty || request.typeURL == SecretResources.typeURL else {
            throw RPCError(
                code: .invalidArgument, message: "type_url '\(request.typeURL)' is not \(SecretResources.typeURL)")
        }
        guard request.resourceNames.count <= configuration.maxResourceNamesPerRequest else {
            throw RPCError(
                code: .invalidArgument,
                message: "\(request.resourceNames.count) resource names in one request; the limit is \(configuration.maxResourceNamesPerRequest)")
        }
        let unknown = request.resourceNames.filter {
            $0 != configuration.workloadSecretName && !configuration.validationContextNames.contains($0)
        }
        guard unknown.isEmpty else {
            throw RPCError(
                code: .notFound,
                message: "unknown secret name(s) \(unknown); this agent serves \(configuration.servedNames)")
        }
    }

    /// The current resources for `names`; the version is derived from their contents.
    private func makeResponse(for names: [String], caller: AuthenticatedCaller, logger: Logger) async throws
        -> Envoy_Service_Discovery_V3_DiscoveryResponse
    {
        var response = Envoy_Service_Discovery_V3_DiscoveryResponse()
        response.typeURL = SecretResources.typeURL
        var versions: [String] = []
        for name in Set(names).sorted() {
            let resource: Envoy_Extensions_TransportSockets_Tls_V3_Secret
            if name == configuration.workloadSecretName {
                let secret: WorkloadSecret
                do {
                    secret = try await secrets.workloadSecret(for: caller.spiffeID)
                } catch {
                    logger.error("no certificate for the caller", metadata: ["error": "\(error.message)"])
                    throw RPCError(
                        code: error.isTransient ? .unavailable : .internalError,
                        message: "cannot issue a certificate for \(caller.spiffeID): \(error.message)")
                }
                resource = SecretResources.tlsCertificate(named: name, from: secret)
                versions.append(secret.version)
            } else {
                let bundle = await secrets.trustBundle()
                resource = SecretResources.validationContext(named: name, from: bundle)
                versions.append(bundle.version)
            }
            response.resources.append(try SecretResources.pack(resource))
        }
        response.versionInfo = versions.joined(separator: ".")
        return response
    }

    private static func endMetadata(node: NodeSummary?, names: [String], since opened: ContinuousClock.Instant, reason: String)
        -> Logger.Metadata
    {
        [
            "node": "\(node?.description ?? "?")", "names": "\(names)", "reason": "\(reason)",
            "duration": "\(ContinuousClock.now - opened)",
        ]
    }
}

/// The few Node fields worth remembering per stream (Envoy sends the ~61 KB Node once).
struct NodeSummary: Sendable, CustomStringConvertible {
    var id: String
    var cluster: String

    init(_ node: Envoy_Config_Core_V3_Node) {
        self.id = node.id
        self.cluster = node.cluster
    }

    var description: String { "\(id)/\(cluster)" }
}
