import Synchronization

/// Counts the streams open now against a limit; shared by every stream of one server.
final class StreamSlots: Sendable {
    private let limit: Int
    private let used = Atomic<Int>(0)

    init(limit: Int) { self.limit = limit }

    /// Takes a slot; false when all are taken.
    func acquire() -> Bool {
        var current = used.load(ordering: .relaxed)
        while current < limit {
            let (exchanged, original) = used.compareExchange(
                expected: current, desired: current + 1, ordering: .acquiringAndReleasing)
            if exchanged { return true }
            current = original
        }
        return false
    }

    /// Gives back a slot taken with ``acquire()``.
    func release() { used.subtract(1, ordering: .acquiringAndReleasing) }

    /// Slots taken now.
    var inUse: Int { used.load(ordering: .relaxed) }
}
