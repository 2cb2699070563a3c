import EnvoyAPI
import FoundationEssentials
import Glibc
import GRPCCore
import Logging
import SDSModel
import CoreMetrics

/// One StreamSecrets stream: applies ``StreamStateMachine`` to requests and pushes on updates.
struct SotWStream: Sendable {
    let resolver: ResourceResolver
    let configuration: SDSServerConfiguration
    let metrics: SDSMetrics.Stream

    func run(
        _ events: some AsyncSequence<StreamEvent<Envoy_Service_Discovery_V3_DiscoveryRequest>, any Error>,
        writer: RPCWriter<Envoy_Service_Discovery_V3_DiscoveryResponse>
    ) async throws {
        let logger = resolver.logger
        metrics.open.increment()
        defer { metrics.open.decrement() }
        var machine = StreamStateMachine()
        var node: NodeSummary?
        var lastSentVersion: String?
        let opened = ContinuousClock.now
        var reason = "Envoy closed the stream"
        defer {
            logger.info(
                "SDS stream ended",
                metadata: [
                    "node": "\(node?.description ?? "?")", "names": .list(machine.subscribed), "reason": "\(reason)",
                    "nacks": .number(machine.rejections), "duration": "\(ContinuousClock.now - opened)",
                ])
        }
        func send(_ response: Envoy_Service_Discovery_V3_DiscoveryResponse, nonce: String) async throws {
            var response = response
            response.nonce = nonce
            try await writer.write(response)
            lastSentVersion = response.versionInfo
            logger.debug("sent secrets", metadata: ["names": .list(machine.subscribed), "version": "\(response.versionInfo)", "nonce": "\(nonce)"])
        }
        do {
            loop: for try await event in events {
                switch event {
                case .request(let message):
                    if node == nil, message.hasNode { node = NodeSummary(message.node) }
                    try SecretResources.checkTypeURL(message.typeURL)
                    try SecretDiscoveryService.validate(names: message.resourceNames, configuration: configuration, resolver: resolver)
                    let action = machine.receive(
                        .init(
                            versionInfo: message.versionInfo, resourceNames: message.resourceNames,
                            responseNonce: message.responseNonce,
                            errorMessage: message.hasErrorDetail ? message.errorDetail.message : nil))
                    switch action {
                    case .respond(let names, let nonce):
                        try await send(resolver.sotwResponse(for: resolver.expand(names)), nonce: nonce)
                    case .acknowledged(let version):
                        logger.debug("Envoy accepted secrets", metadata: ["version": "\(version)"])
                    case .rejected(let nonce, let message):
                        metrics.rejections.increment()
                        logger.warning(
                            "Envoy rejected secrets (NACK); not resending that version",
                            metadata: [
                                "names": .list(machine.subscribed), "nonce": "\(nonce)", "envoy_error": "\(message)",
                                "node": "\(node?.description ?? "?")",
                            ])
                    case .stale(let nonce):
                        logger.debug("ignored a request for an older response", metadata: ["nonce": "\(nonce)"])
                    }
                case .updated:
                    // Nothing to push before the first response; nothing if the content is what was sent
                    // (which also keeps a NACKed version from being resent).
                    guard lastSentVersion != nil else { continue }
                    let response = try await resolver.sotwResponse(for: resolver.expand(machine.subscribed))
                    guard response.versionInfo != lastSentVersion, case .respond(_, let nonce)? = machine.push() else { continue }
                    try await send(response, nonce: nonce)
                    logger.info("pushed new secrets", metadata: ["names": .list(machine.subscribed), "version": "\(response.versionInfo)"])
                case .credentialExpiring:
                    throw StreamEvents.credentialExpiring(resolver.caller.credentialExpiry)
                case .requestsEnded:
                    break loop
                case .firstRequestDue:
                    continue  // handled by FirstRequestDeadline
                }
            }
        } catch {
            reason = StreamEvents.endReason(error)
            throw error
        }
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
