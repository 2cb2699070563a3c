import CoreMetrics
import Logging
import NIOCore
import NIOSSL
import SDSModel

/// Sees the key exchange of a TLS link from the wire and holds the link to `--tls-policy`.
///
/// Placed first in a connection's pipeline (before the TLS handler, on the socket's side), it reads
/// the server's first flight: as the client, what arrives; as the server, what the TLS handler
/// writes. Those bytes are held until the flight names its key exchange (the ServerHello's
/// `key_share` in TLS 1.3; the ServerKeyExchange in TLS 1.2), then either passed on unchanged or,
/// when the policy refuses it, dropped and the connection closed: a client under `pqc` never
/// answers a classical server (its token never leaves), a server never sends it a certificate.
/// Once it has decided, everything passes. swift-nio-ssl says nothing of the
/// group it negotiated, and grpc-swift-nio-transport takes no list of groups: this is how both
/// are had with the transports as they are.
public final class KeyExchangeGuard: ChannelDuplexHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    /// Which end of the link this is: the server's flight is what it reads or what it writes.
    public enum Role: Sendable { case client, server }

    private let role: Role
    private let policy: TLSPolicy
    private let report: KeyExchangeReport
    private var flight = TLSServerFlight()
    private var decided = false
    /// Refused: nothing more goes either way while the close completes.
    private var refused = false
    private var heldReads: [NIOAny] = []
    private var heldWrites: [(data: NIOAny, promise: EventLoopPromise<Void>?)] = []
    private var flushHeld = false

    public init(role: Role, policy: TLSPolicy, report: KeyExchangeReport) {
        self.role = role
        self.policy = policy
        self.report = report
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !refused else { return }
        guard role == .client, !decided else { return context.fireChannelRead(data) }
        heldReads.append(data)
        decide(context: context, seeing: unwrapInboundIn(data))
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard !refused else { promise?.fail(KeyExchangeRefused()); return }
        guard role == .server, !decided else { return context.write(data, promise: promise) }
        heldWrites.append((data, promise))
        decide(context: context, seeing: unwrapOutboundIn(data))
    }

    public func flush(context: ChannelHandlerContext) {
        guard !refused else { return }
        guard role == .server, !decided else { return context.flush() }
        flushHeld = true
    }

    public func channelInactive(context: ChannelHandlerContext) {
        failHeld(ChannelError.ioOnClosedChannel)
        context.fireChannelInactive()
    }

    /// Reads `bytes` into the flight and acts when it has said enough.
    private func decide(context: ChannelHandlerContext, seeing bytes: ByteBuffer) {
        let outcome = flight.feed(bytes.readableBytesView)
        var peer: String { context.channel.remoteAddress.map { "\($0)" } ?? "unknown" }
        switch outcome {
        case .needMore:
            return
        case .settled(let exchange):
            if let reason = policy.refusal(of: exchange) {
                report.refused(peer: peer, exchange: exchange.description, reason: reason)
                return refuse(context: context)
            }
            report.settled(peer: peer, exchange: exchange)
        case .notHandshake:
            break  // the server refused the handshake itself: the TLS handler reports it
        case .malformed(let why):
            if policy == .pqc {
                report.refused(peer: peer, exchange: "unreadable", reason: why)
                return refuse(context: context)
            }
            report.unreadable(peer: peer, reason: why)
        }
        pass(context: context)
    }

    /// Passes the held bytes on, in order; from then on everything passes.
    private func pass(context: ChannelHandlerContext) {
        decided = true
        let (reads, writes, flush) = (heldReads, heldWrites, flushHeld)
        (heldReads, heldWrites, flushHeld) = ([], [], false)
        for data in reads { context.fireChannelRead(data) }
        if !reads.isEmpty { context.fireChannelReadComplete() }
        for (data, promise) in writes { context.write(data, promise: promise) }
        if flush { context.flush() }
        // It stays, passing everything through: taken out from within a write, the flush the TLS
        // handler sends next was lost (seen in KeyExchangeGuardTests), and two branches cost nothing.
    }

    /// Drops the held bytes and closes; a server first tells the client why, in a TLS alert.
    private func refuse(context: ChannelHandlerContext) {
        decided = true
        refused = true
        heldReads = []
        failHeld(KeyExchangeRefused())
        if role == .server {
            // A fatal handshake_failure alert (RFC 8446 §6.2), in plaintext like the ServerHello it replaces.
            var alert = context.channel.allocator.buffer(capacity: 7)
            alert.writeBytes([21, 3, 3, 0, 2, 2, 40])
            context.writeAndFlush(wrapOutboundOut(alert), promise: nil)
        }
        context.close(promise: nil)
    }

    private func failHeld(_ error: any Error) {
        let writes = heldWrites
        heldWrites = []
        heldReads = []
        for (_, promise) in writes { promise?.fail(error) }
    }
}

/// The error held writes fail with when the policy refuses the link.
public struct KeyExchangeRefused: Error, CustomStringConvertible {
    public var description: String { "the TLS key exchange was refused by --tls-policy" }
}

/// What a link's key exchanges become: a debug line and `sds_agent_tls_handshakes_total{link,group,version}`
/// for each, a warning (one per link and minute, with the number held back) and
/// `sds_agent_tls_refused_total{link}` for each refusal.
public struct KeyExchangeReport: Sendable {
    /// The link's name in logs and metrics (`upstream_ca`, `ca_serve`).
    public let link: String
    private let policy: TLSPolicy
    private let logger: Logger
    private let metrics: any MetricsFactory
    private let throttle = LogThrottle(interval: .seconds(60))

    public init(link: String, policy: TLSPolicy, logger: Logger, metrics: any MetricsFactory = MetricsSystem.factory) {
        self.link = link
        self.policy = policy
        self.logger = logger
        self.metrics = metrics
    }

    func settled(peer: String, exchange: TLSKeyExchange) {
        let group = exchange.group?.description ?? "none"
        Counter(label: "sds_agent_tls_handshakes_total", dimensions: [("link", link), ("group", group), ("version", exchange.versionName)], factory: metrics)
            .increment()
        logger.debug(
            "TLS key exchange", metadata: ["link": "\(link)", "peer": "\(peer)", "group": "\(group)", "version": "\(exchange.versionName)"])
    }

    func refused(peer: String, exchange: String, reason: String) {
        Counter(label: "sds_agent_tls_refused_total", dimensions: [("link", link)], factory: metrics).increment()
        guard let held = throttle.admit(link) else { return }
        logger.warning(
            "TLS link refused by --tls-policy \(policy): \(reason)",
            metadata: ["link": "\(link)", "peer": "\(peer)", "key_exchange": "\(exchange)", "refused_since_last_line": .number(held)])
    }

    func unreadable(peer: String, reason: String) {
        logger.debug("TLS key exchange not read", metadata: ["link": "\(link)", "peer": "\(peer)", "reason": "\(reason)"])
    }
}

extension TLSPolicy {
    /// The policy's groups as swift-nio-ssl takes them (nil: its defaults, X25519MLKEM768 first).
    public var curves: [NIOTLSCurve]? { groups?.map { NIOTLSCurve(rawValue: $0.rawValue) } }
}
