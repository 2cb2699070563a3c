import CertificateAuthority
import FoundationEssentials
import Glibc
import KubernetesAPI
import Logging
import SDSModel
import SDSServer
import SecretCache
import ServiceLifecycle
import UpstreamCA
import WorkloadAPI
import WorkloadAuthentication
import WorkloadServing

/// The running agent: the composition root. ``make(configuration:logger:readiness:reloadSettings:now:)``
/// builds the components (every input loaded before anything listens, so a bad setting fails at
/// start with a message that names it); ``services()`` lists the agent's loops as named services,
/// which ``run()`` runs as one `ServiceGroup` (inside `serve`'s, which owns the shutdown signals).
///
/// Where things go: a new component is built in `make` (or a builder beside it, such as
/// ``Issuance``); a new loop is one more entry of ``services()``; a new reloadable setting is in
/// ``Reload``.
package struct Agent: Service {
    let configuration: AgentConfiguration
    let issuance: Issuance
    let verifiers: TokenVerification.Verifiers
    let service: SecretDiscoveryService
    let workloadAPI: SpiffeWorkloadAPIService?
    let podWatcher: KubernetesPodWatcher?
    /// Other trust domains' bundles, watched.
    let federation: FederatedBundles?
    let readiness: AgentReadiness
    /// Held while the agent lives: no second agent on the same state directory.
    let stateLock: StateDirectoryLock
    let reloadSettings: @Sendable () async -> AgentConfiguration?
    let logger: Logger
    let now: @Sendable () -> Date
    /// The cache, exposed for tests and diagnostics.
    package let cache: SecretCache

    /// Validates `configuration` and builds the components.
    /// - Parameter reloadSettings: on SIGHUP: the caller's part of a reload (the configuration
    ///   file's live settings, such as the log level); it returns the configuration read again
    ///   (nil when it does not parse), whose policies the agent then puts in force.
    package static func make(
        configuration: AgentConfiguration, logger: Logger, readiness: AgentReadiness = AgentReadiness(),
        reloadSettings: @escaping @Sendable () async -> AgentConfiguration? = { nil }, now: @escaping @Sendable () -> Date = { Date() }
    ) async throws -> Agent {
        try configuration.validate()
        try await configuration.checkInputs()
        let stateLock = try StateDirectoryLock(directory: configuration.stateDirectory)
        let federation = configuration.federatedBundles.isEmpty
            ? nil : try FederatedBundles(sources: configuration.federatedBundles, logger: logger)
        // The verifiers first (a missing JWKS file fails here), the CA after: nothing is generated
        // or persisted before every input has loaded. An HTTPS client opened for the verifiers is
        // shut down if the CA then fails.
        let attestationPolicy = try configuration.loadAttestationPolicy()
        let verifiers = try await configuration.tokens.makeAuthenticator(
            logger: logger, now: now, needsAPI: configuration.attestation.needsPods)
        let issuance: Issuance
        do {
            issuance = try await Issuance.make(configuration, logger: logger, now: now)
        } catch {
            await verifiers.api?.shutdown()
            throw error
        }
        let cache = SecretCache(
            issuer: issuance.issuer, configuration: configuration.cacheConfiguration, logger: logger, now: now, jwt: issuance.jwt)
        let (podWatcher, attestor) = makeAttestation(configuration, policy: attestationPolicy, api: verifiers.api, readiness, logger)
        addReadinessChecks(readiness, verifiers: verifiers, issuance: issuance, configuration: configuration, now: now)
        let service = SecretDiscoveryService(
            configuration: configuration.serverConfiguration, authenticator: verifiers.authenticator, secrets: cache, logger: logger,
            now: now, readiness: { readiness.notReadyReason }, federation: federation, attestor: attestor)
        let workloadAPI = configuration.attestation.workloadSocketPath.map { _ in
            SpiffeWorkloadAPIService(
                admission: service.admission, secrets: cache, federation: federation, jwt: issuance.jwt,
                jwtTTL: configuration.attestation.jwtSVIDTTL, logger: logger, now: now)
        }
        logger.info(
            "verifier and CA loaded",
            metadata: [
                "jwks": "\(configuration.tokens.jwksFile ?? "-")", "oidc_discovery": "\(configuration.tokens.oidcDiscovery)",
                "token_review": "\(configuration.tokens.tokenReview)", "trust_domain": "\(configuration.trustDomain)",
                "ca": "\(issuance.kind)",
            ])
        return Agent(
            configuration: configuration, issuance: issuance, verifiers: verifiers, service: service, workloadAPI: workloadAPI,
            podWatcher: podWatcher, federation: federation, readiness: readiness, stateLock: stateLock,
            reloadSettings: reloadSettings, logger: logger, now: now, cache: cache)
    }

    private static func addReadinessChecks(
        _ readiness: AgentReadiness, verifiers: TokenVerification.Verifiers, issuance: Issuance, configuration: AgentConfiguration,
        now: @escaping @Sendable () -> Date
    ) {
        if let keySource = verifiers.keySource {
            readiness.add { keySource.hasKeys ? nil : "no token verification keys yet: OIDC discovery has not answered" }
        }
        let upstreamAddress = configuration.upstreamCA.map(\.endpointsText)
        for check in issuance.readinessChecks(upstreamAddress: upstreamAddress, now: now) { readiness.add(check) }
    }

    /// Every loop of the agent, in start order; graceful shutdown goes in reverse, so the sockets
    /// stop first and the API server client last.
    func services() -> [ServiceGroupConfiguration.ServiceConfiguration] {
        let (triggers, trigger) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        var loops: [any Service] = []
        if let api = verifiers.api {
            // First, so shut down last (bounded): the watchers after it use it until they stop.
            loops.append(ClosedAtShutdown("kubernetes api client") { await api.shutdown() })
        }
        if let keySource = verifiers.keySource { loops.append(NamedService("oidc key source") { await keySource.run() }) }
        if let podWatcher { loops.append(NamedService("pod watcher") { await podWatcher.run() }) }
        if let upstream = issuance.upstream {
            loops.append(NamedService("upstream ca") { try await withGracefulShutdownHandler { try await upstream.run() } onGracefulShutdown: { upstream.shutdown() } })
        }
        loops.append(NamedService("certificate rotator") { [cache] in try await Rotator(cache: cache).run() })
        loops += caLoops(triggers: triggers)
        if let federation { loops.append(NamedService("federated bundles watch") { [cache] in await federation.watch { cache.bundleChanged() } }) }
        loops += signalHandling(rotate: { trigger.yield() }).services
        if let adminPath = configuration.effectiveAdminSocketPath {
            let admin = AdminEndpoint(path: adminPath, logger: logger) { await self.inspection().json() }
            loops.append(NamedService("admin socket") { [logger] in
                do {
                    try await admin.run()
                } catch {
                    // Inspect is for humans: without it the agent still serves.
                    logger.error("admin socket unavailable; sds-agent inspect will not work", metadata: ["error": "\(error)"])
                }
            })
        }
        let listeners = Listeners(
            configuration: configuration, service: service, workloadAPI: workloadAPI, readiness: readiness, logger: logger)
        // A loop that ends by itself (a watch with nothing to watch, the admin socket that could
        // not bind) leaves the others running; the sockets ending or anything failing ends the agent.
        return loops.map { .init(service: $0, successTerminationBehavior: .ignore) } + [.init(service: listeners)]
    }

    /// The CA's loops: what it changed relayed to the cache, its scheduled (or SIGUSR1) rotation,
    /// its `--ca-dir` watched, and its expiry gauge.
    private func caLoops(triggers: AsyncStream<Void>) -> [any Service] {
        let relay = IssuerChangeRelay(issuance: issuance, cache: cache, stateDirectory: configuration.stateDirectory, logger: logger)
        var loops: [any Service] = [NamedService("issuer change relay") { await relay.run() }]
        if issuance.canRotate, let ca = issuance.ca {
            let rotator = CARotator(
                ca: ca, schedule: .init(rootTTL: configuration.caTTL, activationDelay: configuration.caActivationDelay),
                triggers: triggers, logger: logger, now: now)
            loops.append(NamedService("ca rotator") { try await rotator.run() })
        }
        if let caDirectory = configuration.caDirectory, let ca = issuance.ca {
            let watcher = CADirectoryWatcher(
                directory: caDirectory, ca: ca, activationDelay: configuration.caActivationDelay, logger: logger, now: now)
            loops.append(NamedService("ca directory watch") { await watcher.run() })
        }
        let gauge = CAExpiryGauge(notAfter: { [issuance] in issuance.notAfter }, now: now, clock: ContinuousClock())
        loops.append(NamedService("ca expiry gauge") { await gauge.run() })
        let taint = TaintFollower(
            issuance: issuance, cache: cache, window: configuration.taintReissueWindow, grace: configuration.taintRootGrace,
            clock: ContinuousClock(), logger: logger)
        loops.append(NamedService("taint follower") { await taint.run() })
        return loops
    }

    private func signalHandling(rotate: @escaping @Sendable () -> Void) -> SignalHandling {
        let reload = Reload(readSettings: reloadSettings, service: service, fileKeys: verifiers.fileKeys, logger: logger)
        return SignalHandling(
            rotationRefusal: issuance.canRotate
                ? nil
                : issuance.upstream != nil
                    ? "the upstream CA rotates its own root; the agent pushes it when the CA sends it"
                    : "a CA from --ca-cert or --ca-dir is rotated by replacing its files, not by the agent",
            rotate: rotate, reloading: "the configuration file's live settings and the JWKS file",
            reload: { await reload.run() }, carryingOn: "the agent", logger: logger)
    }

    /// Runs every service of the agent until graceful shutdown (SIGTERM/SIGINT/SIGQUIT through
    /// `serve`'s group, which this one runs inside) or cancellation.
    package func run() async throws {
        try await ServiceGroup(configuration: .init(services: services(), logger: logger)).run()
    }
}

extension Agent: CustomStringConvertible {
    /// What ServiceLifecycle logs for the service: its socket, not the whole configuration (which
    /// would print paths, URLs and policies at every start and stop).
    package var description: String { "Agent(socket: \(configuration.socketPath))" }
}
