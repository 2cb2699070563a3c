import EnvoyAPI
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SDSAgent

/// The framework floor: a server on the same stack as the agent (grpc-swift-2 over
/// grpc-swift-nio-transport's HTTP/2, on a Unix socket made the same way, with the same backlog)
/// that answers SDS with one canned response (a real one, captured from the agent): no token
/// check, no cache, no state machine. What the agent adds is what it does above this.
struct FloorService: Envoy_Service_Secret_V3_SecretDiscoveryService.SimpleServiceProtocol {
    let canned: Envoy_Service_Discovery_V3_DiscoveryResponse

    func fetchSecrets(
        request: Envoy_Service_Discovery_V3_DiscoveryRequest, context: ServerContext
    ) async throws -> Envoy_Service_Discovery_V3_DiscoveryResponse {
        canned
    }

    func streamSecrets(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DiscoveryResponse>, context: ServerContext
    ) async throws {
        var answered = false
        for try await _ in request where !answered {
            try await response.write(canned)
            answered = true
        }
    }

    func deltaSecrets(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DeltaDiscoveryResponse>, context: ServerContext
    ) async throws {
        throw RPCError(code: .unimplemented, message: "the floor server answers state-of-the-world only")
    }

    /// Serves on `socket` until the process is stopped.
    static func serve(socket: String, responseFile: String) async throws {
        let canned = try Envoy_Service_Discovery_V3_DiscoveryResponse(serializedBytes: Array(try Data(contentsOf: URL(fileURLWithPath: responseFile))))
        let backlog: Int32 = 4096
        let fd = try UnixSocketListener.bind(path: socket, mode: 0o600, backlog: backlog)
        let transport = HTTP2ServerTransport.Posix(
            listeningSocketDescriptor: Int(fd), transportSecurity: .plaintext,
            config: .defaults { config in
                config.channelDebuggingCallbacks.onBindTCPListener = { channel in
                    channel.eventLoop.makeCompletedFuture { _ = listen(fd, backlog) }
                }
            })
        let server = GRPCServer(transport: transport, services: [FloorService(canned: canned)])
        try await server.serve()
    }
}
