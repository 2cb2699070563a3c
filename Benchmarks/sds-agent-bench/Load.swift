import EnvoyAPI
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Synchronization
import TestSupport

/// Throughput and latency of one phase.
struct LoadResult: Sendable {
    var calls: Int
    var seconds: Double
    var latencies: [Double]  // seconds, sorted
    /// CPU time the agent process spent on the phase (the client shares the machine).
    var agentCPUSeconds = Double.nan

    var perSecond: Double { Double(calls) / seconds }
    var agentCPUPerCall: Double { agentCPUSeconds / Double(calls) }
    func percentile(_ p: Double) -> Double {
        latencies.isEmpty ? .nan : latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))]
    }

    /// - Parameters:
    ///   - limit: calls per second if the machine did nothing but the call's ECDSA work.
    ///   - cryptoPerCall: that ECDSA work in CPU seconds per call.
    func line(_ name: String, limit: Double, cryptoPerCall: Double) -> String {
        let ms = { (s: Double) in String(format: "%.3f ms", s * 1000) }
        let share = limit.isFinite ? String(format: " = %.0f%% of the crypto limit %.0f/s", 100 * perSecond / limit, limit) : ""
        let cpu = cryptoPerCall.isFinite ? "\(ms(agentCPUPerCall)) agent CPU per call (ECDSA alone: \(ms(cryptoPerCall)))" : "\(ms(agentCPUPerCall)) agent CPU per call"
        return "  \(name): \(calls) calls, \(String(format: "%.0f", perSecond))/s\(share); \(cpu); latency p50 \(ms(percentile(0.5))), p99 \(ms(percentile(0.99)))"
    }
}

enum Load {
    /// Runs `operation(0..<calls)` with `concurrency` in flight; fails on the first error.
    static func run(calls: Int, concurrency: Int, _ operation: @escaping @Sendable (Int) async throws -> Void) async throws -> LoadResult {
        let clock = ContinuousClock()
        let start = clock.now
        let latencies = try await withThrowingTaskGroup(of: Double.self, returning: [Double].self) { group in
            var next = 0
            var latencies: [Double] = []
            latencies.reserveCapacity(calls)
            func add() {
                let i = next
                next += 1
                group.addTask {
                    let began = clock.now
                    try await operation(i)
                    let elapsed = began.duration(to: clock.now)
                    return Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
                }
            }
            while next < min(concurrency, calls) { add() }
            for try await latency in group {
                latencies.append(latency)
                if next < calls { add() }
            }
            return latencies.sorted()
        }
        let total = start.duration(to: clock.now)
        return LoadResult(
            calls: calls, seconds: Double(total.components.seconds) + Double(total.components.attoseconds) / 1e18,
            latencies: latencies)
    }
}

/// A few gRPC clients over the agent's socket, each with its own HTTP/2 connection (the agent
/// allows 100 streams per connection by default).
struct SDSClients: Sendable {
    typealias Client = Envoy_Service_Secret_V3_SecretDiscoveryService.Client<HTTP2ClientTransport.Posix>
    let grpc: [GRPCClient<HTTP2ClientTransport.Posix>]
    let clients: [Client]

    init(socket: String, count: Int) throws {
        grpc = try (0..<count).map { _ in
            GRPCClient(transport: try .http2NIOPosix(target: .unixDomainSocket(path: socket), transportSecurity: .plaintext))
        }
        clients = grpc.map { Client(wrapping: $0) }
    }

    /// Runs the connections around `body`, then closes them.
    func run<R: Sendable>(_ body: @Sendable (SDSClients) async throws -> R) async throws -> R {
        try await withThrowingTaskGroup(of: Void.self, returning: R.self) { group in
            for client in grpc { group.addTask { try await client.runConnections() } }
            defer { for client in grpc { client.beginGracefulShutdown() } }
            return try await body(self)
        }
    }

    /// One FetchSecrets for the workload certificate; fails unless it is served.
    func fetch(token: String, on index: Int, timeout: Duration? = nil) async throws {
        var options = CallOptions.defaults
        options.timeout = timeout
        let response = try await clients[index % clients.count].fetchSecrets(
            SDSTestClient.request(["default"]), metadata: SDSTestClient.metadata(token: token), options: options)
        guard response.resources.count == 1 else { throw BenchError("expected one secret, got \(response.resources.count)") }
    }

    /// The whole FetchSecrets response for the workload certificate (the floor server's canned answer).
    func fetchResponse(token: String) async throws -> Envoy_Service_Discovery_V3_DiscoveryResponse {
        try await clients[0].fetchSecrets(SDSTestClient.request(["default"]), metadata: SDSTestClient.metadata(token: token))
    }
}

extension SDSClients {
    /// How many signals `ready` gave, stopping at `count` (or when it ends).
    static func count(_ ready: AsyncStream<Void>, upTo count: Int) async -> Int {
        var opened = 0
        for await _ in ready {
            opened += 1
            if opened == count { break }
        }
        return opened
    }
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

extension SDSClients {
    /// Rotation fan-out: opens `count` streams (tokens round-robin) for the certificate and the
    /// bundle, waits (bounded) until each has its first response, calls `trigger` (SIGUSR1 at the
    /// agent: a root rotation) and records, per stream, when its next two responses arrive: the
    /// bundle with the new root, then (after the activation delay) the renewed certificate.
    /// Returns seconds from the trigger, sorted.
    func rotation(
        _ count: Int, tokens: [String], timeout: Duration = .seconds(120), trigger: @escaping @Sendable () -> Void
    ) async throws -> (bundle: [Double], certificate: [Double]) {
        let clock = ContinuousClock()
        let (ready, readySink) = AsyncStream.makeStream(of: Void.self)
        let (pushes, pushSink) = AsyncStream.makeStream(of: (Int, ContinuousClock.Instant).self)
        let start = Gate()
        return try await withThrowingTaskGroup(of: Void.self, returning: (bundle: [Double], certificate: [Double]).self) { group in
            for i in 0..<count {
                let client = clients[i % clients.count]
                let token = tokens[i % tokens.count]
                group.addTask {
                    do {
                        try await SDSTestClient.withStream(client, metadata: SDSTestClient.metadata(token: token)) { session in
                            session.send(SDSTestClient.request(["default", "ROOTCA"]))
                            guard let first = try await session.next() else { throw BenchError("a stream ended before its first response") }
                            session.send(SDSTestClient.request(["default", "ROOTCA"], version: first.versionInfo, nonce: first.nonce))
                            readySink.yield()
                            await start.wait()
                            for push in 1...2 {
                                guard let response = try await session.next() else { throw BenchError("a stream ended before push \(push)") }
                                session.send(SDSTestClient.request(["default", "ROOTCA"], version: response.versionInfo, nonce: response.nonce))
                                pushSink.yield((push, clock.now))
                            }
                            _ = try await session.next()  // held open until cancelled
                        }
                    } catch {
                        readySink.finish()  // stops the waits below
                        pushSink.finish()
                        throw error
                    }
                }
            }
            group.addTask {
                try await Task.sleep(for: timeout)
                readySink.finish()
                pushSink.finish()
            }
            let opened = await Self.count(ready, upTo: count)
            guard opened == count else {
                group.cancelAll()
                throw BenchError("only \(opened) of \(count) streams were served")
            }
            let triggered = clock.now
            trigger()
            start.open()
            var bundle: [Double] = [], certificate: [Double] = []
            for await (push, at) in pushes {
                let elapsed = triggered.duration(to: at)
                let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
                if push == 1 { bundle.append(seconds) } else { certificate.append(seconds) }
                if certificate.count == count { break }
            }
            group.cancelAll()
            guard certificate.count == count else {
                throw BenchError("only \(bundle.count) bundle and \(certificate.count) certificate pushes of \(count) streams arrived")
            }
            return (bundle.sorted(), certificate.sorted())
        }
    }
}
