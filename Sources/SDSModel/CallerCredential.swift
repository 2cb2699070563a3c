import FoundationEssentials
import Glibc

/// A caller's verified bearer token, kept so an upstream CA can be asked on the caller's behalf
/// (the agent's `forward` credential mode). Its text never appears in a description: printing one
/// in a log or an error shows only when it expires.
public struct CallerCredential: Hashable, Sendable, CustomStringConvertible {
    /// The token as the caller sent it.
    public let token: String
    /// When it stops being valid (the token's `exp`).
    public let expiry: Date

    public init(token: String, expiry: Date) {
        self.token = token
        self.expiry = expiry
    }

    public var description: String { "<token, expires \(expiry.formatted(.iso8601))>" }
}
