import Crypto
import FoundationEssentials
import Logging
import MetricsTestKit
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import SDSModel
import TLSLinks
import Testing
import X509

/// Real handshakes between swift-nio-ssl ends on loopback, each end with its group list and its
/// guard: what each side reads of the key exchange, and who is refused under `pqc`.
@Suite struct KeyExchangeGuardTests {
    /// How one handshake ended, seen from the client, with each side's metrics.
    struct Run {
        var clientHandshake: Result<Void, any Error>
        var client: TestMetrics
        var server: TestMetrics

        var completed: Bool { (try? clientHandshake.get()) != nil }

        func handshakes(_ metrics: TestMetrics, group: String) -> Int64 {
            metrics.counterTotal(label: "sds_agent_tls_handshakes_total", dimensions: [("group", group)])
        }

        func refused(_ metrics: TestMetrics) -> Int64 { metrics.counterTotal(label: "sds_agent_tls_refused_total") }
    }

    @Test func bothEndsOursNegotiateTheHybridGroupAndSeeIt() async throws {
        let run = try await handshake(clientPolicy: .pqc, serverPolicy: .pqc)
        #expect(run.completed)
        #expect(run.handshakes(run.client, group: "X25519MLKEM768") == 1)
        #expect(run.handshakes(run.server, group: "X25519MLKEM768") == 1)
        #expect(run.refused(run.client) == 0 && run.refused(run.server) == 0)
    }

    @Test func aPQCClientRefusesAClassicalServerBeforeTheHandshakeEnds() async throws {
        let run = try await handshake(clientPolicy: .pqc, serverPolicy: .default, serverCurves: [.x25519])
        #expect(!run.completed)
        #expect(run.refused(run.client) == 1)
        // The server settled on x25519 and said so; the client never finished.
        #expect(run.handshakes(run.server, group: "x25519") == 1)
    }

    @Test func aPQCServerRefusesAClassicalClientWithAnAlert() async throws {
        let run = try await handshake(clientPolicy: .default, serverPolicy: .pqc, clientCurves: [.secp256r1])
        #expect(!run.completed)
        #expect(run.refused(run.server) == 1)
        // No ServerHello reached the client: it saw the alert, and no key exchange.
        #expect(run.handshakes(run.client, group: "secp256r1") == 0)
        let error = try #require(run.clientHandshake.failure)
        #expect("\(error)".contains("HANDSHAKE_FAILURE") || "\(error)".contains("handshake"), "\(error)")
    }

    @Test func theDefaultPolicyTakesAClassicalPeerAndCountsItsGroup() async throws {
        let run = try await handshake(clientPolicy: .default, serverPolicy: .default, serverCurves: [.secp384r1])
        #expect(run.completed)
        #expect(run.handshakes(run.client, group: "secp384r1") == 1)
        #expect(run.handshakes(run.server, group: "secp384r1") == 1)
    }

    @Test func aTLS12PeerIsReadFromItsServerKeyExchangeAndRefusedUnderPQC() async throws {
        let allowed = try await handshake(clientPolicy: .default, serverPolicy: .default, serverMaximum: .tlsv12)
        #expect(allowed.completed)
        #expect(allowed.handshakes(allowed.client, group: "x25519") == 1)
        let refused = try await handshake(clientPolicy: .pqc, serverPolicy: .default, serverMaximum: .tlsv12)
        #expect(!refused.completed)
        #expect(refused.refused(refused.client) == 1)
    }

    // MARK: - The pair

    private func handshake(
        clientPolicy: TLSPolicy, serverPolicy: TLSPolicy, clientCurves: [NIOTLSCurve]? = nil, serverCurves: [NIOTLSCurve]? = nil,
        serverMaximum: TLSVersion? = nil
    ) async throws -> Run {
        let (clientMetrics, serverMetrics) = (TestMetrics(), TestMetrics())
        let logger = Logger(label: "test") { _ in SwiftLogNoOpLogHandler() }
        let serverReport = KeyExchangeReport(link: "test_server", policy: serverPolicy, logger: logger, metrics: serverMetrics)
        let clientReport = KeyExchangeReport(link: "test_client", policy: clientPolicy, logger: logger, metrics: clientMetrics)
        let (chain, key) = try Self.serving()
        var serverTLS = TLSConfiguration.makeServerConfiguration(certificateChain: [.certificate(chain)], privateKey: .privateKey(key))
        serverTLS.curves = serverCurves
        serverTLS.maximumTLSVersion = serverMaximum
        let serverContext = try NIOSSLContext(configuration: serverTLS)
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: serverContext))
                    try channel.pipeline.syncOperations.addHandler(
                        KeyExchangeGuard(role: .server, policy: serverPolicy, report: serverReport), position: .first)
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        var clientTLS = TLSConfiguration.makeClientConfiguration()
        clientTLS.certificateVerification = .none
        clientTLS.curves = clientCurves
        let clientContext = try NIOSSLContext(configuration: clientTLS)
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let outcome = loop.makePromise(of: Void.self)
        // Bounded: a handshake on loopback takes milliseconds; the watch fails the promise on close.
        let limit = loop.scheduleTask(in: .seconds(10)) { outcome.fail(ChannelError.connectTimeout(.seconds(10))) }
        let client = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(KeyExchangeGuard(role: .client, policy: clientPolicy, report: clientReport))
                    try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: clientContext, serverHostname: nil))
                    try channel.pipeline.syncOperations.addHandler(HandshakeWatch(outcome: outcome))
                }
            }
            .connect(to: server.localAddress!).get()
        let result: Result<Void, any Error>
        do {
            try await outcome.futureResult.get()
            result = .success(())
        } catch {
            result = .failure(error)
        }
        limit.cancel()
        try? await client.close()
        try? await server.close()
        return Run(clientHandshake: result, client: clientMetrics, server: serverMetrics)
    }

    /// Completes `outcome` when the handshake ends, or fails it with the error or the close.
    private final class HandshakeWatch: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let outcome: EventLoopPromise<Void>
        private var done = false
        init(outcome: EventLoopPromise<Void>) { self.outcome = outcome }

        private func complete(_ result: Result<Void, any Error>) {
            guard !done else { return }
            done = true
            outcome.completeWith(result)
        }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case TLSUserEvent.handshakeCompleted = event { complete(.success(())) }
            context.fireUserInboundEventTriggered(event)
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { complete(.failure(error)) }
        func channelInactive(context: ChannelHandlerContext) { complete(.failure(ChannelError.ioOnClosedChannel)) }
    }

    /// A self-signed P-256 certificate for 127.0.0.1 (the client does not verify it).
    private static func serving() throws -> (NIOSSLCertificate, NIOSSLPrivateKey) {
        let key = P256.Signing.PrivateKey()
        let name = try DistinguishedName { CommonName("key-exchange-test") }
        let now = Date()
        let certificate = try Certificate(
            version: .v3, serialNumber: .init(), publicKey: .init(key.publicKey), notValidBefore: now - 60, notValidAfter: now + 3600,
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256, extensions: Certificate.Extensions(),
            issuerPrivateKey: .init(key))
        return (
            try NIOSSLCertificate(bytes: Array(try certificate.serializeAsPEM().pemString.utf8), format: .pem),
            try NIOSSLPrivateKey(bytes: Array(key.pemRepresentation.utf8), format: .pem)
        )
    }
}

extension Result {
    fileprivate var failure: Failure? {
        if case .failure(let error) = self { return error }
        return nil
    }
}
