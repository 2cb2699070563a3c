import CertificateAuthority
import CoreMetrics
import FoundationEssentials
import Glibc
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import NIOCore
import SDSModel
import SDSServer
import SecretCache
import ServiceLifecycle
import UnixSignals
import WorkloadAPI
import WorkloadAuthentication
import WorkloadServing

/// One of the agent's loops, named in the service group's log lines. Graceful shutdown cancels
/// it; an error thrown after that (the cancellation itself) is the plan, not a failure.
struct NamedService: Service, CustomStringConvertible {
    let description: String
    let body: @Sendable () async throws -> Void

    init(_ name: String, _ body: @escaping @Sendable () async throws -> Void) {
        self.description = name
        self.body = body
    }

    func run() async throws {
        do {
            try await cancelWhenGracefulShutdown(body)
        } catch {
            if Task.isCancelled || Task.isShuttingDownGracefully { return }
            throw error
        }
    }
}

/// What must be closed when the agent stops (a client the other loops share): `close` runs once
/// this service's graceful shutdown comes, or the group is cancelled.
struct ClosedAtShutdown: Service, CustomStringConvertible {
    let description: String
    let close: @Sendable () async -> Void

    init(_ name: String, close: @escaping @Sendable () async -> Void) {
        self.description = name
        self.close = close
    }

    func run() async {
        try? await gracefulShutdown()
        await close()
    }
}

/// The agent's sockets: the token socket (SDS) and, with `--workload-socket`, the peer-attested
/// one (SDS and the SPIFFE Workload API), bound in that order, each removed when it stops.
/// Graceful shutdown stops new streams; the open ones end.
struct Listeners: Service, CustomStringConvertible {
    let configuration: AgentConfiguration
    let service: SecretDiscoveryService
    let workloadAPI: SpiffeWorkloadAPIService?
    let readiness: AgentReadiness
    let logger: Logger
    var description: String { "listeners(\(configuration.socketPath))" }

    func run() async throws {
        let path = configuration.socketPath
        let limits = configuration.limits
        let fd = try UnixSocketListener.bind(path: path, mode: mode_t(configuration.socketMode), backlog: limits.listenBacklog)
        defer { unlink(path) }
        let connections = ConnectionGuard(limits: limits.connections, logger: logger)
        let transport = makeTransport(fd: fd, path: path, connections: connections, onStream: PeerCredentialsHandler.install)
        var servers = [GRPCServer(transport: transport, services: [service])]
        if let workloadPath = configuration.attestation.workloadSocketPath, let workloadAPI {
            let workloadFD = try UnixSocketListener.bind(path: workloadPath, mode: mode_t(configuration.socketMode), backlog: limits.listenBacklog)
            let workloadTransport = makeTransport(
                fd: workloadFD, path: workloadPath, connections: connections, onStream: PeerCredentialsHandler.installForWorkloadSocket)
            servers.append(GRPCServer(transport: workloadTransport, services: [service, workloadAPI]))
            logger.notice("peer-attested socket serving SDS and the SPIFFE Workload API", metadata: [
                "socket": "\(workloadPath)", "node": "\(configuration.attestation.nodeName ?? "-")",
            ])
        }
        // Registered once both are bound: a file that was not ours stays.
        defer { if servers.count > 1, let workloadPath = configuration.attestation.workloadSocketPath { unlink(workloadPath) } }
        logger.notice(
            "sds-agent serving",
            metadata: [
                "socket": "\(path)", "mode": "\(String(configuration.socketMode, radix: 8))",
                "workload_secret": "\(configuration.workloadSecretName)",
                "validation_contexts": .list(configuration.effectiveValidationContextNames.sorted()),
                "cert_ttl": "\(DurationText.format(configuration.certificateTTL))", "pid": .number(Int(getpid())),
                "version": "\(BuildInfo.version)",
            ])
        try await serveUntilShutdown(
            servers, listening: transport, onListening: { [readiness] _ in readiness.markListening() },
            shutdownMessage: "shutting down: no new streams; open streams end", logger: logger)
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
                // Not for debugging: the package hooks that see the listener, each connection and
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
}

/// Serves `servers` until graceful shutdown, which stops new streams and cuts the open ones (by
/// cancellation: that is the plan, not a failure). `onListening` gets `transport`'s address once
/// it listens.
func serveUntilShutdown(
    _ servers: [GRPCServer<HTTP2ServerTransport.Posix>], listening transport: HTTP2ServerTransport.Posix,
    onListening: @escaping @Sendable (String) -> Void, shutdownMessage: Logger.Message, logger: Logger
) async throws {
    do {
        try await withGracefulShutdownHandler {
            try await cancelWhenGracefulShutdown {
                try await withThrowingDiscardingTaskGroup { group in
                    group.addTask {
                        if let bound = try? await transport.listeningAddress { onListening("\(bound)") }
                    }
                    for server in servers { group.addTask { try await server.serve() } }
                }
            }
        } onGracefulShutdown: {
            logger.notice(shutdownMessage)
            for server in servers { server.beginGracefulShutdown() }
        }
    } catch {
        if !(Task.isCancelled || Task.isShuttingDownGracefully) { throw error }
    }
}

/// Tells the cache (and through it every stream) what the CA changed, and persists a new root of
/// a CA the agent generated.
struct IssuerChangeRelay {
    let issuance: Issuance
    let cache: SecretCache
    let stateDirectory: String
    let logger: Logger

    func run() async {
        for await change in issuance.changes {
            switch change {
            case .bundleChanged:
                cache.bundleChanged()
            case .taintChanged:
                // The taint follower looks every second; nothing to do here.
                break
            case .signerChanged:
                await cache.renewAll()
                guard issuance.canRotate, let ca = issuance.ca else { continue }
                do {
                    try RootCAStore.persist(active: ca.activeAuthority, roots: ca.roots, stateDirectory: stateDirectory)
                } catch {
                    logger.error("CA rotation: cannot persist the new root; a restart would go back to the old one", metadata: ["error": "\(error)"])
                }
            }
        }
    }
}

/// `sds_agent_ca_expiry_seconds`: seconds until the CA (or the earliest upstream root) expires,
/// set every `interval` of `clock`, for alerts.
struct CAExpiryGauge<C: Clock<Duration>>: Sendable {
    let notAfter: @Sendable () -> Date?
    let now: @Sendable () -> Date
    let clock: C
    var interval: Duration = .seconds(10)
    var gauge = Meter(label: "sds_agent_ca_expiry_seconds")

    func run() async {
        while !Task.isCancelled {
            if let notAfter = notAfter() { gauge.set(notAfter.timeIntervalSince(now())) }
            try? await clock.sleep(for: interval)
        }
    }
}

/// The signals acted on besides the service group's shutdown signals. SIGUSR1 starts a root
/// rotation of a CA we generated (`rotationRefusal` says why not, for any other); SIGHUP runs
/// `reload` (nil: nothing to reload); SIGUSR2 and SIGALRM are logged, since their default action
/// would kill the process and leave its socket behind.
struct SignalHandling {
    let rotationRefusal: String?
    let rotate: @Sendable () -> Void
    /// What a SIGHUP reloads, in the log line, and how.
    let reloading: String
    let reload: (@Sendable () async -> Void)?
    /// `the agent` or `the CA`, for the line of an ignored signal.
    let carryingOn: String
    let logger: Logger

    func rotateOnSIGUSR1() async {
        for await _ in await UnixSignalsSequence(trapping: .sigusr1) {
            if let rotationRefusal {
                logger.warning("SIGUSR1: \(rotationRefusal)")
                continue
            }
            logger.notice("SIGUSR1: starting a CA root rotation")
            rotate()
        }
    }

    func reloadOnSIGHUP() async {
        for await signal in await UnixSignalsSequence(trapping: .sighup, .sigusr2, .sigalrm) {
            guard signal == .sighup, let reload else {
                logger.notice("\(signal): nothing to do; \(carryingOn) carries on")
                continue
            }
            logger.notice("SIGHUP: reloading \(reloading)")
            await reload()
        }
    }

    /// The services of both loops.
    var services: [any Service] {
        [NamedService("SIGUSR1 rotation") { await rotateOnSIGUSR1() }, NamedService("SIGHUP reload") { await reloadOnSIGHUP() }]
    }
}

/// What SIGHUP puts in force: the authorization and attestation policies of the configuration
/// read again, and the JWKS file. A policy that does not load changes nothing.
struct Reload {
    let readSettings: @Sendable () async -> AgentConfiguration?
    let service: SecretDiscoveryService
    let fileKeys: JWKSFileKeySource?
    let logger: Logger

    func run() async {
        if let fresh = await readSettings() {
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
}
