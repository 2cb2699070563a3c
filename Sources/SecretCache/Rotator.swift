import Logging
import ServiceLifecycle

/// The loop that keeps certificates fresh: every `interval` it asks the cache to renew what is due.
public struct Rotator: Service {
    private let cache: SecretCache
    private let interval: Duration

    public init(cache: SecretCache, interval: Duration = .seconds(1)) {
        self.cache = cache
        self.interval = interval
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown {
            // Cancellation (graceful shutdown) ends the loop normally: it is not an error.
            while (try? await Task.sleep(for: interval)) != nil {
                await cache.maintain()
            }
        }
    }
}
