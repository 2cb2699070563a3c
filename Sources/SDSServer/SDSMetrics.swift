import CoreMetrics
import GRPCCore
import WorkloadServing

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
    /// Refused calls, shared with the admission of every call.
    let refusals: RefusedCalls

    init(factory: any MetricsFactory) {
        func stream(_ api: String) -> Stream {
            Stream(
                open: Meter(label: SecretDiscoveryService.openStreamsMetric, dimensions: [("api", api)], factory: factory),
                rejections: Counter(label: SecretDiscoveryService.rejectionsMetric, dimensions: [("api", api)], factory: factory))
        }
        sotw = stream("sotw")
        delta = stream("delta")
        refusals = RefusedCalls(factory: factory)
    }
}
