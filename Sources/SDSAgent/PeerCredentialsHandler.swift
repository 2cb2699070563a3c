import Glibc
import NIOCore
import NIOHTTP2
import SDSModel

/// Puts the connection's Unix peer credentials (`SO_PEERCRED`) into every request's metadata,
/// under ``PeerCredentials/metadataKey``, so the SDS service can check them.
///
/// grpc-swift-nio-transport gives a service no public way to see the connection a call came in
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

    /// The `onAcceptHTTP2Stream` callback: reads the credentials of the stream's connection and
    /// installs the handler first in the stream's pipeline.
    @Sendable static func install(on streamChannel: any Channel) -> EventLoopFuture<Void> {
        let credentials: EventLoopFuture<PeerCredentials?>
        if let socket = streamChannel.parent as? any SocketOptionProvider {
            credentials = socket.unsafeGetSocketOption(
                level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERCRED)
            ).map { (raw: UCred) in PeerCredentials(pid: raw.pid, uid: raw.uid, gid: raw.gid) }
                .recover { _ in nil }
        } else {
            credentials = streamChannel.eventLoop.makeSucceededFuture(nil)
        }
        return credentials.flatMapThrowing { peer in
            try streamChannel.pipeline.syncOperations.addHandler(PeerCredentialsHandler(peer: peer), position: .first)
        }
    }
}

/// `struct ucred` from <sys/socket.h>, which Swift's Glibc module does not export.
private struct UCred {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0
}
