import Synchronization

/// A setting that a reload (SIGHUP) may replace while streams read it.
public final class Reloadable<Value: Sendable>: Sendable {
    private let current: Mutex<Value>

    public init(_ value: Value) { current = Mutex(value) }

    /// The value in force now.
    public var value: Value { current.withLock { $0 } }

    /// Puts `value` in force for every later read.
    public func replace(with value: Value) { current.withLock { $0 = value } }
}
