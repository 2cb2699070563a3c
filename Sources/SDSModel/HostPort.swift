/// `HOST:PORT` as a flag spells it (`ca.example:15012`, `[::1]:9102`, `0.0.0.0:9102`): the one
/// parser for every address the agent listens on or dials.
public struct HostPort: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    /// Parses `HOST:PORT`, with an IPv6 address in brackets. An empty host is `emptyHost` (nil:
    /// refused); the port must be in `ports`. A host with whitespace or `/` is refused. Nil when
    /// `text` is not that shape.
    public init?(_ text: String, emptyHost: String? = nil, ports: ClosedRange<Int> = 1...65535) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
            ports.contains(port)
        else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        if host.isEmpty, let emptyHost { host = emptyHost }
        guard !host.isEmpty, !host.contains(where: { $0.isWhitespace || $0 == "/" }) else { return nil }
        self.host = host
        self.port = port
    }

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// A comma-separated list of `HOST:PORT` (`a:15012,b:15012`); nil when any entry is not one
    /// or the list is empty.
    public static func list(_ text: String) -> [HostPort]? {
        let entries = text.split(separator: ",", omittingEmptySubsequences: false).map { String($0).trimmed }
        let parsed = entries.compactMap { HostPort($0) }
        guard !entries.isEmpty, parsed.count == entries.count else { return nil }
        return parsed
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// A name rule as the policy flags spell it: exact, or a prefix when it ends in `*` (`team-*`).
public enum NamePattern {
    public static func matches(_ pattern: String, _ value: String) -> Bool {
        pattern.hasSuffix("*") ? value.hasPrefix(pattern.dropLast()) : pattern == value
    }
}

/// The token of an `authorization: Bearer <token>` value (the scheme case-insensitive, RFC 7235),
/// trimmed; nil when the value has another scheme or no token.
public enum BearerToken {
    public static func token(in value: String) -> String? {
        let trimmed = value.trimmed
        guard trimmed.count > 7, trimmed.prefix(7).lowercased() == "bearer " else { return nil }
        let token = trimmed.dropFirst(7).trimmed
        return token.isEmpty ? nil : token
    }
}
