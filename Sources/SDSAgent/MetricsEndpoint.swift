import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import SDSModel
import ServiceLifecycle

/// Serves the agent's metrics to Prometheus and its health to kubelet over plain HTTP/1.1 on a
/// TCP address: `GET /metrics` (text exposition format 0.0.4), `GET /healthz` (200 while the
/// process runs), `GET /readyz` (200 when it can issue, else 503 with the reason).
///
/// Off unless `--metrics-address` is given. It serves no secret and accepts no input, so it can
/// listen on the pod's address.
package struct MetricsEndpoint: Service {
    /// Where to listen, from `HOST:PORT` (`[::1]:9102`, `0.0.0.0:9102`, `:9102`: an empty host is
    /// all IPv4 addresses, port 0 one the kernel picks); nil when it is not that shape.
    package static func address(_ text: String) -> HostPort? { HostPort(text, emptyHost: "0.0.0.0", ports: 0...65535) }

    private let address: HostPort
    private let registry: PrometheusCollectorRegistry
    private let logger: Logger
    private let onListening: @Sendable (Int) -> Void
    private let readiness: @Sendable () -> String?

    /// - Parameters:
    ///   - readiness: why the agent cannot issue now, or nil (answers `/readyz`).
    ///   - onListening: called with the bound port once the endpoint listens (port 0 picks one).
    package init(
        address: HostPort, registry: PrometheusCollectorRegistry, logger: Logger,
        readiness: @escaping @Sendable () -> String? = { nil }, onListening: @escaping @Sendable (Int) -> Void = { _ in }
    ) {
        self.readiness = readiness
        self.address = address
        self.registry = registry
        self.logger = logger
        self.onListening = onListening
    }

    /// Listens until cancelled or until graceful shutdown.
    package func run() async throws {
        let registry = self.registry
        let readiness = self.readiness
        let channel: any Channel
        do {
            channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                        try channel.pipeline.syncOperations.addHandler(MetricsHTTPHandler(registry: registry, readiness: readiness))
                    }
                }
                .bind(host: address.host, port: address.port).get()
        } catch {
            throw MetricsEndpointError(message: "cannot listen for metrics on \(address): \(error)")
        }
        var bound = address
        bound.port = channel.localAddress?.port ?? address.port  // port 0: the one the kernel picked
        logger.notice("metrics endpoint listening", metadata: ["address": "\(bound)", "path": "/metrics"])
        onListening(bound.port)
        try await channel.serveUntilShutdown()
    }
}

extension Channel {
    /// Waits until the channel closes, closing it at graceful shutdown or cancellation.
    func serveUntilShutdown() async throws {
        try await withGracefulShutdownHandler {
            try await withTaskCancellationHandler {
                try await self.closeFuture.get()
            } onCancel: {
                self.close(promise: nil)
            }
        } onGracefulShutdown: {
            self.close(promise: nil)
        }
    }
}

/// The metrics listener could not start.
package struct MetricsEndpointError: Error, CustomStringConvertible {
    /// What went wrong, naming the address.
    package var message: String
    package var description: String { message }
}

/// Answers `GET /metrics` with the registry's exposition, `/healthz` and `/readyz`; anything else
/// with 404, another method with 405.
private final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let registry: PrometheusCollectorRegistry
    private let readiness: @Sendable () -> String?
    private var request: HTTPRequestHead?

    init(registry: PrometheusCollectorRegistry, readiness: @escaping @Sendable () -> String?) {
        self.registry = registry
        self.readiness = readiness
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            request = head
        case .body:
            break
        case .end:
            guard let head = request else { return }
            request = nil
            respond(to: head, context: context)
        }
    }

    private func respond(to head: HTTPRequestHead, context: ChannelHandlerContext) {
        let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
        var status = HTTPResponseStatus.ok
        var body: [UInt8] = []
        var contentType = "text/plain; charset=utf-8"
        if !["/metrics", "/healthz", "/readyz"].contains(path) {
            status = .notFound
            body = Array("not found; served: /metrics, /healthz, /readyz\n".utf8)
        } else if head.method != .GET && head.method != .HEAD {
            status = .methodNotAllowed
        } else if path == "/healthz" {
            body = Array("ok\n".utf8)
        } else if path == "/readyz" {
            if let reason = readiness() {
                status = .serviceUnavailable
                body = Array("not ready: \(reason)\n".utf8)
            } else {
                body = Array("ready\n".utf8)
            }
        } else {
            contentType = "text/plain; version=0.0.4; charset=utf-8"
            registry.emit(into: &body)
            body = MetricsHelp.annotate(body)
        }
        var headers = HTTPHeaders([("content-type", contentType), ("content-length", "\(body.count)")])
        if !head.isKeepAlive { headers.add(name: "connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        if head.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        }
        let keepAlive = head.isKeepAlive
        context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
            if !keepAlive { context.close(promise: nil) }
        }
    }
}

extension MetricsEndpoint: CustomStringConvertible {
    package var description: String { "MetricsEndpoint(\(address))" }
}
