/// The incremental (delta) xDS rules for one DeltaSecrets stream, as pure values.
///
/// Envoy 1.40 with `DELTA_GRPC` opens one stream per secret name: first request
/// `resource_names_subscribe` (plus `initial_resource_versions` after a reconnect), ACK = only
/// `response_nonce`, NACK = `response_nonce` + `error_detail`. A resource is sent when Envoy does
/// not yet have its current version; a rejected version is never resent.
package struct DeltaStreamStateMachine: Sendable {
    /// The parts of a DeltaDiscoveryRequest the rules look at.
    package struct Request: Sendable, Equatable {
        package var subscribe: [String]
        package var unsubscribe: [String]
        package var initialVersions: [String: String]
        package var responseNonce: String
        package var errorMessage: String?

        package init(
            subscribe: [String] = [], unsubscribe: [String] = [], initialVersions: [String: String] = [:],
            responseNonce: String = "", errorMessage: String? = nil
        ) {
            self.subscribe = subscribe
            self.unsubscribe = unsubscribe
            self.initialVersions = initialVersions
            self.responseNonce = responseNonce
            self.errorMessage = errorMessage
        }
    }

    /// What the stream should do with a request.
    package enum Action: Sendable, Equatable {
        /// Look up these names and send the ones whose version Envoy does not have.
        case evaluate(names: [String])
        /// Envoy accepted a response; nothing to send.
        case acknowledged(nonce: String)
        /// Envoy rejected the response with `nonce`; nothing to send.
        case rejected(nonce: String, message: String)
        /// Nothing to do (e.g. only unsubscriptions).
        case none
    }

    /// The names subscribed to.
    package private(set) var subscribed: Set<String> = []
    /// The version of each resource Envoy has (sent by us, or declared on reconnect).
    package private(set) var knownVersions: [String: String] = [:]
    /// How many NACKs this stream has received.
    package private(set) var rejections = 0
    private var nonceCounter: UInt64 = 0
    private var isFirst = true
    private let wildcardNames: [String]

    /// `wildcardNames` is what `*` subscribes to.
    package init(wildcardNames: [String]) {
        self.wildcardNames = wildcardNames
    }

    package mutating func receive(_ request: Request) -> Action {
        let first = isFirst
        isFirst = false
        if first {
            for (name, version) in request.initialVersions { knownVersions[name] = version }
        }
        for name in request.unsubscribe {
            subscribed.remove(name)
            knownVersions[name] = nil
        }
        let added = request.subscribe.flatMap { $0 == "*" ? wildcardNames : [$0] }.filter { !subscribed.contains($0) }
        subscribed.formUnion(added)
        if !request.responseNonce.isEmpty, let message = request.errorMessage {
            rejections += 1
            return added.isEmpty ? .rejected(nonce: request.responseNonce, message: message) : .evaluate(names: added)
        }
        if !added.isEmpty { return .evaluate(names: added) }
        if first && !subscribed.isEmpty { return .evaluate(names: subscribed.sorted()) }
        if !request.responseNonce.isEmpty { return .acknowledged(nonce: request.responseNonce) }
        return .none
    }

    /// A push: every subscribed name is looked up again.
    package func push() -> Action {
        subscribed.isEmpty ? .none : .evaluate(names: subscribed.sorted())
    }

    /// Of the current `versions`, the names Envoy does not already have.
    package func changed(_ versions: [String: String]) -> [String] {
        versions.filter { subscribed.contains($0.key) && knownVersions[$0.key] != $0.value }.keys.sorted()
    }

    /// Records a response carrying `versions`; returns its nonce.
    package mutating func didSend(_ versions: [String: String]) -> String {
        for (name, version) in versions { knownVersions[name] = version }
        nonceCounter += 1
        return String(nonceCounter)
    }
}
