import Logging
import ServiceLifecycle

/// The loop that keeps certificates fresh: every `interval` of `clock` it asks the cache to renew
/// what is due (tests move a clock of their own; the agent's is the real one).
public struct Rotator<C: Clock<Duration>>: Service {
    private let cache: SecretCache
    private let interval: Duration
    private let clock: C

    public init(cache: SecretCache, interval: Duration = .seconds(1), clock: C) {
        self.cache = cache
        self.interval = interval
        self.clock = clock
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown {
            // Cancellation (graceful shutdown) ends the loop normally: it is not an error.
            while (try? await clock.sleep(for: interval)) != nil {
                await cache.maintain()
            }
        }
    }
}

extension Rotator where C == ContinuousClock {
    /// On the real clock.
    public init(cache: SecretCache, interval: Duration = .seconds(1)) {
        self.init(cache: cache, interval: interval, clock: ContinuousClock())
    }
}
