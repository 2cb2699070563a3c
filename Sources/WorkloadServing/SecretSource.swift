import SDSModel

/// What the services on the agent's sockets (SDS, the Workload API) need from the cache: an
/// identity's current secret, the trust bundle, and a signal when either changes. Declared here,
/// by its consumers; the composition root makes the cache conform.
public protocol SecretSource: Sendable {
    /// The current certificate and key for `identity`, issuing one if there is none yet.
    ///
    /// The caller must have authenticated `identity`; the source does not check it again.
    /// `credential` is the caller's verified token, kept for a CA asked on the caller's behalf.
    func workloadSecret(for identity: SPIFFEID, credential: CallerCredential?) async throws(SecretError) -> WorkloadSecret

    /// The current trust bundle.
    func trustBundle() async -> TrustBundle

    /// Signals (newest only) when `identity`'s certificate or the trust bundle changes.
    /// The watch ends when the returned stream is dropped.
    func updates(for identity: SPIFFEID) -> AsyncStream<Void>

    /// Calls `signal` when `identity`'s certificate or the trust bundle changes, until the watch
    /// is cancelled: what an open stream waits on without a task of its own.
    func watch(_ identity: SPIFFEID, signal: @escaping @Sendable () -> Void) -> SecretWatch

    /// A JWT-SVID of `identity` for `audiences` (SDS `jwt-svid:AUDIENCE`), signing one when none
    /// is held; refreshed before expiry and signalled like a certificate.
    func jwtSVID(for identity: SPIFFEID, audiences: [String]) async throws(SecretError) -> JWTSVIDSecret

    /// Whether `workloadSecret(for:credential:)` uses the caller's token (its CA is asked on the
    /// caller's behalf). When false, a stream does not keep the token for its life.
    var usesCallerCredential: Bool { get }
}

extension SecretSource {
    /// The callback watch over ``updates(for:)``, for sources without their own: one task.
    public func watch(_ identity: SPIFFEID, signal: @escaping @Sendable () -> Void) -> SecretWatch {
        let updates = updates(for: identity)
        let task = Task {
            for await _ in updates { signal() }
        }
        return SecretWatch { task.cancel() }
    }

    /// No JWT-SVIDs (a source with no JWT key).
    public func jwtSVID(for identity: SPIFFEID, audiences: [String]) async throws(SecretError) -> JWTSVIDSecret {
        throw SecretError(.unsupported, message: "this agent serves no JWT-SVIDs")
    }

    /// The current secret for `identity`, with no caller credential to forward.
    public func workloadSecret(for identity: SPIFFEID) async throws(SecretError) -> WorkloadSecret {
        try await workloadSecret(for: identity, credential: nil)
    }
}
