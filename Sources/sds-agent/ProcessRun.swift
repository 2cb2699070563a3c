import ArgumentParser
import CoreMetrics
import Logging
import Metrics
import Prometheus
import SDSAgent
import SDSModel
import ServiceLifecycle
import UnixSignals

/// What `serve` and `ca serve` share around their services: the start lines, the metrics
/// backend, and the one service group that owns the shutdown signals.
enum ProcessRun {
    /// The effective configuration (where each setting came from), and the `SDS_AGENT_*`
    /// variables that name no setting.
    static func logStart(_ logger: Logger, effective: ConfigSources.Effective, unknownVariables unknown: [String]) {
        logger.info(
            "effective configuration",
            metadata: ["version": "\(Build.description)"].merging(effective.describe()) { $1 })
        if !unknown.isEmpty {
            logger.warning(
                "environment variables that name no setting are ignored (a typo?); settings are SDS_AGENT_ and a flag's long name",
                metadata: ["variables": .list(unknown)])
        }
    }

    /// Prometheus as the metrics backend, with `sds_agent_build_info`; the registry to serve.
    static func bootstrapMetrics() -> PrometheusCollectorRegistry {
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        Gauge(
            label: "sds_agent_build_info",
            dimensions: [("version", BuildInfo.version), ("commit", Build.commit), ("swift", BuildInfo.swiftVersion)]
        ).record(1)
        return registry
    }

    /// Runs `services` until SIGTERM, SIGINT or SIGQUIT, which drain within a bound (well inside
    /// a pod's grace period); a failure is one critical line and exit code 1.
    static func runUntilSignalled(
        _ services: () async throws -> [ServiceGroupConfiguration.ServiceConfiguration], logger: Logger, stopped: String
    ) async throws {
        do {
            var configuration = ServiceGroupConfiguration(
                services: try await services(), gracefulShutdownSignals: [.sigterm, .sigint, .sigquit], cancellationSignals: [],
                logger: logger)
            configuration.maximumGracefulShutdownDuration = .seconds(8)
            try await ServiceGroup(configuration: configuration).run()
        } catch {
            logger.critical("\(stopped): \(error)")
            throw ExitCode.failure
        }
    }
}
