import ArgumentParser
import FoundationEssentials
import Glibc
import GRPCCore
import GRPCNIOTransportHTTP2
import SDSAgent
import SDSModel

/// `sds-agent inspect`: every identity the node's agent holds, with serials, expiry, renewal,
/// open streams and pods, and its trust bundle; read from the agent's admin socket.
struct Inspect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what the agent issued: each cached identity (serial, expiry, next renewal, streams, pods) and the trust bundle.")

    @Option(help: "The agent's admin socket (serve --admin-socket; default <state-dir>/admin.sock).")
    var adminSocket = "/var/lib/sds-agent/admin.sock"

    @Flag(help: "Print the JSON the agent sends instead of a table.")
    var json = false

    func run() async throws {
        let body: Data
        do {
            body = try await AdminClient.inspect(socket: adminSocket)
        } catch {
            printToStandardError("sds-agent inspect: \(error)")
            throw ExitCode.failure
        }
        if json {
            print(String(decoding: body, as: UTF8.self))
            return
        }
        do {
            print(try Inspection.decode(body).table(), terminator: "")
        } catch {
            printToStandardError("sds-agent inspect: the agent's answer is not an inspection: \(error)")
            throw ExitCode.failure
        }
    }
}

/// The admin socket's gRPC client, bounded at 10 s.
enum AdminClient {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    static func inspect(socket: String) async throws -> Data {
        guard FileKind.at(socket) == .socket else {
            throw Failure(description: "\(socket) is not a socket; is the agent running, with this --admin-socket?")
        }
        do {
            return try await withGRPCClient(
                transport: .http2NIOPosix(target: .unixDomainSocket(path: socket), transportSecurity: .plaintext)
            ) { client in
                var options = CallOptions.defaults
                options.timeout = .seconds(10)
                return try await client.unary(
                    request: ClientRequest(message: Data()), descriptor: AdminAPI.inspect, serializer: AdminAPI.Bytes(),
                    deserializer: AdminAPI.Bytes(), options: options
                ) { try $0.message }
            }
        } catch let error as RPCError where error.code == .unavailable {
            throw Failure(description: "cannot reach the agent on \(socket) (\(error.message)); is the agent running, and are you its user?")
        } catch let error as RPCError {
            throw Failure(description: "the agent answered \(error.code): \(error.message)")
        }
    }
}
