import FoundationEssentials
import Glibc
import KubernetesAPI
import Logging
import SDSModel
import Synchronization

/// Verification keys from the Kubernetes API server's OIDC discovery: the issuer's
/// `/.well-known/openid-configuration`, then the JWKS at its `jwks_uri`, both fetched from the
/// API server with the agent's own token and CA.
///
/// The keys are cached: refreshed on a schedule (``run()``) and when a token names an unknown
/// `kid` (at most once per ``minimumRefreshInterval``, concurrent requests sharing one fetch). A
/// failed refresh keeps the cached keys, so an API-server outage does not stop verification;
/// before the first success there are no keys and calls are refused as transient failures.
public actor OIDCDiscoveryKeySource: VerificationKeySource {
    private let api: KubernetesAPIClient
    private let refreshInterval: Duration
    private let minimumRefreshInterval: Duration
    private let logger: Logger
    private let clock: any Clock<Duration>
    private var keys: VerificationKeySet? {
        didSet { loaded.store(keys != nil, ordering: .relaxed) }
    }
    private nonisolated let loaded = Atomic<Bool>(false)
    /// Whether keys have been fetched at least once (readiness).
    public nonisolated var hasKeys: Bool { loaded.load(ordering: .relaxed) }
    private var inFlight: Task<Void, Never>?
    private var lastAttempt: ContinuousClock.Instant?
    /// The issuer the discovery document names, once fetched.
    public private(set) var discoveredIssuer: String?
    /// Fetch attempts so far (for tests and logs).
    package private(set) var fetchAttempts = 0

    /// The refresh loop waits on `clock` (tests move one of their own).
    public init(
        api: KubernetesAPIClient, refreshInterval: Duration = .seconds(3600), minimumRefreshInterval: Duration = .seconds(30),
        clock: any Clock<Duration> = ContinuousClock(), logger: Logger
    ) {
        self.api = api
        self.clock = clock
        self.refreshInterval = refreshInterval
        self.minimumRefreshInterval = minimumRefreshInterval
        self.logger = logger
    }

    public func currentKeys() async -> VerificationKeySet? {
        if keys == nil { await refreshIfAllowed(reason: "no keys loaded yet") }
        return keys
    }

    /// A caller waits for a refresh at most this long: a hanging API server must not hold every
    /// token with a new `kid` for the whole fetch timeout (the fetch goes on for the next caller).
    public static let unknownKeyWait: Duration = .seconds(2)

    public func keys(afterUnknownKeyID keyID: String) async -> VerificationKeySet? {
        await waitAtMost(Self.unknownKeyWait) {
            await self.refreshIfAllowed(reason: "a token names unknown key ID '\(keyID)'")
        }
        return keys
    }

    /// Refreshes every `refreshInterval` until cancelled. Until the first keys arrive it retries
    /// sooner (1 s, doubling up to `minimumRefreshInterval`): the agent is not ready without them.
    public func run() async {
        var failures = 0
        while !Task.isCancelled {
            await refresh(reason: keys == nil ? "start" : "schedule", cancelsFetch: true)
            failures = keys == nil ? failures + 1 : 0
            let wait = keys == nil ? min(minimumRefreshInterval, .seconds(1 << min(failures - 1, 5))) : refreshInterval
            try? await clock.sleep(for: wait)
        }
    }

    /// Fetches now, unless a fetch ran less than `minimumRefreshInterval` ago (then waits for
    /// any fetch in flight and returns).
    private func refreshIfAllowed(reason: String) async {
        if let inFlight { return await inFlight.value }
        if let lastAttempt, ContinuousClock.now - lastAttempt < minimumRefreshInterval { return }
        await refresh(reason: reason)
    }

    /// One fetch; concurrent callers share it. Cancelling the refresh loop (the agent shutting
    /// down) cancels the fetch, so a hanging API server cannot hold the shutdown for its timeout;
    /// a caller that goes away does not cancel a fetch others wait for.
    public func refresh(reason: String) async {
        await refresh(reason: reason, cancelsFetch: false)
    }

    private func refresh(reason: String, cancelsFetch: Bool) async {
        let task: Task<Void, Never>
        if let inFlight {
            task = inFlight
        } else {
            task = Task { await self.fetch(reason: reason) }
            inFlight = task
        }
        if cancelsFetch {
            await withTaskCancellationHandler { await task.value } onCancel: { task.cancel() }
        } else {
            await task.value
        }
        if inFlight == task { inFlight = nil }
    }

    private func fetch(reason: String) async {
        lastAttempt = .now
        fetchAttempts += 1
        do {
            let discovery = try JSONDecoder().decode(
                DiscoveryDocument.self, from: try await api.get("/.well-known/openid-configuration"))
            guard let jwksURL = URLComponents(string: discovery.jwks_uri), !jwksURL.path.isEmpty else {
                throw KubernetesAPIError(message: "discovery document has an unusable jwks_uri '\(discovery.jwks_uri)'", isTransient: false)
            }
            // The key set is fetched from the API server itself: the issuer's public host may not
            // be reachable from the node, and the API server serves the same path.
            let fetched = try await VerificationKeySet(jwksJSON: try await api.get(jwksURL.path))
            let changed = fetched.keyIDs != keys?.keyIDs
            keys = fetched
            discoveredIssuer = discovery.issuer
            logger.log(
                level: changed ? .notice : .debug, "verification keys fetched by OIDC discovery",
                metadata: ["issuer": "\(discovery.issuer)", "key_ids": .list(fetched.keyIDs.sorted()), "reason": "\(reason)"])
        } catch {
            logger.error(
                "OIDC discovery failed; \(keys == nil ? "no keys yet: tokens cannot be verified" : "keeping the cached keys")",
                metadata: ["error": "\(error)", "reason": "\(reason)", "server": "\(api.configuration.displayURL)"])
        }
    }

    private struct DiscoveryDocument: Decodable {
        var issuer: String
        var jwks_uri: String
    }
}
