import SDSModel

/// What the SDS server needs from the cache: an identity's current secret, the trust bundle, and
/// a signal when either changes.
public protocol SecretSource: Sendable {
    /// The current certificate and key for `identity`, issuing one if there is none yet.
    ///
    /// The caller must have authenticated `identity`; the source does not check it again.
    func workloadSecret(for identity: SPIFFEID) async throws(SecretError) -> WorkloadSecret

    /// The current trust bundle.
    func trustBundle() async -> TrustBundle

    /// Signals (newest only) when `identity`'s certificate or the trust bundle changes.
    /// The watch ends when the returned stream is dropped.
    func updates(for identity: SPIFFEID) -> AsyncStream<Void>
}

/// A secret that could not be produced.
public struct SecretError: Error, Sendable, CustomStringConvertible {
    /// Whether retrying later may help (the CA is unavailable) or not (the request was refused).
    public var isTransient: Bool
    /// What went wrong, in words.
    public var message: String

    public init(isTransient: Bool, message: String) {
        self.isTransient = isTransient
        self.message = message
    }

    public var description: String { message }
}
