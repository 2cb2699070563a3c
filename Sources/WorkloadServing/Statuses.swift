import CoreMetrics
import GRPCCore
import SDSModel
import Synchronization

/// Runs `body`; an `RPCError` it throws reaches the caller with its message escaped and bounded
/// (``CallerText``), since messages quote what callers sent (names, type URLs, token fields).
public func escapingErrors<T>(_ body: () async throws -> T) async throws -> T {
    do {
        return try await body()
    } catch let error as RPCError {
        throw RPCError(code: error.code, message: CallerText(error.message, limit: 1024).description, metadata: error.metadata, cause: error.cause)
    }
}

extension RPCError {
    /// The status for a certificate that could not be issued, on every service: a refusal is the
    /// caller's (`permission_denied`); a CA that cannot answer now is `unavailable` (clients
    /// retry); only our own failure is `internal`.
    public init(issuing identity: SPIFFEID, _ error: SecretError, what: String = "a certificate") {
        let code: RPCError.Code =
            switch error.code {
            case .unavailable: .unavailable
            case .refused: .permissionDenied
            case .failed: .internalError
            case .unsupported: .failedPrecondition
            }
        self.init(code: code, message: "cannot issue \(what) for \(identity): \(error.message)", cause: error)
    }
}

/// `sds_agent_refused_calls_total{code,reason}`: calls refused on any of the agent's services, by
/// gRPC status and reason (the token check that failed, `policy`, `peer`, `pod_binding`, a stream
/// limit); the reasons are a fixed set, so the label stays small.
public struct RefusedCalls: Sendable {
    public static let metric = "sds_agent_refused_calls_total"
    let factory: any MetricsFactory
    /// Each (code, reason)'s counter, created the first time it is counted (the set is fixed and
    /// small), never again.
    private let counters = Counters()

    private final class Counters: Sendable {
        let byLabel = Mutex<[String: Counter]>([:])
    }

    public init(factory: any MetricsFactory) { self.factory = factory }

    public func count(_ code: RPCError.Code, reason: String) {
        let status =
            switch code {
            case .unauthenticated: "unauthenticated"
            case .unavailable: "unavailable"
            case .resourceExhausted: "resource_exhausted"
            case .deadlineExceeded: "deadline_exceeded"
            case .invalidArgument: "invalid_argument"
            default: "permission_denied"
            }
        counters.byLabel.withLock { counters in
            let key = "\(status) \(reason)"
            if let counter = counters[key] { return counter }
            let counter = Counter(label: Self.metric, dimensions: [("code", status), ("reason", reason)], factory: factory)
            counters[key] = counter
            return counter
        }.increment()
    }
}
