import FoundationEssentials
import Glibc

/// Creates a listening TCP socket before anything else starts, so that a port in use is one
/// line at start (and exit 1) rather than a server that never listens while it reports ready.
enum TCPListener {
    /// A socket listening on `host:port` (`0.0.0.0` or `::` for every address; a name is resolved).
    static func bind(host: String, port: Int, backlog: Int32 = 1024) throws(ListenerError) -> Int32 {
        let name = "\(host.contains(":") ? "[\(host)]" : host):\(port)"
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        var found: UnsafeMutablePointer<addrinfo>?
        let resolved = getaddrinfo(host, String(port), &hints, &found)
        guard resolved == 0, let info = found else {
            throw ListenerError(path: name, "cannot resolve \(host): \(String(cString: gai_strerror(resolved)))")
        }
        defer { freeaddrinfo(info) }
        let fd = socket(info.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ListenerError(path: name, "socket(): \(ListenerError.errnoText())") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        try ListenerError.check(Glibc.bind(fd, info.pointee.ai_addr, info.pointee.ai_addrlen), closing: fd, path: name, "cannot listen")
        try ListenerError.check(listen(fd, backlog), closing: fd, path: name, "listen()")
        return fd
    }
}
