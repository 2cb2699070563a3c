import Foundation
import SDSModel
import SDSServer
import Synchronization

/// Time that moves only when a test says so: the wall clock (inject `{ clock.now }` wherever code
/// takes a `now`) and the deadlines scheduled on it (a `DeadlineScheduler`), which fire, in order,
/// when `advance` moves the clock past them and never before.
public final class ManualClock: DeadlineScheduler, Sendable {
    private struct Pending {
        var id: Int
        var due: Date
        var fire: @Sendable () -> Void
    }
    private let state: Mutex<(now: Date, pending: [Pending], nextID: Int)>

    public init(_ start: Date = Date()) { state = Mutex((start, [], 0)) }

    public var now: Date { state.withLock { $0.now } }

    /// Deadlines scheduled and not yet fired or cancelled.
    public var scheduled: Int { state.withLock { $0.pending.count } }

    public func advance(_ seconds: TimeInterval) {
        let due = state.withLock { state in
            state.now += seconds
            let due = state.pending.filter { $0.due <= state.now }.sorted { $0.due < $1.due }
            state.pending.removeAll { $0.due <= state.now }
            return due
        }
        for timer in due { timer.fire() }
    }

    public func advance(by duration: Duration) { advance(duration.timeInterval) }

    package func schedule(after delay: Duration, _ fire: @escaping @Sendable () -> Void) -> DeadlineTimer {
        let id = state.withLock { state in
            state.nextID += 1
            state.pending.append(Pending(id: state.nextID, due: state.now + delay.timeInterval, fire: fire))
            return state.nextID
        }
        return DeadlineTimer { [self] in state.withLock { $0.pending.removeAll { $0.id == id } } }
    }
}

/// A counter that concurrent test tasks can share.
public final class Counter: Sendable {
    private let value = Mutex(0)
    public init() {}
    public func increment() { value.withLock { $0 += 1 } }
    public var count: Int { value.withLock { $0 } }
}
