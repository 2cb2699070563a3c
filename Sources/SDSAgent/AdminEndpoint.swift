import FoundationEssentials
import Glibc
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import ServiceLifecycle

/// The agent's admin socket: gRPC on a Unix socket of mode 0600 (only the agent's user, i.e. the
/// node's operator, may connect), the same transport as the SDS socket. One method,
/// `sdsagent.admin.v1.Admin/Inspect` (``AdminAPI``), answers what `sds-agent inspect` shows: every
/// cached identity and the trust bundle.
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
        let transport = HTTP2ServerTransport.Posix(listeningSocketDescriptor: Int(fd), transportSecurity: .plaintext)
        let server = GRPCServer(transport: transport, services: [AdminService(inspect: inspect)])
        logger.info("admin socket listening", metadata: ["path": "\(path)", "methods": "\(AdminAPI.inspect)"])
        try await serveUntilShutdown([server], listening: transport, onListening: { _ in }, shutdownMessage: "admin socket closing", logger: logger)
    }
}

/// The admin API's names and codec, shared by the agent (server) and `sds-agent inspect`
/// (client). Hand-registered rather than generated: one method whose request is empty and whose
/// answer is the ``Inspection`` JSON as it is, so no schema is kept twice.
package enum AdminAPI {
    /// `/sdsagent.admin.v1.Admin/Inspect`: request empty, response the inspection as JSON.
    package static let inspect = MethodDescriptor(fullyQualifiedService: "sdsagent.admin.v1.Admin", method: "Inspect")

    /// Bytes in, bytes out: the message is the JSON document itself.
    package struct Bytes: MessageSerializer, MessageDeserializer {
        package init() {}
        package func serialize<Output: GRPCContiguousBytes>(_ message: Data) throws -> Output { Output(message) }
        package func deserialize<Input: GRPCContiguousBytes>(_ serializedMessageBytes: Input) throws -> Data {
            serializedMessageBytes.withUnsafeBytes { Data($0) }
        }
    }
}

/// Serves ``AdminAPI/inspect``, computed per call (the cache is an actor).
private struct AdminService: RegistrableRPCService {
    let inspect: @Sendable () async -> Data

    func registerMethods<Transport: ServerTransport>(with router: inout RPCRouter<Transport>) {
        let inspect = self.inspect
        router.registerHandler(
            forMethod: AdminAPI.inspect, deserializer: AdminAPI.Bytes(), serializer: AdminAPI.Bytes()
        ) { request, _ in
            // Drain the (empty) request before answering.
            for try await _ in request.messages {}
            return StreamingServerResponse(single: ServerResponse(message: await inspect()))
        }
    }
}
