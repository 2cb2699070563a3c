import Synchronization

/// A secret that could not be produced, as the services answer it (``code``), with what caused it.
public struct SecretError: Error, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable, Hashable {
        /// The CA cannot answer now (down, no key, a transient failure): retrying later may help.
        case unavailable
        /// The CA refused the caller or its request: the caller's fault.
        case refused
        /// Our own failure (a key or CSR we could not build, a chain we could not encode).
        case failed
        /// Not something this agent can serve as configured (JWT-SVIDs with an upstream CA).
        case unsupported
    }

    public var code: Code
    /// What went wrong, in words.
    public var message: String
    /// The error underneath (the CA's), for logs and tests; never sent to a caller.
    public var cause: (any Error)?

    public init(_ code: Code, message: String, cause: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    public var description: String { message }
}

/// A registered watch; ``cancel()`` (once, idempotent) removes it.
public final class SecretWatch: Sendable {
    private let onCancel: Mutex<(@Sendable () -> Void)?>

    public init(onCancel: @escaping @Sendable () -> Void) { self.onCancel = Mutex(onCancel) }

    public func cancel() {
        let action = onCancel.withLock { action in
            defer { action = nil }
            return action
        }
        action?()
    }
}
