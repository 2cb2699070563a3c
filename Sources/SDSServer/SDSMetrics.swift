import CoreMetrics
import GRPCCore

/// The SDS service's metrics, created once per service (low-cardinality labels only).
struct SDSMetrics: Sendable {
    /// Metrics of one API (`sotw`: StreamSecrets; `delta`: DeltaSecrets).
    struct Stream: Sendable {
        /// Streams open now (the stream counts itself while it runs).
        let open: Meter
        /// NACKs received (Envoy rejected what was sent).
        let rejections: Counter
    }

    let sotw: Stream
    let delta: Stream
    let factory: any MetricsFactory

    init(factory: any MetricsFactory) {
        func stream(_ api: String) -> Stream {
            Stream(
                open: Meter(label: SecretDiscoveryService.openStreamsMetric, dimensions: [("api", api)], factory: factory),
                rejections: Counter(label: SecretDiscoveryService.rejectionsMetric, dimensions: [("api", api)], factory: factory))
        }
        sotw = stream("sotw")
        delta = stream("delta")
        self.factory = factory
    }

    /// Counts a refused call by gRPC status and reason; reasons are a fixed set, so the label stays small.
    func refused(_ code: RPCError.Code, reason: String) {
        let status =
            switch code {
            case .unauthenticated: "unauthenticated"
            case .unavailable: "unavailable"
            case .resourceExhausted: "resource_exhausted"
            case .deadlineExceeded: "deadline_exceeded"
            case .invalidArgument: "invalid_argument"
            default: "permission_denied"
            }
        Counter(label: SecretDiscoveryService.refusedCallsMetric, dimensions: [("code", status), ("reason", reason)], factory: factory)
            .increment()
    }
}
