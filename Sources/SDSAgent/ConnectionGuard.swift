import CoreMetrics
import Glibc
import Logging
import NIOCore
import NIOHTTP2
import SDSModel
import Synchronization

/// Watches every connection on the agent's socket: counts them, holds them to the configured
/// limits, and logs and counts every connection the agent closes or loses to an error, with the
/// reason, so no connection ends silently.
///
/// Installed through the transport's `onAcceptTCPConnection` hook (a ``ConnectionWatch`` at the
/// end of each connection's pipeline) and told about streams through `onAcceptHTTP2Stream`
/// (``PeerCredentialsHandler``). Limits:
/// - at most ``Limits/maxConnections`` open at once; one more is closed at accept;
/// - a connection must open its first stream within ``Limits/firstStreamTimeout`` (a client that
///   connects and sends nothing cannot hold a descriptor);
/// - a connection with no open stream for ``Limits/idleTimeout`` is closed.
package final class ConnectionGuard: Sendable {
    /// The connection limits; every one has a safe default.
    package struct Limits: Sendable, Hashable {
        /// Most connections open at once (Envoy's google_grpc opens one per stream).
        package var maxConnections: Int
        /// Time from accept to the first HTTP/2 stream.
        package var firstStreamTimeout: Duration
        /// Time a connection may stay open with no stream.
        package var idleTimeout: Duration

        /// 2048 connections (as many as streams: Envoy's google_grpc opens one per stream),
        /// 10 s to the first stream, 5 min idle.
        package static let defaults = Limits(maxConnections: 2048, firstStreamTimeout: .seconds(10), idleTimeout: .seconds(300))

        package init(maxConnections: Int, firstStreamTimeout: Duration, idleTimeout: Duration) {
            self.maxConnections = maxConnections
            self.firstStreamTimeout = firstStreamTimeout
            self.idleTimeout = idleTimeout
        }
    }

    /// Why the agent closed a connection (a metric label: a fixed set).
    package enum CloseReason: String, Sendable, CaseIterable {
        case connectionLimit = "connection_limit"
        case noStream = "no_stream"
        case idle
        case error
    }

    /// Connections open now.
    package static let openConnectionsMetric = "sds_agent_open_connections"
    /// Connections the agent closed, or lost to an error, by `reason`.
    package static let closedConnectionsMetric = "sds_agent_closed_connections_total"

    let limits: Limits
    let logger: Logger
    private let open = Atomic<Int>(0)
    private let openGauge: Gauge
    /// `closedConnectionsMetric` by reason, created once.
    private let closed: [CloseReason: Counter]
    private let throttle = LogThrottle(interval: .seconds(1))

    package init(limits: Limits, logger: Logger, metrics: any MetricsFactory = MetricsSystem.factory) {
        self.limits = limits
        self.logger = logger
        self.closed = Dictionary(uniqueKeysWithValues: CloseReason.allCases.map {
            ($0, Counter(label: Self.closedConnectionsMetric, dimensions: [("reason", $0.rawValue)], factory: metrics))
        })
        self.openGauge = Gauge(label: Self.openConnectionsMetric, factory: metrics)
    }

    /// The `onAcceptTCPConnection` callback: admits the connection or closes it.
    @Sendable package func install(on connection: any Channel) -> EventLoopFuture<Void> {
        let count = open.add(1, ordering: .relaxed).newValue
        openGauge.record(count)
        connection.closeFuture.whenComplete { [self] _ in
            openGauge.record(open.subtract(1, ordering: .relaxed).newValue)
        }
        return PeerCredentialsHandler.peerCredentials(of: connection).flatMapThrowing { [self] peer in
            let watch = ConnectionWatch(guard: self, peer: peer)
            // Right behind the HTTP/2 handler, so the watch sees the connection errors it raises
            // (a protocol violation, a header block over the limit) before gRPC's handlers take them.
            let pipeline = connection.pipeline.syncOperations
            if let http2 = try? pipeline.handler(type: NIOHTTP2Handler.self) {
                try pipeline.addHandler(watch, position: .after(http2))
            } else {
                try pipeline.addHandler(watch)
            }
            if count > limits.maxConnections {
                watch.close(.connectionLimit, "\(count) connections are open; the limit is \(limits.maxConnections)")
            }
        }
    }

    /// Logs (at most once a second per reason, with the number held back) and counts a close or a
    /// connection error.
    func record(_ reason: CloseReason, _ detail: String, peer: PeerCredentials?) {
        closed[reason]?.increment()
        guard let suppressed = throttle.admit(reason.rawValue) else { return }
        var metadata: Logger.Metadata = [
            "reason": "\(reason.rawValue)", "detail": "\(detail)",
            "peer_pid": "\(peer.map { String($0.pid) } ?? "-")", "peer_uid": "\(peer.map { String($0.uid) } ?? "-")",
        ]
        if suppressed > 0 { metadata["suppressed_since_last"] = "\(suppressed)" }
        logger.warning(reason == .error ? "connection error" : "closed a connection", metadata: metadata)
    }
}

/// One connection's watcher: its peer, its open streams, its timer, and why it ended.
final class ConnectionWatch: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    // @unchecked: every field is touched only on the connection's event loop.
    typealias InboundIn = Any

    let peer: PeerCredentials?
    private let owner: ConnectionGuard
    private var context: ChannelHandlerContext?
    private var streams = 0
    private var sawStream = false
    private var timer: Scheduled<Void>?
    private var closed = false

    init(guard owner: ConnectionGuard, peer: PeerCredentials?) {
        self.owner = owner
        self.peer = peer
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        arm(owner.limits.firstStreamTimeout, .noStream, "no stream opened within \(owner.limits.firstStreamTimeout) of connecting")
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        self.context = nil
    }

    /// A stream opened on this connection (called on its event loop).
    func streamOpened() {
        streams += 1
        sawStream = true
        timer?.cancel()
        timer = nil
    }

    /// A stream on this connection ended (called on its event loop).
    func streamClosed() {
        streams -= 1
        if streams == 0 { arm(owner.limits.idleTimeout, .idle, "no stream for \(owner.limits.idleTimeout)") }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // The transport decides whether the connection survives (a stream-level HTTP/2 error
        // does not end the others); this says that it happened, counted and logged. A peer that
        // hangs up mid-write is ordinary (an Envoy restarting) and logged at debug level only.
        if let io = error as? IOError, [ECONNRESET, EPIPE].contains(io.errnoCode) {
            owner.logger.debug("connection reset by the peer", metadata: ["peer_pid": "\(peer.map { String($0.pid) } ?? "-")"])
            return
        }
        owner.record(.error, "\(error)", peer: peer)
        context.fireErrorCaught(error)
    }

    /// Closes the connection for `reason`, logged and counted once.
    func close(_ reason: ConnectionGuard.CloseReason, _ detail: String) {
        guard !closed, let context else { return }
        closed = true
        timer?.cancel()
        owner.record(reason, detail, peer: peer)
        context.close(promise: nil)
    }

    private func arm(_ timeout: Duration, _ reason: ConnectionGuard.CloseReason, _ detail: String) {
        timer?.cancel()
        guard let context else { return }
        timer = context.eventLoop.scheduleTask(in: TimeAmount(timeout)) { [self] in
            if streams == 0 { close(reason, detail) }
        }
    }
}

