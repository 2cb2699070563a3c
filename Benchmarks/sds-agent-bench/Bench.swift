import ArgumentParser
import EnvoyAPI
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Synchronization
import TestSupport

/// Measures a real `sds-agent serve` process over its Unix socket and prints the numbers next
/// to the machine's own limit (`openssl speed ecdsap256` on the same run).
///
/// - issuance: first FetchSecrets for N distinct identities (token check, P-256 key, CSR, CA
///   signature, PEM) — identities per second and latency;
/// - cached: FetchSecrets for an identity already issued (token check + response);
/// - streams: S open StreamSecrets streams, the agent's resident memory per stream;
/// - the framework floor: the same cached fetches (and, with `--storm`, the same storm) against a
///   no-work server on the same stack (`FloorService`), in the same run;
/// - rotation fan-out: S open streams, a root rotation (SIGUSR1): time to the last bundle push,
///   then (after the 1 s activation delay) to the last renewed certificate;
/// - footprint: the binary's size, the idle agent's RSS; start to serving with a state directory.
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

    @Option(help: "Streams (one identity each) open during the root rotation whose fan-out is timed.")
    var rotationStreams = 1000

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

    @Option(help: "Write the results as JSON (machine, commit, date, numbers) to this file.")
    var jsonOut: String?

    @Option(help: "The commit measured (for the JSON).")
    var commit: String?

    @Option(help: "Restarts of the agent on its state directory, timed from exec to the first certificate served.")
    var startRuns = 5

    @Flag(help: "Instead of the phases above: Istio's CSR API of `ca serve` (throughput and CPU per CSR of one replica next to its ECDSA work and to a no-work server, a burst from simulated agents over three replicas, and a storm through an agent in upstream mode).")
    var csrApi = false

    @Option(help: "With --csr-api: CSRs timed against one replica.")
    var csrs = 5000

    @Option(help: "With --csr-api: CSRs in the burst over three replicas.")
    var burst = 10000

    @Option(help: "With --csr-api: simulated agents in the burst (one connection to each replica each).")
    var simulatedAgents = 20

    @Option(help: "With --csr-api: identities at once through one agent in upstream mode.")
    var upstreamStorm = 1000

    @Option(help: "Instead of the phases above: issuance with the CA key in a PKCS#11 token against a file key: FILE-CERT,FILE-KEY,TOKEN-CERT,TOKEN-URI (scripts/bench.sh --pkcs11 makes them).")
    var caKeys: String?

    @Option(help: .hidden)
    var floorCa: String?

    @Option(help: .hidden)
    var floorCaDir: String?

    @Option(help: .hidden)
    var floorServer: String?

    @Option(help: .hidden)
    var floorResponse: String?

    func run() async throws {
        if let floorServer, let floorResponse {
            try await FloorService.serve(socket: floorServer, responseFile: floorResponse)
            return
        }
        if let floorCa, let floorCaDir {
            try await FloorCA.serve(listen: floorCa, directory: floorCaDir)
            return
        }
        if let caKeys {
            let parts = caKeys.split(separator: ",", maxSplits: 3).map(String.init)
            guard parts.count == 4 else { throw BenchError("--ca-keys wants FILE-CERT,FILE-KEY,TOKEN-CERT,TOKEN-URI") }
            var report = Report(smoke: smoke, commit: commit, sign: signPerSecond, verify: verifyPerSecond)
            try await CAKeyBench(count: smoke ? 50 : 2000, concurrency: concurrency)
                .run(fileCA: (parts[0], parts[1]), tokenCA: (parts[2], parts[3]), report: &report)
            try report.emit(to: jsonOut)
            return
        }
        let sizes = smoke
            ? (identities: 40, fetches: 200, streams: 60, rotation: 40)
            : (identities: identities, fetches: fetches, streams: streams, rotation: min(rotationStreams, identities))
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sds-bench-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let tokens = TokenFactory()
        let jwks = dir + "/jwks.json"
        try tokens.jwksJSON().write(to: URL(fileURLWithPath: jwks))
        let socket = dir + "/sds.sock"
        var report = Report(smoke: smoke, commit: commit, sign: signPerSecond, verify: verifyPerSecond)
        if csrApi {
            let bench = CSRBench(agent: agent, dir: dir, tokens: tokens, sign: signPerSecond ?? .nan, verify: verifyPerSecond ?? .nan)
            let sizes = smoke
                ? CSRBench.Sizes(csrs: 200, burst: 300, agents: 4, storm: 100, concurrency: concurrency)
                : CSRBench.Sizes(csrs: csrs, burst: burst, agents: simulatedAgents, storm: upstreamStorm, concurrency: concurrency)
            try await bench.run(sizes, report: &report)
            try report.emit(to: jsonOut)
            return
        }

        let serveArguments = [
            "serve", "--socket", socket, "--jwks", jwks, "--state-dir", dir + "/state", "--log-level", storm == nil ? "error" : "warning",
            "--ca-activation-delay", "1s",
        ] + agentArg
        let process = try AgentProcess(binary: agent, arguments: serveArguments, socket: socket)
        defer { process.stop() }
        report["binary_mib"] = Double((try? FileManager.default.attributesOfItem(atPath: agent)[.size] as? Int) ?? 0) / 1_048_576
        try await Task.sleep(for: .seconds(1))  // let start-up work settle: this is the idle agent
        report["idle_rss_mib"] = Double(process.residentKiB()) / 1024
        report["idle_rss_anon_mib"] = Double(process.residentKiB("RssAnon")) / 1024
        report["idle_rss_file_mib"] = Double(process.residentKiB("RssFile")) / 1024
        if let storm {
            try await runStorm(storm, socket: socket, tokens: tokens, process: process, dir: dir, report: &report)
            return
        }

        let issuanceTokens = (0..<sizes.identities).map { tokens.token(namespace: "bench", serviceAccount: "sa-\($0)") }
        let clients = try SDSClients(socket: socket, count: max(1, sizes.streams / 50))
        let cannedFile = dir + "/canned.bin"
        let (issuance, cached, rssBefore, perStream) = try await clients.run { clients in
            var cpu = process.cpuSeconds()
            var issuance = try await Load.run(calls: issuanceTokens.count, concurrency: concurrency) { i in
                try await clients.fetch(token: issuanceTokens[i], on: i)
            }
            issuance.agentCPUSeconds = process.cpuSeconds() - cpu
            let cachedToken = issuanceTokens[0]
            try Data(try await clients.fetchResponse(token: cachedToken).serializedBytes() as [UInt8]).write(to: URL(fileURLWithPath: cannedFile))
            cpu = process.cpuSeconds()
            var cached = try await Load.run(calls: sizes.fetches, concurrency: concurrency) { i in
                try await clients.fetch(token: cachedToken, on: i)
            }
            cached.agentCPUSeconds = process.cpuSeconds() - cpu
            // Measured after the warm-up above, so the heap is already grown: this is what
            // each further open stream costs.
            let before = process.residentKiB()
            let perStream = try await Self.kibPerStream(socket: socket, tokens: issuanceTokens, streams: sizes.streams, of: process, from: before)
            return (issuance, cached, before, perStream)
        }

        // The same cached fetches against the no-work server on the same stack.
        let (floor, floorPerStream) = try await withFloorServer(dir: dir, canned: cannedFile) { floorSocket, floorProcess in
            let floorClients = try SDSClients(socket: floorSocket, count: max(1, sizes.streams / 50))
            return try await floorClients.run { clients in
                let cpu = floorProcess.cpuSeconds()
                var result = try await Load.run(calls: sizes.fetches, concurrency: concurrency) { i in
                    try await clients.fetch(token: issuanceTokens[0], on: i)
                }
                result.agentCPUSeconds = floorProcess.cpuSeconds() - cpu
                let perStream = try await Self.kibPerStream(
                    socket: floorSocket, tokens: issuanceTokens, streams: sizes.streams, of: floorProcess, from: floorProcess.residentKiB())
                return (result, perStream)
            }
        }

        // Rotation fan-out: every open stream gets the new bundle, then its renewed certificate.
        // One connection per stream, as Envoy opens them.
        let rotationClients = try SDSClients(socket: socket, count: sizes.rotation)
        let rotation = try await rotationClients.run { clients in
            try await clients.rotation(sizes.rotation, tokens: issuanceTokens) { kill(process.process.processIdentifier, SIGUSR1) }
        }
        process.stop()
        let starts = try await measureStarts(arguments: serveArguments, socket: socket, token: issuanceTokens[0], runs: smoke ? 1 : startRuns)

        let cores = ProcessInfo.processInfo.activeProcessorCount
        // Per issuance: a key pair, the CSR's signature, the CA's signature (≈ 3 signs), and the
        // token's and the CSR's signature checks (2 verifies): the least any agent does. This one
        // also verifies the chain it issued before it leaves the CA (a third verify, by design):
        // both references are printed. A cached fetch: 1 verify, or none when the verified-token
        // cache holds the token.
        let sign = signPerSecond ?? .nan, verify = verifyPerSecond ?? .nan
        let issuanceECDSA = 3 / sign + 2 / verify, issuanceECDSAWithChainCheck = 3 / sign + 3 / verify
        let issuanceFloor = Double(cores) / issuanceECDSA
        let cachedFloor = Double(cores) * verify
        print("sds-agent benchmark\(smoke ? " (smoke sizes: numbers mean little)" : "")")
        print(
            sign.isFinite
                ? "  machine: \(cores) cores; openssl speed ecdsap256: \(Int(sign)) sign/s, \(Int(verify)) verify/s per core"
                : "  machine: \(cores) cores; no openssl numbers given (scripts/bench.sh passes them)")
        print(issuance.line("issuance (new identity)", limit: issuanceFloor, cryptoPerCall: issuanceECDSA))
        print(String(format: "  issuance vs ECDSA: %.2fx its least ECDSA work (3 signs, 2 verifies); %.2fx the ECDSA it does with the issued chain verified (%.3f ms)",
                     issuance.agentCPUPerCall / issuanceECDSA, issuance.agentCPUPerCall / issuanceECDSAWithChainCheck, issuanceECDSAWithChainCheck * 1000))
        print(String(format: "  issuance above the floor's unary call: %.3f ms (%.2fx the ECDSA it does)",
                     (issuance.agentCPUPerCall - floor.agentCPUPerCall) * 1000,
                     (issuance.agentCPUPerCall - floor.agentCPUPerCall) / issuanceECDSAWithChainCheck))
        print(cached.line("fetch (cached identity)", limit: cachedFloor, cryptoPerCall: 1 / verify))
        print(floor.line("fetch, no-work server (floor)", limit: .nan, cryptoPerCall: .nan))
        print(String(format: "  cached fetch vs floor: %.2fx the floor's server CPU per call", cached.agentCPUPerCall / floor.agentCPUPerCall))
        print("  streams: \(sizes.streams) open; agent RSS \(rssBefore / 1024) MiB before, \(String(format: "%.1f", perStream)) KiB per stream; the no-work server on the same stack: \(String(format: "%.1f", floorPerStream)) KiB per stream")
        let last = { (values: [Double]) in (values.last ?? .nan) * 1000 }
        let fanOut = last(rotation.certificate) - (rotation.certificate.first ?? .nan) * 1000
        print(String(format: "  rotation fan-out (%d streams, one identity each): every stream has the new bundle %.0f ms after SIGUSR1; renewed certificates reach every stream within %.0f ms of the first (%.0f to %.0f ms after SIGUSR1, the activation delay and its 1 s tick included)",
                     sizes.rotation, last(rotation.bundle), fanOut, (rotation.certificate.first ?? .nan) * 1000, last(rotation.certificate)))
        print(String(format: "  footprint: binary %.1f MiB, idle RSS %.1f MiB (%.1f MiB anonymous, %.1f MiB of the binary's pages mapped); start to first certificate (state directory present): median %.1f ms of %d",
                     report["binary_mib"] ?? .nan, report["idle_rss_mib"] ?? .nan, report["idle_rss_anon_mib"] ?? .nan,
                     report["idle_rss_file_mib"] ?? .nan, starts[starts.count / 2] * 1000, starts.count))
        report["issuance_per_s"] = issuance.perSecond
        report["issuance_limit_per_s"] = issuanceFloor
        report["issuance_agent_cpu_ms"] = issuance.agentCPUPerCall * 1000
        report["issuance_ecdsa_ms"] = issuanceECDSA * 1000
        report["issuance_ecdsa_with_chain_check_ms"] = issuanceECDSAWithChainCheck * 1000
        report["fetch_per_s"] = cached.perSecond
        report["fetch_agent_cpu_ms"] = cached.agentCPUPerCall * 1000
        report["fetch_p50_ms"] = cached.percentile(0.5) * 1000
        report["floor_fetch_per_s"] = floor.perSecond
        report["floor_fetch_server_cpu_ms"] = floor.agentCPUPerCall * 1000
        report["kib_per_stream"] = perStream
        report["floor_kib_per_stream"] = floorPerStream
        report["rss_mib_before_streams"] = Double(rssBefore) / 1024
        report["rotation_streams"] = Double(sizes.rotation)
        report["rotation_bundle_last_ms"] = last(rotation.bundle)
        report["rotation_certificate_first_ms"] = (rotation.certificate.first ?? .nan) * 1000
        report["rotation_certificate_last_ms"] = last(rotation.certificate)
        report["rotation_renewal_fanout_ms"] = fanOut
        report["start_to_serving_ms"] = starts[starts.count / 2] * 1000
        try report.emit(to: jsonOut)
    }

    /// What each further open stream costs the server, as Envoy opens them: `streams` clients, each
    /// on its own connection with its own StreamSecrets (identities already issued), all held open
    /// while the server's RSS is read; `before` is its RSS with none open.
    static func kibPerStream(socket: String, tokens: [String], streams: Int, of process: AgentProcess, from before: Int) async throws -> Double {
        let during = Mutex(0)
        let held = await Storm.run(socket: socket, tokens: (0..<streams).map { tokens[$0 % tokens.count] }, timeout: .seconds(300)) {
            during.withLock { $0 = process.residentKiB() }
        }
        guard held.failed == 0 else {
            throw BenchError("only \(held.latencies.count) of \(streams) streams were served: \(held.failures)")
        }
        return Double(during.withLock { $0 } - before) / Double(streams)
    }

    /// Runs the no-work server (this binary, `--floor-server`) around `body`, stopped by its PID.
    func withFloorServer<R: Sendable>(
        dir: String, canned: String, _ body: (String, AgentProcess) async throws -> R
    ) async throws -> R {
        let floorSocket = dir + "/floor.sock"
        let floor = try AgentProcess(
            binary: URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path,
            arguments: ["--agent", agent, "--floor-server", floorSocket, "--floor-response", canned], socket: nil)
        defer { floor.stop() }
        try await waitForFirstCertificate(socket: floorSocket, token: "none", within: .seconds(30))
        return try await body(floorSocket, floor)
    }

    /// Seconds from exec to the first certificate served, `runs` times, sorted; the state
    /// directory (root, key) is already there, as on every restart after the first.
    func measureStarts(arguments: [String], socket: String, token: String, runs: Int) async throws -> [Double] {
        var times: [Double] = []
        for _ in 0..<max(1, runs) {
            let clock = ContinuousClock()
            let began = clock.now
            let process = try AgentProcess(binary: agent, arguments: arguments, socket: nil)
            defer { process.stop() }
            try await waitForFirstCertificate(socket: socket, token: token, within: .seconds(30))
            let elapsed = began.duration(to: clock.now)
            times.append(Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18)
            process.stop()
        }
        return times.sorted()
    }

    /// Polls (every millisecond, bounded) until a FetchSecrets on `socket` is answered.
    func waitForFirstCertificate(socket: String, token: String, within limit: Duration) async throws {
        let clock = ContinuousClock()
        let deadline = clock.now + limit
        while clock.now < deadline {
            if FileManager.default.fileExists(atPath: socket),
                let clients = try? SDSClients(socket: socket, count: 1),
                (try? await clients.run({ clients in try await clients.fetch(token: token, on: 0, timeout: .seconds(2)) })) != nil
            {
                return
            }
            try await Task.sleep(for: .milliseconds(1))
        }
        throw BenchError("nothing answered on \(socket) within \(limit)")
    }
}

/// The numbers of one run, printed as a JSON line and written to `--json-out` with the machine,
/// the commit and the date.
struct Report {
    var smoke: Bool
    var commit: String?
    var sign: Double?
    var verify: Double?
    private var values: [(String, Double)] = []

    init(smoke: Bool, commit: String?, sign: Double?, verify: Double?) {
        self.smoke = smoke
        self.commit = commit
        self.sign = sign
        self.verify = verify
    }

    subscript(key: String) -> Double? {
        get { values.first { $0.0 == key }?.1 }
        set {
            values.removeAll { $0.0 == key }
            if let newValue { values.append((key, newValue)) }
        }
    }

    func emit(to path: String?) throws {
        let numbers = values.map { "\"\($0.0)\":\($0.1.isFinite ? String(format: "%.3f", $0.1) : "null")" }.joined(separator: ",")
        print("BENCH_JSON {\(numbers)}")
        guard let path else { return }
        let cpu = ((try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? "").split(separator: "\n")
            .first { $0.hasPrefix("model name") }?.split(separator: ":", maxSplits: 1).last.map { $0.trimmingCharacters(in: .whitespaces) } ?? "unknown"
        var uts = utsname()
        uname(&uts)
        let kernel = withUnsafeBytes(of: &uts.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let object: [String: Any] = [
            "date": ISO8601DateFormatter().string(from: Date()), "commit": commit ?? "unknown", "smoke": smoke,
            "machine": ["cores": ProcessInfo.processInfo.activeProcessorCount, "cpu": cpu, "kernel": kernel,
                        "memory_gib": Double(ProcessInfo.processInfo.physicalMemory) / 1_073_741_824],
            "openssl_speed_ecdsap256": ["sign_per_s": sign ?? 0, "verify_per_s": verify ?? 0],
            "results": Dictionary(uniqueKeysWithValues: values.map { ($0.0, $0.1.isFinite ? $0.1 as Any : NSNull()) }),
        ]
        let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
        try FileManager.default.createDirectory(
            atPath: URL(fileURLWithPath: path).deletingLastPathComponent().path, withIntermediateDirectories: true)
        try data.write(to: URL(fileURLWithPath: path))
        print("results written to \(path)")
    }
}

extension Bench {
    /// The storm: prints the numbers and a JSON line; throws (exit 1) if any client was not served.
    func runStorm(_ clients: Int, socket: String, tokens: TokenFactory, process: AgentProcess, dir: String, report: inout Report) async throws {
        let stormTokens = (0..<clients).map { tokens.token(namespace: "storm", serviceAccount: "sa-\($0)") }
        // The floor first: the same clients against the no-work server, with a real response.
        let cannedFile = dir + "/canned.bin"
        let probe = try SDSClients(socket: socket, count: 1)
        let canned = try await probe.run { clients in try await clients.fetchResponse(token: tokens.token(namespace: "storm", serviceAccount: "canned")) }
        try Data(try canned.serializedBytes() as [UInt8]).write(to: URL(fileURLWithPath: cannedFile))
        let floor = try await withFloorServer(dir: dir, canned: cannedFile) { floorSocket, _ in
            await Storm.run(socket: floorSocket, tokens: stormTokens)
        }
        let cpu = process.cpuSeconds()
        let result = await Storm.run(socket: socket, tokens: stormTokens)
        let agentCPU = process.cpuSeconds() - cpu
        print("sds-agent storm (node restart: one connection per stream, all at once, each a new identity)")
        print(floor.line("storm, no-work server (floor)"))
        print(result.line("storm"))
        print(String(format: "  storm vs floor: %.2fx the floor's time", result.seconds / floor.seconds))
        print(String(format: "  agent CPU %.2f s (%.3f ms per identity); agent RSS %d MiB with all streams open",
                     agentCPU, agentCPU * 1000 / Double(clients), process.residentKiB() / 1024))
        for (message, count) in result.failures.sorted(by: { $0.value > $1.value }) {
            print("  failed: \(count) x \(message)")
        }
        let p = { (q: Double) in result.latencies.isEmpty ? 0 : result.latencies[min(result.latencies.count - 1, Int(Double(result.latencies.count) * q))] * 1000 }
        report["storm_clients"] = Double(clients)
        report["storm_served"] = Double(result.latencies.count)
        report["storm_failed"] = Double(result.failed)
        report["storm_seconds"] = result.seconds
        report["storm_p50_ms"] = p(0.5)
        report["storm_p99_ms"] = p(0.99)
        report["storm_floor_seconds"] = floor.seconds
        report["storm_floor_failed"] = Double(floor.failed)
        report["storm_agent_cpu_ms_per_identity"] = agentCPU * 1000 / Double(clients)
        try report.emit(to: jsonOut)
        guard result.failed == 0 else { throw BenchError("\(result.failed) of \(clients) storm clients were not served") }
    }
}

/// The agent under test, started as a child process and stopped by its PID.
final class AgentProcess: Sendable {
    let process: Process

    /// Starts `binary`; with a `socket`, waits (bounded) for `sds-agent check` to pass on it.
    init(binary: String, arguments: [String], socket: String?) throws {
        process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        try process.run()
        guard let socket else { return }
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

    /// VmRSS of the agent (or another field of /proc/PID/status, e.g. RssAnon), in KiB.
    func residentKiB(_ field: String = "VmRSS") -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(process.processIdentifier)/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix(field + ":") } ?? ""
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
