import Glibc
import NIOCore
import NIOHTTP2
import SDSModel
import NIOHPACK

/// Puts the connection's Unix peer credentials (`SO_PEERCRED`) into every request's metadata,
/// under ``PeerCredentials/metadataKey``, so the SDS service can check them.
///
/// grpc-swift-nio-transport gives a service no package way to see the connection a call came in
/// on; it does call `onAcceptHTTP2Stream` with each stream channel, whose parent is the
/// connection's socket. This handler sits first in the stream's pipeline, removes whatever the
/// client sent under the key (a client cannot forge its credentials) and adds the kernel's.
final class PeerCredentialsHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias InboundOut = HTTP2Frame.FramePayload

    private let value: String?
    private var sawRequestHeaders = false

    init(peer: PeerCredentials?) {
        self.value = peer?.metadataValue
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .headers(var headers) = unwrapInboundIn(data) else {
            context.fireChannelRead(data)
            return
        }
        headers.headers.remove(name: PeerCredentials.metadataKey)
        if !sawRequestHeaders, let value {
            headers.headers.add(name: PeerCredentials.metadataKey, value: value)
        }
        sawRequestHeaders = true
        context.fireChannelRead(wrapInboundOut(.headers(headers)))
    }

    /// The `onAcceptHTTP2Stream` callback: installs the handler first in the stream's pipeline
    /// with the credentials of the stream's connection, and tells the connection's
    /// ``ConnectionWatch`` (when there is one) that a stream opened and, later, closed.
    @Sendable static func install(on streamChannel: any Channel) -> EventLoopFuture<Void> {
        install(on: streamChannel, socket: .token)
    }

    /// The callback for the peer-attested socket: the credentials say the stream came in there.
    @Sendable static func installForWorkloadSocket(on streamChannel: any Channel) -> EventLoopFuture<Void> {
        install(on: streamChannel, socket: .workload)
    }

    private static func install(on streamChannel: any Channel, socket: PeerCredentials.Socket) -> EventLoopFuture<Void> {
        let watch = streamChannel.parent.flatMap { try? $0.pipeline.syncOperations.handler(type: ConnectionWatch.self) }
        // The connection's credentials were read once, when it was accepted.
        let peer: EventLoopFuture<PeerCredentials?> =
            if let watch { streamChannel.eventLoop.makeSucceededFuture(watch.peer) } else if let parent = streamChannel.parent {
                peerCredentials(of: parent)
            } else { streamChannel.eventLoop.makeSucceededFuture(nil) }
        return peer.flatMapThrowing { peer in
            let peer = peer.map { PeerCredentials(pid: $0.pid, uid: $0.uid, gid: $0.gid, socket: socket) }
            if let watch {
                watch.streamOpened()
                streamChannel.closeFuture.whenComplete { _ in watch.streamClosed() }
            }
            try streamChannel.pipeline.syncOperations.addHandler(PeerCredentialsHandler(peer: peer), position: .first)
        }
    }

    /// The kernel's `SO_PEERCRED` for a connection channel; nil when it is not a Unix socket.
    static func peerCredentials(of connection: any Channel) -> EventLoopFuture<PeerCredentials?> {
        guard let socket = connection as? any SocketOptionProvider else { return connection.eventLoop.makeSucceededFuture(nil) }
        return socket.unsafeGetSocketOption(level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERCRED))
            .map { (raw: UCred) in PeerCredentials(pid: raw.pid, uid: raw.uid, gid: raw.gid) }
            .recover { _ in nil }
    }
}

/// `struct ucred` from <sys/socket.h>, which Swift's Glibc module does not export.
private struct UCred {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0
}
