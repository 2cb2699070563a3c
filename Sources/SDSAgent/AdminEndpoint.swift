import FoundationEssentials
import Glibc
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import ServiceLifecycle

/// The agent's admin socket: HTTP/1.1 on a Unix socket of mode 0600 (only the agent's user, i.e.
/// the node's operator, may connect). `GET /inspect` answers what `sds-agent inspect` shows: every
/// cached identity and the trust bundle, as JSON.
package struct AdminEndpoint: Service {
    private let path: String
    private let inspect: @Sendable () async -> Data
    private let logger: Logger

    package init(path: String, logger: Logger, inspect: @escaping @Sendable () async -> Data) {
        self.path = path
        self.inspect = inspect
        self.logger = logger
    }

    package func run() async throws {
        // Created with its mode before it listens, like the SDS socket.
        let fd = try UnixSocketListener.bind(path: path, mode: 0o600, backlog: 16)
        defer { unlink(path) }
        let inspect = self.inspect
        let channel: any Channel
        do {
            channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                        try channel.pipeline.syncOperations.addHandler(AdminHTTPHandler(inspect: inspect))
                    }
                }
                .withBoundSocket(fd).get()
        } catch {
            close(fd)
            throw ListenerError(path: path, "cannot serve the admin socket: \(error)")
        }
        logger.info("admin socket listening", metadata: ["path": "\(path)", "routes": "/inspect"])
        try await channel.serveUntilShutdown()
    }
}

/// Answers `GET /inspect` (computed asynchronously: the cache is an actor); 404 otherwise.
private final class AdminHTTPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let inspect: @Sendable () async -> Data
    private var request: HTTPRequestHead?

    init(inspect: @escaping @Sendable () async -> Data) { self.inspect = inspect }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): request = head
        case .body: break
        case .end:
            guard let head = request else { return }
            request = nil
            let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
            guard path == "/inspect", head.method == .GET else {
                respond(context: context, head: head, status: .notFound, body: Data("not found; served: GET /inspect\n".utf8), type: "text/plain")
                return
            }
            let inspect = self.inspect
            let loop = context.eventLoop
            let bound = NIOLoopBound((self, context), eventLoop: loop)
            Task {
                let body = await inspect()
                loop.execute {
                    let (handler, context) = bound.value
                    handler.respond(context: context, head: head, status: .ok, body: body, type: "application/json")
                }
            }
        }
    }

    private func respond(context: ChannelHandlerContext, head: HTTPRequestHead, status: HTTPResponseStatus, body: Data, type: String) {
        let headers = HTTPHeaders([("content-type", type), ("content-length", "\(body.count)"), ("connection", "close")])
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }
}
