import Crypto
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import SwiftASN1
import Synchronization
import X509

/// A local HTTPS server that answers like the Kubernetes API server, for the paths the agent
/// calls (OIDC discovery, JWKS, TokenReview). There is no API server on these machines; this
/// stands in for it so that the agent's real HTTPS client, TLS trust and JSON shapes are tested.
/// Its certificate is issued for 127.0.0.1 by a CA of its own, written to ``caFile``.
public final class FakeAPIServer: Sendable {
    public struct Request: Sendable {
        public var method: String
        public var path: String
        public var authorization: String?
        public var body: Data
    }

    public struct Response: Sendable {
        public var status: Int
        public var body: Data
        public init(status: Int = 200, body: Data) {
            self.status = status
            self.body = body
        }
        public static func json(_ object: Any, status: Int = 200) -> Response {
            Response(status: status, body: try! JSONSerialization.data(withJSONObject: object))
        }
    }

    public typealias Handler = @Sendable (Request) -> Response

    /// The handler and the requests seen, shared with the connections' handlers.
    private final class State: Sendable {
        let value: Mutex<(handler: Handler, requests: [Request])>
        init(_ handler: @escaping Handler) { value = Mutex((handler, [])) }
    }

    private let state: State
    private let channel: any Channel
    /// PEM of the CA that issued the server's certificate.
    public let caFile: String
    /// `https://127.0.0.1:<port>`.
    public let url: String

    /// Starts listening on a free loopback port; files go into `directory`.
    public init(directory: String, handler: @escaping Handler) async throws {
        let (caPEM, chain, key) = try Self.makeCertificates()
        caFile = directory + "/fake-apiserver-ca.pem"
        try caPEM.write(toFile: caFile, atomically: true, encoding: .utf8)
        let tls = try NIOSSLContext(
            configuration: .makeServerConfiguration(certificateChain: [.certificate(chain)], privateKey: .privateKey(key)))
        let state = State(handler)
        self.state = state
        channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls))
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(RequestHandler(state: state))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        url = "https://127.0.0.1:\(channel.localAddress!.port!)"
    }

    /// Replaces how requests are answered.
    public func setHandler(_ handler: @escaping Handler) {
        state.value.withLock { $0.handler = handler }
    }

    /// Every request so far.
    public var requests: [Request] { state.value.withLock { $0.requests } }

    public func stop() async {
        try? await channel.close()
    }

    private final class RequestHandler: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let state: State
        var head: HTTPRequestHead?
        var body = Data()

        init(state: State) {
            self.state = state
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let head):
                self.head = head
                body = Data()
            case .body(let buffer):
                body.append(contentsOf: buffer.readableBytesView)
            case .end:
                guard let head else { return }
                let request = Request(
                    method: "\(head.method)", path: head.uri, authorization: head.headers.first(name: "authorization"), body: body)
                let handler = state.value.withLock { state in
                    state.requests.append(request)
                    return state.handler
                }
                let response = handler(request)
                var headers = HTTPHeaders()
                headers.add(name: "Content-Type", value: "application/json")
                headers.add(name: "Content-Length", value: "\(response.body.count)")
                context.write(
                    wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .init(statusCode: response.status), headers: headers))),
                    promise: nil)
                context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(bytes: response.body)))), promise: nil)
                context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            }
        }
    }

    private static func makeCertificates() throws -> (String, NIOSSLCertificate, NIOSSLPrivateKey) {
        let now = Date()
        let caKey = P256.Signing.PrivateKey()
        let caName = try DistinguishedName { CommonName("fake-apiserver-ca") }
        let ca = try Certificate(
            version: .v3, serialNumber: .init(), publicKey: .init(caKey.publicKey), notValidBefore: now - 60,
            notValidAfter: now + 3600, issuer: caName, subject: caName, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true))
            },
            issuerPrivateKey: .init(caKey))
        let key = P256.Signing.PrivateKey()
        let leaf = try Certificate(
            version: .v3, serialNumber: .init(), publicKey: .init(key.publicKey), notValidBefore: now - 60,
            notValidAfter: now + 3600, issuer: caName, subject: try DistinguishedName { CommonName("kube-apiserver") },
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                SubjectAlternativeNames([.ipAddress(ASN1OctetString(contentBytes: [127, 0, 0, 1])), .dnsName("localhost")])
                try ExtendedKeyUsage([.serverAuth])
            },
            issuerPrivateKey: .init(caKey))
        let caPEM = try ca.serializeAsPEM().pemString
        let chain = try NIOSSLCertificate(bytes: Array(try leaf.serializeAsPEM().pemString.utf8), format: .pem)
        let privateKey = try NIOSSLPrivateKey(bytes: Array(key.pemRepresentation.utf8), format: .pem)
        return (caPEM, chain, privateKey)
    }
}
