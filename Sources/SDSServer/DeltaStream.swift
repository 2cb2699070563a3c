import EnvoyAPI
import FoundationEssentials
import Glibc
import GRPCCore
import Logging
import SDSModel
import CoreMetrics

/// One DeltaSecrets stream: applies ``DeltaStreamStateMachine`` to requests and pushes on updates.
struct DeltaStream: Sendable {
    let resolver: ResourceResolver
    let configuration: SDSServerConfiguration
    let metrics: SDSMetrics.Stream

    func run(
        _ events: some AsyncSequence<StreamEvent<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest>, any Error>,
        writer: RPCWriter<Envoy_Service_Discovery_V3_DeltaDiscoveryResponse>
    ) async throws {
        let logger = resolver.logger
        metrics.open.increment()
        defer { metrics.open.decrement() }
        var machine = DeltaStreamStateMachine(wildcardNames: resolver.allNames)
        var node: NodeSummary?
        let opened = ContinuousClock.now
        var reason = "Envoy closed the stream"
        defer {
            logger.info(
                "SDS delta stream ended",
                metadata: [
                    "node": "\(node?.description ?? "?")", "names": .list(machine.subscribed.sorted()), "reason": "\(reason)",
                    "nacks": .number(machine.rejections), "duration": "\(ContinuousClock.now - opened)",
                ])
        }
        /// Sends the resources among `names` whose current version Envoy does not have.
        func sendChanged(_ names: [String]) async throws -> Bool {
            let resolved = try await resolver.resolve(names)
            let versions = Dictionary(uniqueKeysWithValues: resolved.map { ($0.name, $0.version) })
            let changed = Set(machine.changed(versions))
            guard !changed.isEmpty else { return false }
            var response = Envoy_Service_Discovery_V3_DeltaDiscoveryResponse()
            response.typeURL = SecretResources.typeURL
            response.resources = resolved.filter { changed.contains($0.name) }.map { item in
                var resource = Envoy_Service_Discovery_V3_Resource()
                resource.name = item.name
                resource.version = item.version
                resource.resource = item.resource
                return resource
            }
            response.systemVersionInfo = resolved.map(\.version).joined(separator: ".")
            response.nonce = machine.didSend(versions.filter { changed.contains($0.key) })
            try await writer.write(response)
            logger.debug("sent secrets (delta)", metadata: ["names": .list(changed.sorted()), "nonce": "\(response.nonce)"])
            return true
        }
        do {
            loop: for try await event in events {
                switch event {
                case .request(let message):
                    if node == nil, message.hasNode { node = NodeSummary(message.node) }
                    try SecretResources.checkTypeURL(message.typeURL)
                    try SecretDiscoveryService.validate(
                        names: message.resourceNamesSubscribe, configuration: configuration, resolver: resolver)
                    let action = machine.receive(
                        .init(
                            subscribe: message.resourceNamesSubscribe, unsubscribe: message.resourceNamesUnsubscribe,
                            initialVersions: message.initialResourceVersions, responseNonce: message.responseNonce,
                            errorMessage: message.hasErrorDetail ? message.errorDetail.message : nil))
                    switch action {
                    case .evaluate(let names):
                        _ = try await sendChanged(names)
                    case .acknowledged(let nonce):
                        logger.debug("Envoy accepted secrets (delta)", metadata: ["nonce": "\(nonce)"])
                    case .rejected(let nonce, let message):
                        metrics.rejections.increment()
                        logger.warning(
                            "Envoy rejected secrets (delta NACK); not resending that version",
                            metadata: ["names": .list(machine.subscribed.sorted()), "nonce": "\(nonce)", "envoy_error": "\(message)"])
                    case .none:
                        break
                    }
                case .updated:
                    if case .evaluate(let names) = machine.push(), try await sendChanged(names) {
                        logger.info("pushed new secrets (delta)", metadata: ["names": .list(names)])
                    }
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
