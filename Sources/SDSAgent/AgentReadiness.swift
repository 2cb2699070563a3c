import Synchronization

/// Whether the agent can issue now, and if not, why: what `/readyz`, `sds-agent check` and a
/// DaemonSet's readiness probe report. Ready means the socket listens, the verifier has keys, and
/// the CA can sign (the embedded CA's certificate is valid; an upstream CA answered its last call).
package final class AgentReadiness: Sendable {
    private struct State {
        var listening = false
        var checks: [@Sendable () -> String?] = []
    }
    private let state = Mutex(State())

    package init() {}

    /// The SDS socket accepts connections.
    package func markListening(_ listening: Bool = true) { state.withLock { $0.listening = listening } }

    /// Adds a condition: it returns why the agent is not ready, or nil.
    package func add(_ check: @escaping @Sendable () -> String?) { state.withLock { $0.checks.append(check) } }

    /// Nil when ready; otherwise the first reason, in words.
    package var notReadyReason: String? {
        let (listening, checks) = state.withLock { ($0.listening, $0.checks) }
        guard listening else { return "the SDS socket is not listening yet" }
        for check in checks {
            if let reason = check() { return reason }
        }
        return nil
    }
}
