/// The state-of-the-world (SotW) xDS rules for one StreamSecrets stream, as pure values.
///
/// Rules that work with a real Envoy (see docs/ENVOY-FACTS.md):
/// - answer the first request of every stream, whatever `version_info` or nonce it carries
///   (after an agent restart Envoy resends the last version it accepted from the old process);
/// - a later request whose nonce is not the last one sent is stale and ignored;
/// - a request with the current nonce is an ACK, or a NACK when it carries `error_detail`;
/// - answer again only when the set of names changes, or push when their content changes;
///   never answer an ACK.
package struct StreamStateMachine: Sendable {
    /// The parts of a DiscoveryRequest the rules look at.
    package struct Request: Sendable, Equatable {
        package var versionInfo: String
        package var resourceNames: [String]
        package var responseNonce: String
        package var errorMessage: String?

        package init(versionInfo: String = "", resourceNames: [String], responseNonce: String = "", errorMessage: String? = nil) {
            self.versionInfo = versionInfo
            self.resourceNames = resourceNames
            self.responseNonce = responseNonce
            self.errorMessage = errorMessage
        }
    }

    /// What the stream should do with a request.
    package enum Action: Sendable, Equatable {
        /// Send the current resources for these names, with `nonce`.
        case respond(names: [String], nonce: String)
        /// Envoy accepted the response with this version; nothing to send.
        case acknowledged(version: String)
        /// Envoy rejected the response with `nonce`; nothing to send (never resend a rejected version).
        case rejected(nonce: String, message: String)
        /// A response to an older nonce; ignore it.
        case stale(nonce: String)
    }

    private var lastNonce: String?
    private var nonceCounter: UInt64 = 0
    /// The names this stream is subscribed to, in the order Envoy last sent them.
    package private(set) var subscribed: [String] = []
    /// How many NACKs this stream has received.
    package private(set) var rejections = 0

    package init() {}

    /// Applies the SotW rules to `request`.
    package mutating func receive(_ request: Request) -> Action {
        guard let lastNonce else {
            return respond(to: request.resourceNames)
        }
        guard request.responseNonce == lastNonce else {
            return .stale(nonce: request.responseNonce)
        }
        if Set(request.resourceNames) != Set(subscribed) {
            return respond(to: request.resourceNames)
        }
        if let message = request.errorMessage {
            rejections += 1
            return .rejected(nonce: request.responseNonce, message: message)
        }
        return .acknowledged(version: request.versionInfo)
    }

    /// A push of new content for the current names, or nil before the first response.
    package mutating func push() -> Action? {
        guard lastNonce != nil else { return nil }
        return respond(to: subscribed)
    }

    private mutating func respond(to names: [String]) -> Action {
        subscribed = names
        nonceCounter += 1
        let nonce = String(nonceCounter)
        lastNonce = nonce
        return .respond(names: names, nonce: nonce)
    }
}
