import CertificateAuthority
import CoreMetrics
import FoundationEssentials
import Glibc
import GRPCCore
import GRPCNIOTransportHTTP2
import KubernetesAPI
import Logging
import NIOCore
import SDSModel
import SDSServer
import WorkloadServing
import SecretCache
import ServiceLifecycle
import UnixSignals
import UpstreamCA
import WorkloadAPI
import WorkloadAuthentication
import X509

/// The running agent: the SDS gRPC server on the Unix socket, the certificate rotator, the CA
/// rotator, wired to their components.
///
/// Built by ``make(configuration:logger:now:)``, which loads every input (JWKS, CA) before
/// anything listens, so a bad setting fails at start with a message that names it.
public struct Agent: Service {
    private let configuration: AgentConfiguration
    private let service: SecretDiscoveryService
    private let ca: EmbeddedCA?
    private let upstream: UpstreamCA?
    private let readiness: AgentReadiness
    /// Held while the agent lives: no second agent on the same state directory.
    private let stateLock: StateDirectoryLock
    /// Other trust domains' bundles, watched.
    private let federation: FederatedBundles?
    private let caChanges: AsyncStream<IssuerChange>
    private let canRotateCA: Bool
    private let keySource: OIDCDiscoveryKeySource?
    private let fileKeys: JWKSFileKeySource?
    private let reloadSettings: @Sendable () async -> AgentConfiguration?
    private let api: KubernetesAPIClient?
    /// This node's pods, watched (with a peer-attested socket or an attestation policy).
    private let podWatcher: KubernetesPodWatcher?
    /// The SPIFFE Workload API, served on the peer-attested socket.
    private let workloadAPI: SpiffeWorkloadAPIService?
    private let logger: Logger
    private let now: @Sendable () -> Date
    /// The cache, exposed for tests and diagnostics.
    public let cache: SecretCache

    /// Validates `configuration` and builds the components.
    /// - Parameter reloadSettings: on SIGHUP: the caller's part of a reload (the configuration
    ///   file's live settings, such as the log level); it returns the configuration read again
    ///   (nil when it does not parse), whose authorization policy the agent then puts in force.
    public static func make(
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
        let (authenticator, keySource, api) = (verifiers.authenticator, verifiers.keySource, verifiers.api)
        let (caChanges, changeSink) = AsyncStream.makeStream(of: IssuerChange.self)
        let issuer: any CertificateIssuer
        var ca: EmbeddedCA?
        var upstream: UpstreamCA?
        var jwtAuthority: JWTAuthority?
        let loadedFromFiles = configuration.caCertificateFile != nil || configuration.caDirectory != nil
        do {
            if var upstreamConfiguration = configuration.upstreamCA {
                let directory = URL(fileURLWithPath: configuration.stateDirectory).appendingPathComponent("upstream").path
                do {
                    try RootCAStore.makeDirectory(directory, mode: 0o700)
                    upstreamConfiguration.bundleCacheFile = directory + "/trust-bundle.pem"
                } catch {
                    logger.warning("upstream CA: cannot keep its trust bundle across restarts", metadata: ["error": "\(error)"])
                }
                let client = try UpstreamCA(
                    configuration: upstreamConfiguration, logger: logger, now: now, onChange: { changeSink.yield($0) })
                logger.info(
                    "upstream CA configured",
                    metadata: [
                        "ca": "\(upstreamConfiguration.host):\(upstreamConfiguration.port)",
                        "credential": "\(upstreamConfiguration.credentialMode)", "cluster_id": "\(upstreamConfiguration.clusterID)",
                    ])
                upstream = client
                issuer = client
                // istiod and `ca serve` accept tokens for `istio-ca` unless told otherwise: a
                // forwarded token for another audience alone is refused at every CSR.
                if upstreamConfiguration.credentialMode == .forward, !configuration.tokens.audiences.contains("istio-ca") {
                    logger.warning(
                        "upstream CA in forward mode: the callers' tokens go to the CA, which accepts audience istio-ca by default, and --audience does not include it; every CSR may be refused (readiness says so)",
                        metadata: ["audiences": .list(configuration.tokens.audiences)])
                }
            } else {
                let authority: SigningAuthority
                var additionalRoots: [Certificate] = []
                if let caDirectory = configuration.caDirectory {
                    authority = try RootCAStore.load(caDirectory: caDirectory, now: now())
                } else if let certFile = configuration.caCertificateFile, let keyFile = configuration.caKeyFile {
                    authority = try RootCAStore.load(certificateFile: certFile, keyFile: keyFile, bundleFile: configuration.caBundleFile)
                } else {
                    authority = try RootCAStore.loadOrCreate(
                        stateDirectory: configuration.stateDirectory, trustDomain: configuration.trustDomain,
                        ttl: configuration.caTTL, now: now(), logger: logger, keyType: configuration.caKeyType)
                    additionalRoots = RootCAStore.additionalRoots(stateDirectory: configuration.stateDirectory, now: now())
                }
                // Leaves an old root signed before a restart expire within one certificate lifetime.
                let embedded = EmbeddedCA(
                    authority: authority, trustDomain: configuration.trustDomain, logger: logger,
                    additionalRoots: additionalRoots, retireAfter: now().addingTimeInterval(configuration.certificateTTL.timeInterval),
                    now: now, rootKeyType: configuration.caKeyType, onChange: { change, _ in changeSink.yield(change) })
                ca = embedded
                issuer = embedded
                // Checked before it is trusted: the CA's own life bounds every leaf.
                let notAfter = authority.certificate.notValidAfter
                logger.info("CA certificate", metadata: [
                    "not_after": "\(notAfter.formatted(.iso8601))", "subject": "\(authority.certificate.subject)",
                ])
                if let reason = CertificateProfile.outlivesRoot(authority) {
                    logger.warning("CA certificate outlives its root", metadata: ["reason": "\(reason)"])
                }
                if configuration.attestation.workloadSocketPath != nil {
                    jwtAuthority = try JWTAuthority.loadOrCreate(
                        stateDirectory: configuration.stateDirectory, trustDomain: configuration.trustDomain)
                }
                if notAfter < now().addingTimeInterval(configuration.certificateTTL.timeInterval) {
                    logger.warning(
                        "certificates will be cut short: the CA expires before --cert-ttl runs out",
                        metadata: [
                            "ca_not_after": "\(notAfter.formatted(.iso8601))",
                            "cert_ttl_ends": "\(now().addingTimeInterval(configuration.certificateTTL.timeInterval).formatted(.iso8601))",
                        ])
                }
            }
        } catch {
            await api?.shutdown()
            throw error
        }
        var cacheConfiguration = SecretCache.Configuration(
            certificateTTL: configuration.certificateTTL, rotation: configuration.rotation, idleTTL: configuration.idleTTL)
        cacheConfiguration.keyType = configuration.workloadKeyType
        let cache = SecretCache(issuer: issuer, configuration: cacheConfiguration, logger: logger, now: now)
        if let keySource {
            readiness.add { keySource.hasKeys ? nil : "no token verification keys yet: OIDC discovery has not answered" }
        }
        if let ca {
            readiness.add {
                let certificate = ca.activeCertificate
                let time = now()
                if time >= certificate.notValidAfter {
                    return "the CA certificate expired at \(certificate.notValidAfter.formatted(.iso8601)): it cannot sign"
                }
                if time < certificate.notValidBefore {
                    return "the CA certificate is not valid before \(certificate.notValidBefore.formatted(.iso8601))"
                }
                return nil
            }
        }
        if let upstream, let address = configuration.upstreamCA.map({ "\($0.host):\($0.port)" }) {
            readiness.add { upstream.isReachable == false ? "the upstream CA \(address) does not answer" : upstream.refusesForwardedTokens }
        }
        var podWatcher: KubernetesPodWatcher?
        if configuration.attestation.needsPods, let api, let node = configuration.attestation.nodeName {
            let watcher = KubernetesPodWatcher(client: api, configuration: .init(nodeName: node), logger: logger)
            readiness.add { watcher.hasListed ? nil : "the pods of node \(node) have not been listed from the API server yet" }
            podWatcher = watcher
        }
        let attestor = configuration.attestation.needsPods
            ? WorkloadAttestor(
                pods: podWatcher, procRoot: configuration.peerPolicy.procRoot, trustDomain: configuration.trustDomain,
                policy: attestationPolicy)
            : nil
        var serverConfiguration = SDSServerConfiguration(
            workloadSecretName: configuration.workloadSecretName,
            validationContextNames: configuration.effectiveValidationContextNames,
            tokenHeaderKey: configuration.tokenHeader, tokenExpiryMargin: configuration.tokenExpiryMargin,
            authorization: configuration.authorization, peerPolicy: configuration.peerPolicy, limits: configuration.limits.streams)
        serverConfiguration.federatedTrustDomains = Set(configuration.federatedBundles.map(\.trustDomain))
        serverConfiguration.allBundlesName = configuration.allBundlesName
        let service = SecretDiscoveryService(
            configuration: serverConfiguration, authenticator: authenticator, secrets: cache, logger: logger, now: now,
            readiness: { readiness.notReadyReason }, federation: federation, attestor: attestor)
        let workloadAPI = configuration.attestation.workloadSocketPath == nil
            ? nil
            : SpiffeWorkloadAPIService(
                admission: service.admission, secrets: cache, federation: federation, jwt: jwtAuthority,
                jwtTTL: configuration.attestation.jwtSVIDTTL, logger: logger, now: now)
        if !attestationPolicy.rules.isEmpty {
            logger.info("attestation policy loaded", metadata: [
                "file": "\(configuration.attestation.policyFile ?? "-")", "rules": .number(attestationPolicy.rules.count),
            ])
        }
        logger.info(
            "verifier and CA loaded",
            metadata: [
                "jwks": "\(configuration.tokens.jwksFile ?? "-")", "oidc_discovery": "\(configuration.tokens.oidcDiscovery)",
                "token_review": "\(configuration.tokens.tokenReview)", "trust_domain": "\(configuration.trustDomain)",
                "ca": "\(upstream != nil ? "upstream" : loadedFromFiles ? "files" : "embedded")",
            ])
        return Agent(
            configuration: configuration, service: service, ca: ca, upstream: upstream, readiness: readiness, caChanges: caChanges,
            canRotateCA: ca != nil && !loadedFromFiles,
            keySource: keySource, fileKeys: verifiers.fileKeys, reloadSettings: reloadSettings, api: api, logger: logger,
            now: now, cache: cache, stateLock: stateLock, federation: federation, podWatcher: podWatcher, workloadAPI: workloadAPI)
    }

    private init(
        configuration: AgentConfiguration, service: SecretDiscoveryService, ca: EmbeddedCA?, upstream: UpstreamCA?,
        readiness: AgentReadiness,
        caChanges: AsyncStream<IssuerChange>, canRotateCA: Bool, keySource: OIDCDiscoveryKeySource?,
        fileKeys: JWKSFileKeySource?, reloadSettings: @escaping @Sendable () async -> AgentConfiguration?, api: KubernetesAPIClient?,
        logger: Logger, now: @escaping @Sendable () -> Date, cache: SecretCache, stateLock: StateDirectoryLock,
        federation: FederatedBundles?, podWatcher: KubernetesPodWatcher?, workloadAPI: SpiffeWorkloadAPIService?
    ) {
        self.podWatcher = podWatcher
        self.workloadAPI = workloadAPI
        self.stateLock = stateLock
        self.federation = federation
        self.keySource = keySource
        self.fileKeys = fileKeys
        self.reloadSettings = reloadSettings
        self.api = api
        self.configuration = configuration
        self.service = service
        self.ca = ca
        self.upstream = upstream
        self.readiness = readiness
        self.caChanges = caChanges
        self.canRotateCA = canRotateCA
        self.logger = logger
        self.now = now
        self.cache = cache
    }

    /// Listens on the socket and serves until graceful shutdown (SIGTERM/SIGINT/SIGQUIT through
    /// the ServiceGroup). `SIGUSR1` starts a root rotation of the embedded CA; `SIGHUP` reloads (JWKS file, and the caller's settings); `SIGUSR2`
    /// and `SIGALRM` are logged and otherwise ignored, so none of them kills the agent.
    public func run() async throws {
        do {
            try await serve()
        } catch {
            await api?.shutdown()
            throw error
        }
        await api?.shutdown()
    }

    /// What `sds-agent inspect` shows.
    public func inspection() async -> Inspection {
        let ca =
            configuration.upstreamCA.map { "upstream \($0.host):\($0.port)" }
            ?? (configuration.caCertificateFile != nil ? "files" : "embedded")
        let reason = readiness.notReadyReason
        return await Inspection.make(
            agent: .init(
                version: BuildInfo.version, pid: getpid(), socket: configuration.socketPath,
                trustDomain: configuration.trustDomain, ca: ca, ready: reason == nil, notReadyReason: reason),
            cache: cache, streams: service.openStreams.snapshot, bundle: await cache.trustBundle(),
            bundleNames: configuration.effectiveValidationContextNames.sorted())
    }

    private func serve() async throws {
        let path = configuration.socketPath
        let fd = try UnixSocketListener.bind(
            path: path, mode: mode_t(configuration.socketMode), backlog: configuration.limits.listenBacklog)
        defer { unlink(path) }
        let limits = configuration.limits
        let connections = ConnectionGuard(limits: limits.connections, logger: logger)
        let transport = makeTransport(fd: fd, path: path, connections: connections, onStream: PeerCredentialsHandler.install)
        let server = GRPCServer(transport: transport, services: [service])
        // The peer-attested socket: the same SDS service (callers proven by their pod, not a
        // token) and the SPIFFE Workload API; the same connection limits.
        let workloadServer: GRPCServer<HTTP2ServerTransport.Posix>?
        if let workloadPath = configuration.attestation.workloadSocketPath, let workloadAPI {
            let workloadFD = try UnixSocketListener.bind(
                path: workloadPath, mode: mode_t(configuration.socketMode), backlog: limits.listenBacklog)
            let workloadTransport = makeTransport(
                fd: workloadFD, path: workloadPath, connections: connections, onStream: PeerCredentialsHandler.installForWorkloadSocket)
            workloadServer = GRPCServer(transport: workloadTransport, services: [service, workloadAPI])
            logger.notice("peer-attested socket serving SDS and the SPIFFE Workload API", metadata: [
                "socket": "\(workloadPath)", "node": "\(configuration.attestation.nodeName ?? "-")",
            ])
        } else {
            workloadServer = nil
        }
        defer { if let workloadPath = configuration.attestation.workloadSocketPath { unlink(workloadPath) } }
        logger.notice(
            "sds-agent serving",
            metadata: [
                "socket": "\(path)", "mode": "\(String(configuration.socketMode, radix: 8))",
                "workload_secret": "\(configuration.workloadSecretName)",
                "validation_contexts": .list(configuration.effectiveValidationContextNames.sorted()),
                "cert_ttl": "\(DurationText.format(configuration.certificateTTL))", "pid": .number(Int(getpid())),
                "version": "\(BuildInfo.version)",
            ])
        let (triggers, trigger) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let rotator = Rotator(cache: cache)
        let caRotator = ca.map {
            CARotator(
                ca: $0, schedule: .init(rootTTL: configuration.caTTL, activationDelay: configuration.caActivationDelay),
                triggers: triggers, logger: logger, now: now)
        }

        try await withGracefulShutdownHandler {
            try await withThrowingDiscardingTaskGroup { group in
                group.addTask { [readiness] in
                    if (try? await transport.listeningAddress) != nil { readiness.markListening() }
                }
                group.addTask {
                    do {
                        try await server.serve()
                    } catch {
                        // At shutdown the open streams are cut by cancellation; that is the plan, not a failure.
                        if !Task.isCancelled { throw error }
                    }
                }
                if let workloadServer {
                    group.addTask {
                        do {
                            try await workloadServer.serve()
                        } catch {
                            if !Task.isCancelled { throw error }
                        }
                    }
                }
                if let podWatcher { group.addTask { await podWatcher.run() } }
                group.addTask { try await rotator.run() }
                if let federation {
                    group.addTask { [cache] in await federation.watch { cache.bundleChanged() } }
                }
                if let caDirectory = configuration.caDirectory, let ca {
                    let watcher = CADirectoryWatcher(
                        directory: caDirectory, ca: ca, activationDelay: configuration.caActivationDelay, logger: logger, now: now)
                    group.addTask { await watcher.run() }
                }
                if let adminPath = configuration.effectiveAdminSocketPath {
                    let admin = AdminEndpoint(path: adminPath, logger: logger) { await self.inspection().json() }
                    group.addTask {
                        do {
                            try await admin.run()
                        } catch {
                            // Inspect is for humans: without it the agent still serves.
                            logger.error("admin socket unavailable; sds-agent inspect will not work", metadata: ["error": "\(error)"])
                        }
                    }
                }
                group.addTask { [ca, upstream, now] in
                    // Seconds until the CA (or the earliest upstream root) expires, for alerts.
                    let gauge = Meter(label: "sds_agent_ca_expiry_seconds")
                    while !Task.isCancelled {
                        if let notAfter = ca?.activeCertificate.notValidAfter ?? upstream?.earliestRootNotAfter {
                            gauge.set(notAfter.timeIntervalSince(now()))
                        }
                        try? await Task.sleep(for: .seconds(10))
                    }
                }
                if canRotateCA, let caRotator { group.addTask { try await caRotator.run() } }
                if let upstream {
                    group.addTask {
                        do {
                            try await upstream.run()
                        } catch {
                            if !Task.isCancelled { throw error }
                        }
                    }
                }
                group.addTask { await relayCAChanges() }
                if let keySource { group.addTask { await keySource.run() } }
                group.addTask {
                    for await _ in await UnixSignalsSequence(trapping: .sigusr1) {
                        guard canRotateCA else {
                            logger.warning(
                                upstream != nil
                                    ? "SIGUSR1: the upstream CA rotates its own root; the agent pushes it when the CA sends it"
                                    : "SIGUSR1: a CA from --ca-cert or --ca-dir is rotated by replacing its files, not by the agent")
                            continue
                        }
                        logger.notice("SIGUSR1: starting a CA root rotation")
                        trigger.yield()
                    }
                }
                group.addTask { [reloadSettings, fileKeys, service] in
                    // SIGHUP reloads; the others are logged: their default action would kill the
                    // agent and leave its socket behind.
                    for await signal in await UnixSignalsSequence(trapping: .sighup, .sigusr2, .sigalrm) {
                        guard signal == .sighup else {
                            logger.notice("\(signal): nothing to do; the agent carries on")
                            continue
                        }
                        logger.notice("SIGHUP: reloading the configuration file's live settings and the JWKS file")
                        if let fresh = await reloadSettings() {
                            if let rule = fresh.authorization.malformedRule() {
                                logger.error("reload refused for the authorization policy: malformed rule", metadata: ["rule": "\(rule)"])
                            } else if fresh.authorization != service.authorization.value {
                                service.authorization.replace(with: fresh.authorization)
                                logger.notice("authorization policy reloaded", metadata: ["policy": "\(fresh.authorization)"])
                            }
                            reloadAttestationPolicy(file: fresh.attestation.policyFile)
                        }
                        await fileKeys?.reload(logger: logger)
                    }
                }
                try await gracefulShutdown()
                group.cancelAll()
            }
        } onGracefulShutdown: {
            logger.notice("shutting down: no new streams; open streams end")
            server.beginGracefulShutdown()
            workloadServer?.beginGracefulShutdown()
            upstream?.shutdown()
        }
    }

    /// The gRPC transport on a listening socket we made: our backlog, the connection guard, and
    /// `onStream` (the peer credentials of each stream, marked with the socket).
    private func makeTransport(
        fd: Int32, path: String, connections: ConnectionGuard, onStream: @escaping @Sendable (any Channel) -> EventLoopFuture<Void>
    ) -> HTTP2ServerTransport.Posix {
        let limits = configuration.limits
        return HTTP2ServerTransport.Posix(
            listeningSocketDescriptor: Int(fd), transportSecurity: .plaintext,
            config: .defaults { config in
                config.http2.maxConcurrentStreams = configuration.maxStreamsPerConnection
                config.rpc.maxRequestPayloadSize = limits.maxRequestBytes
                // Not for debugging: the public hooks that see the listener, each connection and
                // each stream's connection.
                config.channelDebuggingCallbacks.onBindTCPListener = { channel in
                    // NIO listens again with its own backlog of 128 when it adopts the socket; at a
                    // node restart hundreds of sidecars connect at once, and connections past the
                    // backlog are refused by the kernel (measured: 35% failed at 1,000). Listening
                    // once more sets ours (listen(2) on a listening socket only updates it).
                    channel.eventLoop.makeCompletedFuture {
                        guard listen(fd, limits.listenBacklog) == 0 else {
                            throw ListenerError(path: path, "listen(backlog \(limits.listenBacklog)): errno \(errno)")
                        }
                    }
                }
                config.channelDebuggingCallbacks.onAcceptTCPConnection = connections.install
                config.channelDebuggingCallbacks.onAcceptHTTP2Stream = onStream
            })
    }

    /// SIGHUP: the attestation policy file read again; a file that does not load changes nothing.
    private func reloadAttestationPolicy(file: String?) {
        guard let attestor = service.admission.attestor else {
            if file != nil { logger.warning("SIGHUP: --attestation-policy needs a restart to be turned on") }
            return
        }
        do {
            let fresh = try file.map { path throws(ConfigurationError) in try AttestationPolicyFile.load(path) } ?? .none
            if fresh != attestor.policy {
                attestor.replacePolicy(with: fresh)
                logger.notice("attestation policy reloaded", metadata: ["rules": .number(fresh.rules.count)])
            }
        } catch {
            logger.error("reload refused for the attestation policy; the rules in force stay", metadata: ["error": "\(error)"])
        }
    }

    /// Tells the cache (and through it every stream) what the CA changed, and persists a new root.
    private func relayCAChanges() async {
        for await change in caChanges {
            switch change {
            case .bundleChanged:
                cache.bundleChanged()
            case .signerChanged:
                await cache.renewAll()
                if canRotateCA, let ca {
                    do {
                        try RootCAStore.persist(
                            active: ca.activeAuthority, roots: ca.roots, stateDirectory: configuration.stateDirectory)
                    } catch {
                        logger.error("CA rotation: cannot persist the new root; a restart would go back to the old one", metadata: ["error": "\(error)"])
                    }
                }
            }
        }
    }
}

extension Agent: CustomStringConvertible {
    /// What ServiceLifecycle logs for the service: its socket, not the whole configuration (which
    /// would print paths, URLs and policies at every start and stop).
    public var description: String { "Agent(socket: \(configuration.socketPath))" }
}
