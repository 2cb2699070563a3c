import CoreMetrics
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Prometheus
import SDSAgent
import TestSupport
import Testing

@Suite(.timeLimit(.minutes(1))) struct MetricsEndpointTests {
    @Test(arguments: [
        ("0.0.0.0:9102", "0.0.0.0", 9102), (":9102", "0.0.0.0", 9102), ("[::1]:80", "::1", 80), ("localhost:0", "localhost", 0),
    ])
    func parsesHostAndPort(_ text: String, host: String, port: Int) throws {
        let address = try #require(MetricsEndpoint.address(text))
        #expect(address.host == host && address.port == port)
    }

    @Test(arguments: ["9102", "host:", "host:http", "host:70000", "a b:1", "/tmp/sock:1"])
    func rejectsWhatIsNotHostAndPort(_ text: String) {
        #expect(MetricsEndpoint.address(text) == nil)
    }

    /// Real HTTP over TCP on loopback: what Prometheus scrapes is the registry's text, and only at /metrics.
    @Test func servesTheRegistryAtSlashMetricsAndNothingElse() async throws {
        let registry = PrometheusCollectorRegistry()
        let factory = PrometheusMetricsFactory(registry: registry)
        Counter(label: "sds_agent_refused_calls_total", dimensions: [("code", "unauthenticated"), ("reason", "expired")], factory: factory)
            .increment()
        let (ports, portSink) = AsyncStream.makeStream(of: Int.self)
        let endpoint = MetricsEndpoint(
            address: try #require(MetricsEndpoint.address("127.0.0.1:0")), registry: registry, logger: TestPKI.quietLogger,
            onListening: { portSink.yield($0) })
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await endpoint.run() }
            var iterator = ports.makeAsyncIterator()
            let port = try #require(await iterator.next())

            let (body, response) = try await URLSession.shared.data(from: try #require(URL(string: "http://127.0.0.1:\(port)/metrics")))
            let http = try #require(response as? HTTPURLResponse)
            #expect(http.statusCode == 200)
            #expect(http.value(forHTTPHeaderField: "Content-Type")?.hasPrefix("text/plain; version=0.0.4") == true)
            let text = String(decoding: body, as: UTF8.self)
            #expect(text.contains(#"sds_agent_refused_calls_total{code="unauthenticated",reason="expired"} 1"#), "\(text)")

            let (_, other) = try await URLSession.shared.data(from: try #require(URL(string: "http://127.0.0.1:\(port)/")))
            #expect((other as? HTTPURLResponse)?.statusCode == 404)
            group.cancelAll()
        }
    }

    @Test func anAddressInUseFailsWithAMessageNamingIt() async throws {
        let (ports, portSink) = AsyncStream.makeStream(of: Int.self)
        let first = MetricsEndpoint(
            address: try #require(MetricsEndpoint.address("127.0.0.1:0")), registry: PrometheusCollectorRegistry(), logger: TestPKI.quietLogger,
            onListening: { portSink.yield($0) })
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await first.run() }
            var iterator = ports.makeAsyncIterator()
            let port = try #require(await iterator.next())
            let second = MetricsEndpoint(
                address: try #require(MetricsEndpoint.address("127.0.0.1:\(port)")), registry: PrometheusCollectorRegistry(), logger: TestPKI.quietLogger)
            do {
                try await second.run()
                Issue.record("a second endpoint listened on a port in use")
            } catch {
                #expect("\(error)".contains("cannot listen for metrics on 127.0.0.1:\(port)"))
            }
            group.cancelAll()
        }
    }
}
