import CertificateAuthority
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import IstioAPI
import SDSModel
import Synchronization
import TestSupport
import X509

/// Istio's CSR API as a mesh restart drives it (issue 24, section 6), against real `ca serve`
/// processes over one `cacerts` directory made by `ca init`:
///
/// - throughput: CSRs per second of one replica and its CPU per CSR, next to the ECDSA work it
///   does per CSR (the token's and the CSR's signature checks, the certificate's signature, the
///   check of the chain it issued: 3 verifications and 1 signature, from `openssl speed`), and
///   next to a no-work server on the same stack (gRPC over TLS, a canned answer) in the same run;
/// - a burst of CSRs from simulated agents (each with one connection per replica, round-robin)
///   against three replicas on 127.0.0.1, .2 and .3: failures, p50, p99;
/// - the node-restart storm in upstream mode: N identities at once through one agent whose
///   `--upstream-ca` lists the three replicas.
struct CSRBench {
    let agent: String
    let dir: String
    let tokens: TokenFactory
    let sign: Double
    let verify: Double

    struct Sizes {
        var csrs: Int
        var burst: Int
        var agents: Int
        var storm: Int
        var concurrency: Int
    }

    func run(_ sizes: Sizes, report: inout Report) async throws {
        let cacerts = dir + "/cacerts"
        try Self.exec(agent, ["ca", "init", cacerts, "--trust-domain", "cluster.local"])
        let root = cacerts + "/root-cert.pem"
        let port = Self.freePort()
        let hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        let replicas = try hosts.map { host in
            try AgentProcess(
                binary: agent,
                arguments: [
                    "ca", "serve", "--listen", "\(host):\(port)", "--trust-domain", "cluster.local", "--jwks", dir + "/jwks.json",
                    "--audience", TokenFactory.audience, "--ca-dir", cacerts, "--server-name", "localhost", "--log-level", "error",
                ], socket: nil)
        }
        defer { for replica in replicas { replica.stop() } }
        let requests = try Self.requests(sizes.csrs)
        let callTokens = (0..<max(sizes.csrs, sizes.burst)).map { tokens.token(namespace: "bench", serviceAccount: "csr-\($0)") }
        try await Self.waitForAnswer(host: hosts[0], port: port, root: root)

        // One replica: throughput and its CPU per CSR.
        let one = try await CSRClients.run(endpoints: [(hosts[0], port)], agents: 1, connections: 4, root: root) { clients in
            let cpu = replicas[0].cpuSeconds()
            var result = try await Load.run(calls: sizes.csrs, concurrency: sizes.concurrency) { i in
                _ = try await clients.call(requests[i % requests.count], token: callTokens[i], agent: 0, index: i)
            }
            result.agentCPUSeconds = replicas[0].cpuSeconds() - cpu
            return result
        }
        // The no-work server: the same calls, the same stack, a canned answer.
        let floor = try await withFloorCA(root: root, cacerts: cacerts, replicaPort: port) { floorPort, floorProcess in
            try await CSRClients.run(endpoints: [("127.0.0.1", floorPort)], agents: 1, connections: 4, root: root) { clients in
                let cpu = floorProcess.cpuSeconds()
                var result = try await Load.run(calls: sizes.csrs, concurrency: sizes.concurrency) { i in
                    _ = try await clients.call(requests[i % requests.count], token: callTokens[i], agent: 0, index: i)
                }
                result.agentCPUSeconds = floorProcess.cpuSeconds() - cpu
                return result
            }
        }
        // A burst from simulated agents over the three replicas.
        let endpoints = hosts.map { ($0, port) }
        let burst = try await CSRClients.run(endpoints: endpoints, agents: sizes.agents, connections: 1, root: root) { clients in
            try await Load.runCounting(calls: sizes.burst, concurrency: sizes.agents * 2) { i in
                _ = try await clients.call(requests[i % requests.count], token: callTokens[i], agent: i % sizes.agents, index: i / sizes.agents)
            }
        }
        let storm = try await upstreamStorm(sizes.storm, endpoints: endpoints, root: root)

        let crypto = 1 / sign + 3 / verify
        print("ca serve (Istio's CSR API over TLS; one replica, then three)")
        print(one.line("CSRs, one replica", limit: 2 / crypto, cryptoPerCall: crypto))
        print(floor.line("no-work server on the same stack (floor)", limit: .nan, cryptoPerCall: .nan))
        print(String(format: "  server CPU per CSR %.3f ms = %.1fx its ECDSA work (%.3f ms: 3 verifications, 1 signature); the stack alone %.3f ms",
                     one.agentCPUPerCall * 1000, one.agentCPUPerCall / crypto, crypto * 1000, floor.agentCPUPerCall * 1000))
        print(String(format: "  burst: %d CSRs from %d simulated agents over 3 replicas: %d failed; p50 %.1f ms, p99 %.1f ms, %.0f/s",
                     sizes.burst, sizes.agents, burst.failed, burst.result.percentile(0.5) * 1000, burst.result.percentile(0.99) * 1000,
                     burst.result.perSecond))
        print(storm.line("upstream storm: one agent, its --upstream-ca the 3 replicas"))
        report["csr_per_second"] = one.perSecond
        report["csr_server_cpu_ms"] = one.agentCPUPerCall * 1000
        report["csr_crypto_ms"] = crypto * 1000
        report["csr_cpu_over_crypto"] = one.agentCPUPerCall / crypto
        report["csr_floor_cpu_ms"] = floor.agentCPUPerCall * 1000
        report["csr_burst"] = Double(sizes.burst)
        report["csr_burst_failed"] = Double(burst.failed)
        report["csr_burst_p50_ms"] = burst.result.percentile(0.5) * 1000
        report["csr_burst_p99_ms"] = burst.result.percentile(0.99) * 1000
        report["upstream_storm_clients"] = Double(sizes.storm)
        report["upstream_storm_failed"] = Double(storm.failed)
        report["upstream_storm_p99_ms"] = storm.latencies.isEmpty ? .nan : storm.latencies[min(storm.latencies.count - 1, Int(Double(storm.latencies.count) * 0.99))] * 1000
        if burst.failed > 0 || storm.failed > 0 {
            throw BenchError("CSRs failed: \(burst.failed) in the burst, \(storm.failed) in the upstream storm")
        }
    }

    /// N identities at once through an agent in upstream mode (forward credentials).
    private func upstreamStorm(_ clients: Int, endpoints: [(String, Int)], root: String) async throws -> Storm.Result {
        let socket = dir + "/upstream.sock"
        let process = try AgentProcess(
            binary: agent,
            arguments: [
                "serve", "--socket", socket, "--jwks", dir + "/jwks.json", "--state-dir", dir + "/upstream-state", "--log-level", "error",
                "--upstream-ca", endpoints.map { "\($0.0):\($0.1)" }.joined(separator: ","), "--upstream-ca-bundle", root,
                "--upstream-ca-server-name", "localhost",
            ], socket: socket)
        defer { process.stop() }
        let stormTokens = (0..<clients).map { tokens.token(namespace: "upstream-storm", serviceAccount: "sa-\($0)") }
        return await Storm.run(socket: socket, tokens: stormTokens)
    }

    /// The bench binary itself as the no-work CA (`--floor-ca`), with a TLS certificate from the
    /// same CA as the replicas'.
    private func withFloorCA<R: Sendable>(
        root: String, cacerts: String, replicaPort: Int, _ body: (Int, AgentProcess) async throws -> R
    ) async throws -> R {
        let authority = try RootCAStore.load(caDirectory: cacerts)
        let (chain, key) = try authority.issueServingCertificate(names: ["localhost"], ttl: .seconds(3600), now: Date())
        let tlsDir = dir + "/floor-tls"
        try FileManager.default.createDirectory(atPath: tlsDir, withIntermediateDirectories: true)
        try chain.map { try $0.pem() }.joined().write(toFile: tlsDir + "/chain.pem", atomically: true, encoding: .utf8)
        try KeyFactory.pem(of: key).write(toFile: tlsDir + "/key.pem", atomically: true, encoding: .utf8)
        // A real answer to replay.
        let answer = try await CSRClients.run(endpoints: [("127.0.0.1", replicaPort)], agents: 1, connections: 1, root: root) {
            try await $0.call(try Self.requests(1)[0], token: tokens.token(namespace: "bench", serviceAccount: "canned"), agent: 0, index: 0)
        }
        try Data(try answer.serializedBytes() as [UInt8]).write(to: URL(fileURLWithPath: tlsDir + "/answer.bin"))
        let port = Self.freePort()
        let floor = try AgentProcess(
            binary: URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path,
            arguments: ["--agent", agent, "--floor-ca", "127.0.0.1:\(port)", "--floor-ca-dir", tlsDir], socket: nil)
        defer { floor.stop() }
        try await Self.waitForAnswer(host: "127.0.0.1", port: port, root: root)
        return try await body(port, floor)
    }

    // MARK: - Helpers

    static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// `count` CSR requests, each with a fresh P-256 key (made before the timed part).
    static func requests(_ count: Int) throws -> [Istio_V1_Auth_IstioCertificateRequest] {
        let identity = try SPIFFEID(parsing: "spiffe://cluster.local/ns/bench/sa/csr")
        return try (0..<max(1, min(count, 2000))).map { _ in
            var request = Istio_V1_Auth_IstioCertificateRequest()
            request.csr = try KeyFactory.makeCSR(for: identity, key: KeyFactory.generate(.ecP256)).pem()
            request.validityDuration = 3600
            return request
        }
    }

    static func exec(_ binary: String, _ arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw BenchError("\(binary) \(arguments.joined(separator: " ")) failed") }
    }

    /// Waits (at most 30 s) until a CA on `host:port` answers a call (any status but unavailable).
    static func waitForAnswer(host: String, port: Int, root: String) async throws {
        let deadline = ContinuousClock.now + .seconds(30)
        while ContinuousClock.now < deadline {
            let answered = (try? await CSRClients.run(endpoints: [(host, port)], agents: 1, connections: 1, root: root) { clients in
                do {
                    _ = try await clients.call(Istio_V1_Auth_IstioCertificateRequest(), token: "none", agent: 0, index: 0)
                } catch let error as RPCError where error.code == .unavailable {
                    return false
                } catch {}
                return true
            }) ?? false
            if answered { return }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw BenchError("no CA answered on \(host):\(port) within 30 s")
    }
}

/// gRPC clients of the CSR API: per simulated agent, one client per endpoint (each its own
/// connection) times `connections`.
struct CSRClients: Sendable {
    let clients: [[GRPCClient<HTTP2ClientTransport.Posix>]]

    static func run<R: Sendable>(
        endpoints: [(String, Int)], agents: Int, connections: Int, root: String, _ body: @Sendable (CSRClients) async throws -> R
    ) async throws -> R {
        let clients = try (0..<agents).map { _ in
            try endpoints.flatMap { host, port in
                try (0..<connections).map { _ in
                    GRPCClient(
                        transport: try HTTP2ClientTransport.Posix(
                            target: .ipv4(address: host, port: port),
                            transportSecurity: .tls { tls in
                                tls.trustRoots = .certificates([.file(path: root, format: .pem)])
                                tls.serverCertificateVerification = .noHostnameVerification
                            }))
                }
            }
        }
        return try await withThrowingTaskGroup(of: Void.self) { group in
            for client in clients.joined() { group.addTask { try await client.runConnections() } }
            defer {
                for client in clients.joined() { client.beginGracefulShutdown() }
            }
            return try await body(CSRClients(clients: clients))
        }
    }

    /// One CreateCertificate call by simulated agent `agent` (its `index`th call picks the client).
    func call(_ request: Istio_V1_Auth_IstioCertificateRequest, token: String, agent: Int, index: Int) async throws
        -> Istio_V1_Auth_IstioCertificateResponse
    {
        let mine = clients[agent]
        let ca = Istio_V1_Auth_IstioCertificateService.Client(wrapping: mine[index % mine.count])
        var options = CallOptions.defaults
        options.timeout = .seconds(30)
        return try await ca.createCertificate(
            request, metadata: ["authorization": "Bearer \(token)", "clusterid": "Kubernetes"], options: options)
    }
}

/// The no-work CA: answers every CreateCertificate with one canned answer, over TLS.
struct FloorCA: Istio_V1_Auth_IstioCertificateService.SimpleServiceProtocol {
    let answer: Istio_V1_Auth_IstioCertificateResponse

    func createCertificate(request: Istio_V1_Auth_IstioCertificateRequest, context: ServerContext) async throws
        -> Istio_V1_Auth_IstioCertificateResponse
    {
        answer
    }

    static func serve(listen: String, directory: String) async throws {
        guard let address = HostPort(listen) else { throw BenchError("--floor-ca \(listen) is not HOST:PORT") }
        let answer = try Istio_V1_Auth_IstioCertificateResponse(serializedBytes: Array(try Data(contentsOf: URL(fileURLWithPath: directory + "/answer.bin"))))
        let server = GRPCServer(
            transport: HTTP2ServerTransport.Posix(
                address: .ipv4(host: address.host, port: address.port),
                transportSecurity: .tls(
                    certificateChain: [.file(path: directory + "/chain.pem", format: .pem)],
                    privateKey: .file(path: directory + "/key.pem", format: .pem))),
            services: [FloorCA(answer: answer)])
        try await server.serve()
    }
}

extension Load {
    /// Like ``run(calls:concurrency:_:)``, but a failed call is counted, not thrown.
    static func runCounting(calls: Int, concurrency: Int, _ operation: @escaping @Sendable (Int) async throws -> Void) async throws
        -> (result: LoadResult, failed: Int)
    {
        let failed = Mutex(0)
        let result = try await run(calls: calls, concurrency: concurrency) { i in
            do {
                try await operation(i)
            } catch {
                failed.withLock { $0 += 1 }
            }
        }
        return (result, failed.withLock { $0 })
    }
}
