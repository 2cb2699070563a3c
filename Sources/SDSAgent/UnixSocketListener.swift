import FoundationEssentials
import Glibc
import SDSModel

/// Creates the agent's listening Unix domain socket.
///
/// The parent directory is created; a stale socket file from an earlier run is replaced (but a
/// regular file or a socket another process is listening on is never removed); the mode is set
/// between `bind` and `listen`, so no client can connect while it is wider than asked.
package enum UnixSocketListener {
    /// Returns a listening socket descriptor bound to `path` with file mode `mode`.
    package static func bind(path: String, mode: mode_t, backlog: Int32 = 1024) throws(ListenerError) -> Int32 {
        let maxPath = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1
        guard path.utf8.count <= maxPath else {
            throw ListenerError(path: path, "socket path is \(path.utf8.count) bytes; Unix sockets allow \(maxPath)")
        }
        let directory = path.contains("/") ? URL(fileURLWithPath: path).deletingLastPathComponent().path : ""
        if !directory.isEmpty {
            do {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            } catch {
                throw ListenerError(path: path, "cannot create directory \(directory): \(error)")
            }
        }
        try removeStaleSocket(at: path)

        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ListenerError(path: path, "socket(): \(ListenerError.errnoText())") }
        try ListenerError.check(withAddress(of: path) { Glibc.bind(fd, $0, $1) }, closing: fd, path: path, "bind()")
        try ListenerError.check(chmod(path, mode), closing: fd, path: path, "chmod(\(String(mode, radix: 8)))")
        try ListenerError.check(listen(fd, backlog), closing: fd, path: path, "listen()")
        return fd
    }

    private static func removeStaleSocket(at path: String) throws(ListenerError) {
        guard let kind = FileKind.at(path, followingLinks: false) else { return }  // nothing there
        guard kind == .socket else {
            throw ListenerError(path: path, "exists and is not a socket; refusing to replace it")
        }
        // A socket someone still listens on belongs to a running agent: do not steal it.
        let probe = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(probe) }
        let connected = withAddress(of: path) { connect(probe, $0, $1) }
        if connected == 0 {
            throw ListenerError(path: path, "another process is listening on this socket (is an agent already running?)")
        }
        guard unlink(path) == 0 else { throw ListenerError(path: path, "cannot remove stale socket: \(ListenerError.errnoText())") }
    }

    /// Calls `body` with `path` as a `sockaddr_un` (the caller has checked its length).
    private static func withAddress<T>(of path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            buffer.copyBytes(from: path.utf8)
            buffer[path.utf8.count] = 0
        }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

}

/// The socket could not be set up; names the path and the system's reason.
package struct ListenerError: Error, Sendable, CustomStringConvertible {
    /// The socket path.
    package var path: String
    /// What failed, with errno text.
    package var message: String
    init(path: String, _ message: String) {
        self.path = path
        self.message = message
    }
    package var description: String { "socket \(path): \(message)" }

    /// The system's reason for the last failure: `Address already in use (errno 98)`.
    static func errnoText() -> String {
        let code = errno
        return "\(String(cString: strerror(code))) (errno \(code))"
    }

    /// Throws, after closing `fd`, when a system call returned non-zero; `what` names the step.
    static func check(_ result: Int32, closing fd: Int32, path: String, _ what: String) throws(ListenerError) {
        guard result != 0 else { return }
        let text = errnoText()
        close(fd)
        throw ListenerError(path: path, "\(what): \(text)")
    }
}
