import EnvoyAPI
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Synchronization
import TestSupport

/// A node-restart storm: `tokens.count` clients, each on its own connection (as Envoy's
/// google_grpc opens one per stream), each opening StreamSecrets for `default` with its own
/// identity, all at once. Every stream is held open until all have been served (or have failed),
/// as sidecars hold theirs. A client does not wait for the connection to come up (Envoy does not
/// either): a refused connection is a failure here, not a delay.
enum Storm {
    struct Result: Sendable {
        var clients: Int
        var seconds: Double
        /// Time from the storm's start to each served client's first response, sorted.
        var latencies: [Double]
        /// What each failed client saw, grouped: message -> count.
        var failures: [String: Int]

        var failed: Int { failures.values.reduce(0, +) }

        func line(_ name: String) -> String {
            func ms(_ p: Double) -> String {
                latencies.isEmpty ? "-" : String(format: "%.1f ms", latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))] * 1000)
            }
            return "  \(name): \(clients) clients, \(latencies.count) served, \(failed) failed in "
                + String(format: "%.2f s", seconds) + "; first response p50 \(ms(0.5)), p99 \(ms(0.99)), max \(ms(1.0))"
        }
    }

    /// `whileHeld` runs once every client has settled, before the held streams are released (the
    /// per-stream memory is measured there).
    static func run(
        socket: String, tokens: [String], timeout: Duration = .seconds(60),
        whileHeld: (@Sendable () async -> Void)? = nil
    ) async -> Result {
        let clock = ContinuousClock()
        let release = Gate()
        let start = clock.now
        let outcomes = await withTaskGroup(of: Swift.Result<Double, StormFailure>.self) { group in
            // A client is settled once served (it then holds its stream) or failed; the last one
            // to settle releases the held streams.
            let settled = Atomic<Int>(0)
            let settle: @Sendable () -> Void = {
                if settled.add(1, ordering: .relaxed).newValue == tokens.count {
                    Task {
                        await whileHeld?()
                        release.open()
                    }
                }
            }
            for token in tokens {
                group.addTask {
                    let outcome = await client(socket: socket, token: token, release: release) {
                        let elapsed = start.duration(to: clock.now)
                        settle()
                        return Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
                    }
                    if case .failure = outcome { settle() }
                    return outcome
                }
            }
            group.addTask {
                // Bounded: whatever happens, the held streams are released after the timeout.
                try? await Task.sleep(for: timeout)
                release.open()
                return .failure(StormFailure(description: "timer"))
            }
            var outcomes: [Swift.Result<Double, StormFailure>] = []
            for await outcome in group {
                if case .failure(let failure) = outcome, failure.description == "timer" {
                    // The bound: a client still waiting now is cancelled (and counted as failed).
                    group.cancelAll()
                    continue
                }
                outcomes.append(outcome)
                if outcomes.count == tokens.count { group.cancelAll() }
            }
            return outcomes
        }
        var latencies: [Double] = []
        var failures: [String: Int] = [:]
        for outcome in outcomes {
            switch outcome {
            case .success(let latency): latencies.append(latency)
            case .failure(let failure): failures[failure.description, default: 0] += 1
            }
        }
        return Result(
            clients: tokens.count, seconds: latencies.max() ?? 0, latencies: latencies.sorted(), failures: failures)
    }

    /// One client: its own connection and stream; returns when released, with the latency `served`
    /// gave (an error after the first response, while the stream is held, does not undo it).
    private static func client(
        socket: String, token: String, release: Gate, served: @escaping @Sendable () -> Double
    ) async -> Swift.Result<Double, StormFailure> {
        let latency = Mutex<Double?>(nil)
        do {
            let transport = try HTTP2ClientTransport.Posix(
                target: .unixDomainSocket(path: socket), transportSecurity: .plaintext)
            try await withGRPCClient(transport: transport) { grpc in
                let sds = Envoy_Service_Secret_V3_SecretDiscoveryService.Client(wrapping: grpc)
                // No RPC timeout: Envoy's xDS streams carry no grpc-timeout (one would also cost
                // the server a timer task per stream). The storm's timer bounds the wait instead.
                var options = CallOptions.defaults
                options.waitForReady = false
                try await SDSTestClient.withStream(sds, metadata: SDSTestClient.metadata(token: token), options: options) {
                    session in
                    session.send(SDSTestClient.request(["default"], node: true))
                    guard let response = try await session.next(), response.resources.count == 1 else {
                        throw StormFailure(description: "stream ended without the secret")
                    }
                    let value = served()
                    latency.withLock { $0 = value }
                    await release.wait()
                }
            }
        } catch let error as RPCError {
            if latency.withLock({ $0 }) == nil { return .failure(StormFailure(description: "\(error.code): \(error.message.prefix(120))")) }
        } catch {
            if latency.withLock({ $0 }) == nil { return .failure(StormFailure(description: "\(error)".prefix(120).description)) }
        }
        return latency.withLock { $0 }.map { .success($0) } ?? .failure(StormFailure(description: "no response"))
    }
}

struct StormFailure: Error, CustomStringConvertible {
    var description: String
}

/// Suspends waiters until ``open()`` is called once; later waiters pass at once.
final class Gate: Sendable {
    private let state = Mutex<(open: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    func wait() async {
        await withCheckedContinuation { continuation in
            let resumeNow = state.withLock { state in
                if state.open { return true }
                state.waiters.append(continuation)
                return false
            }
            if resumeNow { continuation.resume() }
        }
    }

    func open() {
        let waiters = state.withLock { state in
            state.open = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }
}
