import Synchronization

/// Lets one log line through per key and interval, and counts the ones it held back: a flood of
/// refusals costs a few lines a second, and the lines say how many they stand for.
public final class LogThrottle: Sendable {
    private let interval: Duration
    private let state = Mutex<[String: (last: ContinuousClock.Instant, held: Int)]>([:])

    public init(interval: Duration) { self.interval = interval }

    /// The number held back since the last line when this one may be logged; nil when it may not.
    public func admit(_ key: String, now: ContinuousClock.Instant = .now) -> Int? {
        state.withLock { entries in
            if let entry = entries[key], now - entry.last < interval {
                entries[key]!.held += 1
                return nil
            }
            let held = entries[key]?.held ?? 0
            entries[key] = (now, 0)
            return held
        }
    }
}
