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
        var continuation: AsyncStream<Void>.Continuation
    }

    private let watchers = Mutex<(next: Int, all: [Int: Watcher])>((0, [:]))

    public init() {}

    /// Signals for changes to `identity`'s certificate or to the trust bundle.
    public func watch(_ identity: SPIFFEID) -> AsyncStream<Void> {
        let (stream, continuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let id = watchers.withLock { state in
            state.next += 1
            state.all[state.next] = Watcher(identity: identity, continuation: continuation)
            return state.next
        }
        continuation.onTermination = { [weak self] _ in
            _ = self?.watchers.withLock { $0.all.removeValue(forKey: id) }
        }
        return stream
    }

    /// Tells the watchers of `identity` that its certificate changed.
    public func certificateChanged(for identity: SPIFFEID) {
        let targets = watchers.withLock { $0.all.values.filter { $0.identity == identity }.map(\.continuation) }
        for continuation in targets { continuation.yield() }
    }

    /// Tells every watcher that the trust bundle changed.
    public func bundleChanged() {
        let targets = watchers.withLock { $0.all.values.map(\.continuation) }
        for continuation in targets { continuation.yield() }
    }

    /// The identities that have at least one open stream.
    public var watchedIdentities: Set<SPIFFEID> {
        watchers.withLock { Set($0.all.values.map(\.identity)) }
    }

    /// How many streams are watching (all identities).
    public var count: Int { watchers.withLock { $0.all.count } }
}
