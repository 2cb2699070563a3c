import ArgumentParser
import EnvoyAPI
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import TestSupport

/// Measures a real `sds-agent serve` process over its Unix socket and prints the numbers next
/// to the machine's own limit (`openssl speed ecdsap256` on the same run).
///
/// - issuance: first FetchSecrets for N distinct identities (token check, P-256 key, CSR, CA
///   signature, PEM) — identities per second and latency;
/// - cached: FetchSecrets for an identity already issued (token check + response);
/// - streams: S open StreamSecrets streams, the agent's resident memory per stream.
///
/// Tokens are ES256 (signed here beforehand, outside the timed part) and checked against a JWKS
/// file, as on a cluster with `--jwks`. Prints numbers; asserts nothing about speed.
@main
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sds-agent-bench", abstract: "Benchmark a real sds-agent over its socket and print the numbers.")

    @Option(help: "The sds-agent binary to measure (a release build gives the real numbers).")
    var agent: String

    @Option(help: "Distinct identities to issue.")
    var identities = 2000

    @Option(help: "FetchSecrets calls for an identity already issued.")
    var fetches = 10000

    @Option(help: "StreamSecrets streams held open at once.")
    var streams = 2000

    @Option(help: "Calls in flight at once.")
    var concurrency = 16

    @Option(help: "Instead of the phases above: a node-restart storm of N clients against a fresh agent, each on its own connection, all at once; exits 1 if any client is not served.")
    var storm: Int?

    @Option(help: "An extra argument for `sds-agent serve` (repeatable), e.g. --agent-arg=--listen-backlog --agent-arg=128.")
    var agentArg: [String] = []

    @Flag(help: "Tiny sizes: checks that the benchmark runs (CI), the numbers mean little.")
    var smoke = false

    // Measured by scripts/bench.sh with `openssl speed ecdsap256` just before: a child started
    // from here inherits the Swift runtime's signal setup, under which openssl's SIGALRM-timed
    // loops never stop.
    @Option(help: "ECDSA P-256 signatures per second per core on this machine (openssl speed ecdsap256).")
    var signPerSecond: Double?

    @Option(help: "ECDSA P-256 verifications per second per core on this machine (openssl speed ecdsap256).")
    var verifyPerSecond: Double?

    func run() async throws {
        let sizes = smoke ? (identities: 40, fetches: 200, streams: 60) : (identities: identities, fetches: fetches, streams: streams)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sds-bench-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let tokens = TokenFactory()
        let jwks = dir + "/jwks.json"
        try tokens.jwksJSON().write(to: URL(fileURLWithPath: jwks))
        let socket = dir + "/sds.sock"

        let process = try AgentProcess(
            binary: agent,
            arguments: ["serve", "--socket", socket, "--jwks", jwks, "--state-dir", dir + "/state", "--log-level", storm == nil ? "error" : "warning"] + agentArg,
            socket: socket)
        defer { process.stop() }
        if let storm {
            try await runStorm(storm, socket: socket, tokens: tokens, process: process)
            return
        }

        let issuanceTokens = (0..<sizes.identities).map { tokens.token(namespace: "bench", serviceAccount: "sa-\($0)") }
        let clients = try SDSClients(socket: socket, count: max(1, sizes.streams / 50))
        let (issuance, cached, rssBefore, perStream) = try await clients.run { clients in
            var cpu = process.cpuSeconds()
            var issuance = try await Load.run(calls: issuanceTokens.count, concurrency: concurrency) { i in
                try await clients.fetch(token: issuanceTokens[i], on: i)
            }
            issuance.agentCPUSeconds = process.cpuSeconds() - cpu
            let cachedToken = issuanceTokens[0]
            cpu = process.cpuSeconds()
            var cached = try await Load.run(calls: sizes.fetches, concurrency: concurrency) { i in
                try await clients.fetch(token: cachedToken, on: i)
            }
            cached.agentCPUSeconds = process.cpuSeconds() - cpu
            // Measured after the warm-up above, so the heap is already grown: this is what
            // each further open stream costs.
            let before = process.residentKiB()
            let perStream = try await clients.holdStreams(sizes.streams, tokens: issuanceTokens) {
                Double(process.residentKiB() - before) / Double(sizes.streams)
            }
            return (issuance, cached, before, perStream)
        }

        let cores = ProcessInfo.processInfo.activeProcessorCount
        // Per issuance: a key pair, the CSR's signature, the CA's signature (≈ 3 signs), and the
        // token's and the CSR's signature checks (2 verifies). A cached fetch: 1 verify.
        let sign = signPerSecond ?? .nan, verify = verifyPerSecond ?? .nan
        let issuanceFloor = Double(cores) / (3 / sign + 2 / verify)
        let cachedFloor = Double(cores) * verify
        print("sds-agent benchmark\(smoke ? " (smoke sizes: numbers mean little)" : "")")
        print(
            sign.isFinite
                ? "  machine: \(cores) cores; openssl speed ecdsap256: \(Int(sign)) sign/s, \(Int(verify)) verify/s per core"
                : "  machine: \(cores) cores; no openssl numbers given (scripts/bench.sh passes them)")
        print(issuance.line("issuance (new identity)", limit: issuanceFloor, cryptoPerCall: 3 / sign + 2 / verify))
        print(cached.line("fetch (cached identity)", limit: cachedFloor, cryptoPerCall: 1 / verify))
        print("  streams: \(sizes.streams) open; agent RSS \(rssBefore / 1024) MiB before, \(String(format: "%.1f", perStream)) KiB per stream")
        print(
            "BENCH_JSON {\"issuance_per_s\":\(Int(issuance.perSecond)),\"issuance_limit_per_s\":\(issuanceFloor.isFinite ? "\(Int(issuanceFloor))" : "null"),"
                + "\"fetch_per_s\":\(Int(cached.perSecond)),\"fetch_limit_per_s\":\(cachedFloor.isFinite ? "\(Int(cachedFloor))" : "null"),"
                + "\"issuance_agent_cpu_ms\":\(String(format: "%.3f", issuance.agentCPUPerCall * 1000)),"
                + "\"fetch_agent_cpu_ms\":\(String(format: "%.3f", cached.agentCPUPerCall * 1000)),"
                + "\"kib_per_stream\":\(String(format: "%.2f", perStream)),\"rss_kib\":\(rssBefore)}")
    }
}

extension Bench {
    /// The storm: prints the numbers and a JSON line; throws (exit 1) if any client was not served.
    func runStorm(_ clients: Int, socket: String, tokens: TokenFactory, process: AgentProcess) async throws {
        let stormTokens = (0..<clients).map { tokens.token(namespace: "storm", serviceAccount: "sa-\($0)") }
        let cpu = process.cpuSeconds()
        let result = await Storm.run(socket: socket, tokens: stormTokens)
        let agentCPU = process.cpuSeconds() - cpu
        print("sds-agent storm (node restart: one connection per stream, all at once, each a new identity)")
        print(result.line("storm"))
        print(String(format: "  agent CPU %.2f s (%.3f ms per identity); agent RSS %d MiB with all streams open",
                     agentCPU, agentCPU * 1000 / Double(clients), process.residentKiB() / 1024))
        for (message, count) in result.failures.sorted(by: { $0.value > $1.value }) {
            print("  failed: \(count) x \(message)")
        }
        let p = { (q: Double) in result.latencies.isEmpty ? 0 : result.latencies[min(result.latencies.count - 1, Int(Double(result.latencies.count) * q))] * 1000 }
        print("BENCH_JSON {\"storm_clients\":\(clients),\"storm_served\":\(result.latencies.count),\"storm_failed\":\(result.failed),"
            + String(format: "\"storm_seconds\":%.3f,\"storm_p50_ms\":%.1f,\"storm_p99_ms\":%.1f}", result.seconds, p(0.5), p(0.99)))
        guard result.failed == 0 else { throw BenchError("\(result.failed) of \(clients) storm clients were not served") }
    }
}

/// The agent under test, started as a child process and stopped by its PID.
final class AgentProcess: Sendable {
    let process: Process

    init(binary: String, arguments: [String], socket: String) throws {
        process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        try process.run()
        // Bounded: `sds-agent check` waits for the socket to answer, at most 60 s.
        let check = Process()
        check.executableURL = URL(fileURLWithPath: binary)
        check.arguments = ["check", "--socket", socket, "--wait", "60s"]
        try check.run()
        check.waitUntilExit()
        guard check.terminationStatus == 0, process.isRunning else {
            stop()
            throw ValidationError("the agent did not start answering on \(socket)")
        }
    }

    /// CPU time (user + system) the agent has used so far, in seconds.
    func cpuSeconds() -> Double {
        let stat = (try? String(contentsOfFile: "/proc/\(process.processIdentifier)/stat", encoding: .utf8)) ?? ""
        // After "(comm)": field 3 is the state; utime and stime are fields 14 and 15.
        let fields = stat.split(separator: ")").last?.split(separator: " ") ?? []
        guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return .nan }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// VmRSS of the agent, in KiB.
    func residentKiB() -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(process.processIdentifier)/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return line.split(separator: " ").compactMap { Int($0) }.first ?? 0
    }

    func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGTERM)
        for _ in 0..<200 where process.isRunning { usleep(50_000) }  // up to 10 s, then SIGKILL
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }
}
