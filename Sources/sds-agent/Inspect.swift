import ArgumentParser
import FoundationEssentials
import Glibc
import SDSAgent

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
            body = try AdminClient.get("/inspect", socket: adminSocket)
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

/// A minimal HTTP/1.0 GET over a Unix socket (the admin socket answers and closes).
enum AdminClient {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    static func get(_ path: String, socket: String) throws -> Data {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket(): errno \(errno)") }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(socket.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw Failure(description: "socket path too long: \(socket)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            buffer.copyBytes(from: bytes)
            buffer[bytes.count] = 0
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            throw Failure(description: "cannot connect to \(socket) (errno \(errno): \(String(cString: strerror(errno)))); is the agent running, and are you its user?")
        }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let request = Array("GET \(path) HTTP/1.0\r\nHost: sds-agent\r\n\r\n".utf8)
        guard request.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == request.count else {
            throw Failure(description: "cannot write to \(socket): errno \(errno)")
        }
        var response = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 { throw Failure(description: "reading from \(socket): errno \(errno)") }
            if count == 0 { break }
            response += chunk[..<count]
            if response.count > 64 << 20 { throw Failure(description: "answer larger than 64 MiB") }
        }
        guard let split = response.firstRange(of: Array("\r\n\r\n".utf8)) else {
            throw Failure(description: "not an HTTP answer from \(socket)")
        }
        let status = String(decoding: response[..<split.lowerBound], as: UTF8.self)
        guard status.hasPrefix("HTTP/1.0 200") || status.hasPrefix("HTTP/1.1 200") else {
            throw Failure(description: "the agent answered \(status.split(separator: "\r\n").first ?? "")")
        }
        return Data(response[split.upperBound...])
    }
}
