import Foundation
import Synchronization

/// A wall clock that moves only when told: inject `{ clock.now }` wherever code takes a `now`.
public final class ManualClock: Sendable {
    private let value: Mutex<Date>
    public init(_ start: Date = Date()) { value = Mutex(start) }
    public var now: Date { value.withLock { $0 } }
    public func advance(_ seconds: TimeInterval) { value.withLock { $0 += seconds } }
}

/// A counter that concurrent test tasks can share.
public final class Counter: Sendable {
    private let value = Mutex(0)
    public init() {}
    public func increment() { value.withLock { $0 += 1 } }
    public var count: Int { value.withLock { $0 } }
}
