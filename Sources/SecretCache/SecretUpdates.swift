import SDSModel
import Synchronization

/// Fan-out of "something you serve changed" to every open stream.
///
/// Each watcher gets an `AsyncStream` buffering only the newest signal: a slow stream may miss
/// intermediate versions but always sees that there is a newer one, and the notifier never
/// blocks on it (the pattern of swift-configuration's `MutableInMemoryProvider` and SPIRE's
/// capacity-1 subscriber channels). The watcher is removed when its stream ends.
public final class SecretUpdates: Sendable {
    private struct Watcher {
        var identity: SPIFFEID
        var signal: @Sendable () -> Void
    }

    private let watchers = Mutex<(next: Int, all: [Int: Watcher])>((0, [:]))

    public init() {}

    /// Signals for changes to `identity`'s certificate or to the trust bundle.
    public func watch(_ identity: SPIFFEID) -> AsyncStream<Void> {
        let (stream, continuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let watch = watch(identity) { continuation.yield() }
        continuation.onTermination = { _ in watch.cancel() }
        return stream
    }

    /// Calls `signal` (from the notifier's context: it must only record and wake) for changes to
    /// `identity`'s certificate or to the trust bundle, until the returned watch is cancelled. No
    /// task or stream per watcher: an open SDS stream waits on its own event source.
    public func watch(_ identity: SPIFFEID, signal: @escaping @Sendable () -> Void) -> SecretWatch {
        let id = watchers.withLock { state in
            state.next += 1
            state.all[state.next] = Watcher(identity: identity, signal: signal)
            return state.next
        }
        return SecretWatch { [weak self] in _ = self?.watchers.withLock { $0.all.removeValue(forKey: id) } }
    }

    /// Tells the watchers of `identity` that its certificate changed.
    public func certificateChanged(for identity: SPIFFEID) {
        let targets = watchers.withLock { $0.all.values.filter { $0.identity == identity }.map(\.signal) }
        for signal in targets { signal() }
    }

    /// Tells every watcher that the trust bundle changed.
    public func bundleChanged() {
        let targets = watchers.withLock { $0.all.values.map(\.signal) }
        for signal in targets { signal() }
    }

    /// The identities that have at least one open stream.
    public var watchedIdentities: Set<SPIFFEID> {
        watchers.withLock { Set($0.all.values.map(\.identity)) }
    }

    /// How many streams are watching (all identities).
    public var count: Int { watchers.withLock { $0.all.count } }
}
