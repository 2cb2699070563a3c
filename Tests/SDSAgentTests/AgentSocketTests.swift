import EnvoyAPI
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SDSAgent
import TestSupport
import Testing

/// The whole agent over a real Unix domain socket (no Envoy: see Tests/EndToEnd for that).
@Suite(.timeLimit(.minutes(1))) struct AgentSocketTests {
    let tokens = TokenFactory()

    func configuration(in dir: String) throws -> AgentConfiguration {
        let jwks = dir + "/jwks.json"
        try tokens.jwksJSON().write(to: URL(fileURLWithPath: jwks))
        return AgentConfiguration(socketPath: dir + "/run/sds.sock", jwksFile: jwks, stateDirectory: dir + "/state")
    }

    @Test func servesOverTheSocketWithTheConfiguredMode() async throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = try configuration(in: dir)
        let token = tokens.token()
        let names = try await withAgent(config) {
            let attributes = try FileManager.default.attributesOfItem(atPath: config.socketPath)
            #expect((attributes[.posixPermissions] as? Int) == 0o660)
            let response = try await fetch(config.socketPath, names: ["default", "ROOTCA", "spiffe://cluster.local"], token: token)
            return try SDSTestClient.secrets(in: response).map(\.name).sorted()
        }
        #expect(names == ["ROOTCA", "default", "spiffe://cluster.local"])
    }

    @Test func aBadTokenGetsUnauthenticatedAndTheAgentKeepsServing() async throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = try configuration(in: dir)
        let good = tokens.token()
        let forged = TokenFactory(kid: tokens.kid).token()
        try await withAgent(config) {
            do {
                _ = try await fetch(config.socketPath, names: ["default"], token: forged)
                Issue.record("a forged token was served")
            } catch let error as RPCError {
                #expect(error.code == .unauthenticated)
            }
            let response = try await fetch(config.socketPath, names: ["default"], token: good)
            #expect(response.resources.count == 1)
        }
    }

    @Test func replacesAStaleSocketButNotARegularFile() async throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var staleConfig = try configuration(in: dir)
        staleConfig.socketMode = 0o600
        let config = staleConfig
        // A socket file left behind by a killed agent (bound, never listened, closed).
        try FileManager.default.createDirectory(atPath: dir + "/run", withIntermediateDirectories: true)
        try makeStaleSocket(at: config.socketPath)
        let token = tokens.token()
        try await withAgent(config) {
            let attributes = try FileManager.default.attributesOfItem(atPath: config.socketPath)
            #expect((attributes[.posixPermissions] as? Int) == 0o600)
            _ = try await fetch(config.socketPath, names: ["ROOTCA"], token: token)
        }

        var fileConfig = config
        fileConfig.socketPath = dir + "/not-a-socket"
        FileManager.default.createFile(atPath: fileConfig.socketPath, contents: Data("keep me".utf8))
        let agent = try await Agent.make(configuration: fileConfig, logger: TestPKI.quietLogger)
        await #expect(throws: ListenerError.self) { try await agent.run() }
        #expect(FileManager.default.contents(atPath: fileConfig.socketPath) == Data("keep me".utf8))
    }

    @Test func aBadJWKSFailsAtStartNamingTheFile() async throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var config = try configuration(in: dir)
        config.tokens.jwksFile = dir + "/missing.json"
        do {
            _ = try await Agent.make(configuration: config, logger: TestPKI.quietLogger)
            Issue.record("started without a JWKS")
        } catch {
            #expect("\(error)".contains("missing.json"))
        }
    }
}

/// Runs the agent until `body` returns, then cancels it.
@discardableResult
func withAgent<Result: Sendable>(
    _ configuration: AgentConfiguration, _ body: @Sendable @escaping () async throws -> Result
) async throws -> Result {
    let agent = try await Agent.make(configuration: configuration, logger: TestPKI.quietLogger)
    return try await withThrowingTaskGroup(of: Result?.self) { group in
        group.addTask { try await agent.run(); return nil }
        group.addTask {
            try await waitForSocket(configuration.socketPath)
            return try await body()
        }
        defer { group.cancelAll() }
        while let result = try await group.next() {
            if let result { return result }
        }
        throw CancellationError()
    }
}

/// FetchSecrets over the agent's socket; `extra` is added to the call's metadata.
func fetch(_ socket: String, names: [String], token: String?, extra: Metadata = [:]) async throws -> DiscoveryResponse {
    var metadata = SDSTestClient.metadata(token: token)
    metadata.add(contentsOf: extra)
    return try await withGRPCClient(transport: .http2NIOPosix(target: .unixDomainSocket(path: socket), transportSecurity: .plaintext)) {
        try await Envoy_Service_Secret_V3_SecretDiscoveryService.Client(wrapping: $0)
            .fetchSecrets(SDSTestClient.request(names), metadata: metadata)
    }
}

/// Waits until something accepts connections on `path` (a stale socket file does not count).
func waitForSocket(_ path: String) async throws {
    let deadline = ContinuousClock.now + .seconds(20)
    while !canConnect(path) {
        guard ContinuousClock.now < deadline else { throw CancellationError() }
        try await Task.sleep(for: .milliseconds(20))
    }
}

func withAddress<T>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { buffer in
        buffer.copyBytes(from: path.utf8)
        buffer[path.utf8.count] = 0
    }
    return withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
}

func canConnect(_ path: String) -> Bool {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    return withAddress(path) { connect(fd, $0, $1) } == 0
}

func makeStaleSocket(at path: String) throws {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    let result = withAddress(path) { bind(fd, $0, $1) }
    close(fd)
    guard result == 0 else { throw CancellationError() }
}
