import CoreMetrics
import EnvoyAPI
import FoundationEssentials
import Glibc
import GRPCCore
import Logging
import SDSModel

/// One SDS stream, StreamSecrets or DeltaSecrets: the skeleton both APIs share (the open-streams
/// meter, the node, the type URL and name checks, the token and first-request deadlines, the one
/// closing log line), around the ``XDSProtocol`` that says how a request and a change are answered.
struct StreamSession<API: XDSProtocol>: Sendable {
    let resolver: ResourceResolver
    let configuration: SDSServerConfiguration
    let metrics: SDSMetrics.Stream

    func run(_ events: some AsyncSequence<StreamEvent<API.Request>, any Error>, writer: RPCWriter<API.Response>) async throws {
        metrics.open.increment()
        defer { metrics.open.decrement() }
        var api = API(resolver: resolver)
        var stream = StreamContext(resolver: resolver, writer: writer, rejections: metrics.rejections)
        let opened = ContinuousClock.now
        var reason = "Envoy closed the stream"
        defer {
            resolver.logger.info(
                API.endedEvent,
                metadata: [
                    "node": "\(stream.node?.description ?? "?")", "names": .list(api.subscribed), "reason": "\(reason)",
                    "nacks": .number(api.rejections), "duration": "\(ContinuousClock.now - opened)",
                ])
        }
        do {
            loop: for try await event in events {
                switch event {
                case .request(let message):
                    let request = API.summary(of: message)
                    if stream.node == nil, let node = request.node { stream.node = NodeSummary(node) }
                    try SecretResources.checkTypeURL(request.typeURL)
                    _ = try RequestedNames(request.names, configuration: configuration)
                    try await api.receive(message, stream)
                case .updated: try await api.updated(stream)
                case .credentialExpiring: throw StreamEvents.credentialExpiring(resolver.caller.credentialExpiry)
                case .requestsEnded: break loop
                case .firstRequestDue: continue  // handled by FirstRequestDeadline
                }
            }
        } catch {
            reason = StreamEvents.endReason(error)
            throw error
        }
    }
}

/// What one stream's API answers with, on the shared ``StreamSession`` skeleton.
protocol XDSProtocol: Sendable {
    associatedtype Request: Sendable
    associatedtype Response: Sendable
    /// The closing log line's event.
    static var endedEvent: Logger.Message { get }
    /// What the skeleton checks in every request: its type URL, node and the names it asks for.
    static func summary(of request: Request) -> (typeURL: String, node: Envoy_Config_Core_V3_Node?, names: [String])
    init(resolver: ResourceResolver)
    /// The names subscribed now, sorted, for log lines.
    var subscribed: [String] { get }
    /// NACKs received on this stream.
    var rejections: Int { get }
    mutating func receive(_ request: Request, _ stream: StreamContext<Response>) async throws
    /// The caller's certificate or a bundle changed.
    mutating func updated(_ stream: StreamContext<Response>) async throws
}

/// What a stream's API writes to and logs with.
struct StreamContext<Response: Sendable>: Sendable {
    let resolver: ResourceResolver
    let writer: RPCWriter<Response>
    let rejections: Counter
    var node: NodeSummary?
    var logger: Logger { resolver.logger }

    /// Envoy rejected what was sent (a NACK): counted, and one warning with its error and node.
    func rejected(_ event: Logger.Message, names: [String], nonce: String, envoyError: String) {
        rejections.increment()
        logger.warning(
            event,
            metadata: [
                "names": .list(names), "nonce": "\(nonce)", "envoy_error": "\(envoyError)", "node": "\(node?.description ?? "?")",
            ])
    }
}

/// StreamSecrets: ``StreamStateMachine``'s rules; a change is pushed as the whole subscribed set.
struct SotW: XDSProtocol {
    typealias Request = Envoy_Service_Discovery_V3_DiscoveryRequest
    typealias Response = Envoy_Service_Discovery_V3_DiscoveryResponse
    static let endedEvent: Logger.Message = "SDS stream ended"
    let resolver: ResourceResolver
    private var machine = StreamStateMachine()
    private var lastSentVersion: String?

    init(resolver: ResourceResolver) { self.resolver = resolver }
    var subscribed: [String] { machine.subscribed }
    var rejections: Int { machine.rejections }

    static func summary(of request: Request) -> (typeURL: String, node: Envoy_Config_Core_V3_Node?, names: [String]) {
        (request.typeURL, request.hasNode ? request.node : nil, request.resourceNames)
    }

    mutating func receive(_ message: Request, _ stream: StreamContext<Response>) async throws {
        let action = machine.receive(
            .init(
                versionInfo: message.versionInfo, resourceNames: message.resourceNames, responseNonce: message.responseNonce,
                errorMessage: message.hasErrorDetail ? message.errorDetail.message : nil))
        switch action {
        case .respond(let names, let nonce):
            try await send(resolver.sotwResponse(for: resolver.expand(names)), nonce: nonce, stream)
        case .acknowledged(let version):
            stream.logger.debug("Envoy accepted secrets", metadata: ["version": "\(version)"])
        case .rejected(let nonce, let message):
            stream.rejected(
                "Envoy rejected secrets (NACK); not resending that version", names: subscribed, nonce: nonce, envoyError: message)
        case .stale(let nonce):
            stream.logger.debug("ignored a request for an older response", metadata: ["nonce": "\(nonce)"])
        }
    }

    mutating func updated(_ stream: StreamContext<Response>) async throws {
        // Nothing to push before the first response; nothing if the content is what was sent
        // (which also keeps a NACKed version from being resent).
        guard lastSentVersion != nil else { return }
        let response = try await resolver.sotwResponse(for: resolver.expand(machine.subscribed))
        guard response.versionInfo != lastSentVersion, case .respond(_, let nonce)? = machine.push() else { return }
        try await send(response, nonce: nonce, stream)
        stream.logger.info("pushed new secrets", metadata: ["names": .list(subscribed), "version": "\(response.versionInfo)"])
    }

    private mutating func send(_ response: Response, nonce: String, _ stream: StreamContext<Response>) async throws {
        var response = response
        response.nonce = nonce
        try await stream.writer.write(response)
        lastSentVersion = response.versionInfo
        stream.logger.debug("sent secrets", metadata: ["names": .list(subscribed), "version": "\(response.versionInfo)", "nonce": "\(nonce)"])
    }
}

/// DeltaSecrets: ``DeltaStreamStateMachine``'s rules; only what Envoy does not have is sent.
struct Delta: XDSProtocol {
    typealias Request = Envoy_Service_Discovery_V3_DeltaDiscoveryRequest
    typealias Response = Envoy_Service_Discovery_V3_DeltaDiscoveryResponse
    static let endedEvent: Logger.Message = "SDS delta stream ended"
    let resolver: ResourceResolver
    private var machine: DeltaStreamStateMachine

    init(resolver: ResourceResolver) {
        self.resolver = resolver
        machine = DeltaStreamStateMachine(wildcardNames: resolver.allNames)
    }
    var subscribed: [String] { machine.subscribed.sorted() }
    var rejections: Int { machine.rejections }

    static func summary(of request: Request) -> (typeURL: String, node: Envoy_Config_Core_V3_Node?, names: [String]) {
        (request.typeURL, request.hasNode ? request.node : nil, request.resourceNamesSubscribe)
    }

    mutating func receive(_ message: Request, _ stream: StreamContext<Response>) async throws {
        let action = machine.receive(
            .init(
                subscribe: message.resourceNamesSubscribe, unsubscribe: message.resourceNamesUnsubscribe,
                initialVersions: message.initialResourceVersions, responseNonce: message.responseNonce,
                errorMessage: message.hasErrorDetail ? message.errorDetail.message : nil))
        switch action {
        case .evaluate(let names):
            _ = try await sendChanged(names, stream)
        case .acknowledged(let nonce):
            stream.logger.debug("Envoy accepted secrets (delta)", metadata: ["nonce": "\(nonce)"])
        case .rejected(let nonce, let message):
            stream.rejected(
                "Envoy rejected secrets (delta NACK); not resending that version", names: subscribed, nonce: nonce, envoyError: message)
        case .none:
            break
        }
    }

    mutating func updated(_ stream: StreamContext<Response>) async throws {
        if case .evaluate(let names) = machine.push(), try await sendChanged(names, stream) {
            stream.logger.info("pushed new secrets (delta)", metadata: ["names": .list(names)])
        }
    }

    /// Sends the resources among `names` whose current version Envoy does not have.
    private mutating func sendChanged(_ names: [String], _ stream: StreamContext<Response>) async throws -> Bool {
        let resolved = try await resolver.resolve(names)
        let versions = Dictionary(uniqueKeysWithValues: resolved.map { ($0.name, $0.version) })
        let changed = Set(machine.changed(versions))
        guard !changed.isEmpty else { return false }
        var response = SecretResources.deltaResponse(resolved.filter { changed.contains($0.name) }, systemVersion: resolved.map(\.version))
        response.nonce = machine.didSend(versions.filter { changed.contains($0.key) })
        try await stream.writer.write(response)
        stream.logger.debug("sent secrets (delta)", metadata: ["names": .list(changed.sorted()), "nonce": "\(response.nonce)"])
        return true
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
