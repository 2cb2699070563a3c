import CentralCA
import CertificateAuthority
import CoreMetrics
import FoundationEssentials
import Glibc
import GRPCCore
import GRPCNIOTransportHTTP2
import NIOCore
import KubernetesAPI
import Logging
import SDSModel
import TLSLinks
import ServiceLifecycle
import UnixSignals
import WorkloadAuthentication
import SwiftASN1
import Synchronization
import X509

/// Everything `sds-agent ca serve` needs, validated before it listens.
package struct CentralCAConfiguration: Sendable {
    /// `HOST:PORT` to serve Istio's CSR API on, over TLS.
    package var listenHost: String
    package var listenPort: Int
    /// How callers' tokens are verified (the same verifiers as `serve`).
    package var tokens: TokenVerification
    /// Directory of a root it generates (`<dir>/ca/root-cert.pem`, as `serve` keeps it): one
    /// replica only, since the root and its rotation live in that directory.
    package var stateDirectory: String?
    /// A CA in Istio's `cacerts` layout (`--ca-dir`), watched: any number of replicas that read
    /// the same directory (one Kubernetes Secret) are one CA, and keep no state of their own.
    package var caDirectory: String?
    /// Lifetime of a root it generates.
    package var caTTL: Duration = Defaults.Certificates.caTTL
    /// Key type of a root it generates.
    package var caKeyType: KeyType = .ecP256
    /// A CA to sign with instead of a generated root.
    package var caCertificateFile: String?
    package var caKeyFile: String?
    /// Lifetime when a request asks for none.
    package var certificateTTL: Duration = Defaults.Certificates.ttl
    /// Longest lifetime granted (istiod's default maximum is 90 days).
    package var maxCertificateTTL: Duration = Defaults.Certificates.maxTTL
    /// After SIGUSR1, how long old + new roots are sent before the new one signs. Agents learn the
    /// new root from their next answer, so this must exceed their renewal interval.
    package var caActivationDelay: Duration = Defaults.Certificates.caActivationDelay
    /// SANs of the TLS certificate it issues itself.
    package var serverNames: [String] = ["localhost", "127.0.0.1"]
    /// A TLS certificate and key to present instead.
    package var tlsCertificateFile: String?
    package var tlsKeyFile: String?
    /// `NAMESPACE/NAME` service accounts that may ask for identities on their node.
    package var trustedNodeAccounts: [String] = []
    /// Which key exchanges its TLS takes (`--tls-policy`).
    package var tlsPolicy: TLSPolicy = Defaults.Links.tlsPolicy

    package init(listenHost: String, listenPort: Int, tokens: TokenVerification, stateDirectory: String?) {
        self.listenHost = listenHost
        self.listenPort = listenPort
        self.tokens = tokens
        self.stateDirectory = stateDirectory
    }

    /// Whether it makes (and rotates) its own root in `stateDirectory`.
    var generatesRoot: Bool { caDirectory == nil && caCertificateFile == nil }

    /// Checks the configuration; the error names the flag.
    package func validate() throws(ConfigurationError) {
        func fail(_ code: ConfigurationError.Code, _ message: String) -> ConfigurationError {
            ConfigurationError(code, message: message)
        }
        try tokens.validate()
        if caDirectory != nil {
            guard caCertificateFile == nil else { throw fail(.conflictingSettings, "--ca-dir and --ca-cert: give one CA") }
            guard stateDirectory == nil else {
                throw fail(.conflictingSettings, "--ca-dir and --state-dir: a CA from --ca-dir keeps no state; drop --state-dir")
            }
        } else if caCertificateFile == nil {
            guard let stateDirectory else {
                throw fail(.missingSetting, "--state-dir (a generated root, one replica) or --ca-dir (Istio's cacerts, any number of replicas) is needed")
            }
            guard !stateDirectory.isEmpty else { throw fail(.invalidValue, "--state-dir must not be empty") }
        }
        guard certificateTTL >= .seconds(10) else { throw fail(.invalidValue, "--cert-ttl must be at least 10s") }
        guard maxCertificateTTL >= certificateTTL else { throw fail(.invalidValue, "--max-cert-ttl must be at least --cert-ttl") }
        guard caTTL > maxCertificateTTL || !generatesRoot else {
            throw fail(.invalidValue, "--ca-ttl must be longer than --max-cert-ttl")
        }
        guard (caCertificateFile == nil) == (caKeyFile == nil) else { throw fail(.conflictingSettings, "--ca-cert and --ca-key go together") }
        guard (tlsCertificateFile == nil) == (tlsKeyFile == nil) else { throw fail(.conflictingSettings, "--tls-cert and --tls-key go together") }
        guard tlsCertificateFile != nil || !serverNames.isEmpty else { throw fail(.invalidValue, "--server-name: at least one name") }
        for name in serverNames where name.isEmpty || name.contains(where: { $0.isWhitespace || $0 == "/" }) {
            throw fail(.invalidValue, "--server-name '\(name)' is not a DNS name or an IP address")
        }
        for account in trustedNodeAccounts {
            let parts = account.split(separator: "/", omittingEmptySubsequences: false)
            guard parts.count == 2, KubernetesName.isValid(String(parts[0])), KubernetesName.isValid(String(parts[1])) else {
                throw fail(.invalidValue, "--trusted-node-account '\(account)' is not NAMESPACE/NAME")
            }
        }
    }
}

/// `sds-agent ca serve`: a central CA speaking Istio's CSR API over TLS, for meshes without istiod.
/// Agents on every node point `--upstream-ca` at it; their keys and its key never move.
package struct CentralCAServer: Service {
    private let configuration: CentralCAConfiguration
    private let service: IstioCertificateService
    private let ca: EmbeddedCA
    private let caChanges: AsyncStream<IssuerChange>
    private let canRotate: Bool
    /// The TLS certificate presented: the operator's (`--tls-cert`), or one the CA issues itself
    /// and issues again under a new root.
    private let servingTLS: ServingTLS
    private let issuesOwnTLS: Bool
    private let keySource: OIDCDiscoveryKeySource?
    private let api: KubernetesAPIClient?
    private let logger: Logger
    private let now: @Sendable () -> Date
    private let listener: ListeningSocket
    /// Keys from `--jwks`, reloaded on SIGHUP.
    private let fileKeys: JWKSFileKeySource?
    private let stateLock: StateDirectoryLock?
    /// Ready once the port listens and the verifier has keys: what `/readyz` reports.
    package let readiness = AgentReadiness()

    /// Checks every input first, then takes the port and the state directory, loads the
    /// verifiers, and only then loads or creates the root (a refused start writes nothing) and
    /// issues the TLS certificate.
    package static func make(
        configuration: CentralCAConfiguration, logger: Logger, now: @escaping @Sendable () -> Date = { Date() }
    ) async throws -> CentralCAServer {
        try configuration.validate()
        let needsAPI = !configuration.trustedNodeAccounts.isEmpty
        if needsAPI && configuration.tokens.kubernetesAPI == nil {
            throw ConfigurationError(
                .missingSetting, message: "--trusted-node-account needs the API server (--kube-api-server) to find the pods on the caller's node")
        }
        // The port first: one in use is one line at start, not a server that never listens.
        let listener = try ListeningSocket(fd: TCPListener.bind(host: configuration.listenHost, port: configuration.listenPort))
        // One CA per generated root: a second process on the same directory would rotate and
        // persist the same root behind the first one's back.
        let stateLock = configuration.generatesRoot
            ? try StateDirectoryLock(directory: configuration.stateDirectory ?? "") : nil
        let verifiers = try await configuration.tokens.makeAuthenticator(logger: logger, now: now, needsAPI: needsAPI)
        do {
            return try make(
                configuration: configuration, listener: listener, stateLock: stateLock, verifiers: verifiers, logger: logger, now: now)
        } catch {
            await verifiers.api?.shutdown()
            throw error
        }
    }

    private static func make(
        configuration: CentralCAConfiguration, listener: ListeningSocket, stateLock: StateDirectoryLock?,
        verifiers: TokenVerification.Verifiers, logger: Logger, now: @escaping @Sendable () -> Date
    ) throws -> CentralCAServer {
        // An operator's TLS files are read before any root is generated: a refused start writes nothing.
        var servingTLS: ServingTLS?
        if let certFile = configuration.tlsCertificateFile, let keyFile = configuration.tlsKeyFile {
            let chainPEM: String
            let keyPEM: String
            do throws(InputFileError) {
                chainPEM = try InputFile.text(certFile)
            } catch {
                throw ConfigurationError(.unreadableInput, message: "cannot read --tls-cert \(certFile): \(error.reason)")
            }
            do throws(InputFileError) {
                keyPEM = try InputFile.text(keyFile)
            } catch {
                throw ConfigurationError(.unreadableInput, message: "cannot read --tls-key \(keyFile): \(error.reason)")
            }
            do {
                servingTLS = try ServingTLS(chainPEM: chainPEM, keyPEM: keyPEM)
            } catch {
                throw ConfigurationError(message: "--tls-cert/--tls-key: \(certFile) and \(keyFile) are not a PEM certificate chain and its key")
            }
        }
        let (authority, additionalRoots) = try loadAuthority(configuration, logger: logger, now: now())
        if let reason = CertificateProfile.outlivesRoot(authority) {
            logger.warning("CA certificate outlives its root", metadata: ["reason": "\(reason)"])
        }
        let (caChanges, changeSink) = AsyncStream.makeStream(of: IssuerChange.self)
        let ca = EmbeddedCA(
            authority: authority, trustDomain: configuration.tokens.trustDomain, logger: logger, additionalRoots: additionalRoots,
            retireAfter: now().addingTimeInterval(configuration.maxCertificateTTL.timeInterval),
            now: now, rootKeyType: configuration.caKeyType, onChange: { change, _ in changeSink.yield(change) })
        if let directory = configuration.caDirectory {
            // A taint in force before the first CSR is answered.
            CADirectoryWatcher(directory: directory, ca: ca, activationDelay: configuration.caActivationDelay, logger: logger, now: now)
                .reloadTaint()
        }
        let issuesOwnTLS = servingTLS == nil
        let tls = try servingTLS ?? issueServingTLS(authority: authority, configuration: configuration, now: now())

        let (authenticator, keySource, api) = (verifiers.authenticator, verifiers.keySource, verifiers.api)
        let service = IstioCertificateService(
            configuration: .init(
                trustDomain: configuration.tokens.trustDomain, defaultTTL: configuration.certificateTTL,
                maxTTL: configuration.maxCertificateTTL, trustedNodeAccounts: Set(configuration.trustedNodeAccounts)),
            authenticator: authenticator, ca: ca, nodes: api.map { KubernetesNodeAuthorizer(api: $0) }, logger: logger)
        return CentralCAServer(
            configuration: configuration, service: service, ca: ca, caChanges: caChanges,
            canRotate: configuration.generatesRoot, servingTLS: tls, issuesOwnTLS: issuesOwnTLS,
            keySource: keySource, fileKeys: verifiers.fileKeys, api: api, listener: listener, stateLock: stateLock, logger: logger,
            now: now)
    }

    /// The CA it signs with: the `cacerts` directory, the operator's files, or a root kept in the
    /// state directory (made the first time), with the older roots still trusted there.
    private static func loadAuthority(
        _ configuration: CentralCAConfiguration, logger: Logger, now: Date
    ) throws -> (SigningAuthority, additionalRoots: [Certificate]) {
        if let directory = configuration.caDirectory {
            return (try RootCAStore.load(caDirectory: directory, now: now), [])
        }
        if let certFile = configuration.caCertificateFile, let keyFile = configuration.caKeyFile {
            return (try RootCAStore.load(certificateFile: certFile, keyFile: keyFile), [])
        }
        let stateDirectory = configuration.stateDirectory ?? ""
        let authority = try RootCAStore.loadOrCreate(
            stateDirectory: stateDirectory, trustDomain: configuration.tokens.trustDomain,
            ttl: configuration.caTTL, now: now, logger: logger, keyType: configuration.caKeyType)
        return (authority, RootCAStore.additionalRoots(stateDirectory: stateDirectory, now: now))
    }

    private init(
        configuration: CentralCAConfiguration, service: IstioCertificateService, ca: EmbeddedCA,
        caChanges: AsyncStream<IssuerChange>, canRotate: Bool, servingTLS: ServingTLS, issuesOwnTLS: Bool,
        keySource: OIDCDiscoveryKeySource?, fileKeys: JWKSFileKeySource?, api: KubernetesAPIClient?, listener: ListeningSocket,
        stateLock: StateDirectoryLock?, logger: Logger, now: @escaping @Sendable () -> Date
    ) {
        self.fileKeys = fileKeys
        self.listener = listener
        self.stateLock = stateLock
        if let keySource {
            readiness.add { keySource.hasKeys ? nil : "no token verification keys yet: OIDC discovery has not answered" }
        }
        self.configuration = configuration
        self.service = service
        self.ca = ca
        self.caChanges = caChanges
        self.canRotate = canRotate
        self.servingTLS = servingTLS
        self.issuesOwnTLS = issuesOwnTLS
        self.keySource = keySource
        self.api = api
        self.logger = logger
        self.now = now
    }

    /// Runs `ca serve`'s loops as one `ServiceGroup` (inside the command's, which owns the
    /// shutdown signals), built from the same parts as the agent's.
    package func run() async throws {
        try await ServiceGroup(configuration: .init(services: services(), logger: logger)).run()
    }

    /// The CSR API's TLS listener on the bound port, each connection's key exchange read from
    /// the ServerHello the TLS handler writes (a guard before it) and held to `--tls-policy`.
    private func makeTransport() throws -> HTTP2ServerTransport.Posix {
        let report = KeyExchangeReport(link: "ca_serve", policy: configuration.tlsPolicy, logger: logger)
        let policy = configuration.tlsPolicy
        return HTTP2ServerTransport.Posix(
            listeningSocketDescriptor: Int(listener.take()), transportSecurity: try .tls(certificateReloader: servingTLS),
            config: .defaults { config in
                config.channelDebuggingCallbacks.onAcceptTCPConnection = { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            KeyExchangeGuard(role: .server, policy: policy, report: report), position: .first)
                    }
                }
            })
    }

    /// Every loop, in start order; graceful shutdown goes in reverse (the listener first).
    func services() throws -> [ServiceGroupConfiguration.ServiceConfiguration] {
        let transport = try makeTransport()
        let server = GRPCServer(transport: transport, services: [service])
        let (triggers, trigger) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let (ca, logger, configuration, now) = (self.ca, self.logger, self.configuration, self.now)
        var loops: [any Service] = []
        if let api { loops.append(ClosedAtShutdown("kubernetes api client") { await api.shutdown() }) }
        if let keySource { loops.append(NamedService("oidc key source") { await keySource.run() }) }
        if canRotate {
            let rotator = CARotator(
                ca: ca, schedule: .init(rootTTL: configuration.caTTL, activationDelay: configuration.caActivationDelay),
                triggers: triggers, logger: logger, now: now)
            loops.append(NamedService("ca rotator") { try await rotator.run() })
        }
        if let directory = configuration.caDirectory {
            // ca-crl.pem too: every answer announces the lists in force to the agents.
            let watcher = CADirectoryWatcher(
                directory: directory, ca: ca, activationDelay: configuration.caActivationDelay, logger: logger, now: now)
            loops.append(NamedService("ca directory watch") { [watcher] in await watcher.run() })
        }
        loops.append(NamedService("ca change relay") { [self] in await followChanges() })
        loops.append(NamedService("ca taint gauge") {
            // A tainted signer with no replacement refuses every CSR: say so to the alerts.
            let gauge = Gauge(label: "sds_agent_ca_signer_tainted")
            let clock = ContinuousClock()
            repeat { gauge.record(ca.signerIsTainted ? 1 : 0) } while (try? await clock.sleep(for: .seconds(1))) != nil
        })
        let gauge = CAExpiryGauge(notAfter: { ca.activeCertificate.notValidAfter }, now: now, clock: ContinuousClock())
        loops.append(NamedService("ca expiry gauge") { await gauge.run() })
        var reload: (@Sendable () async -> Void)?
        if let fileKeys { reload = { _ = await fileKeys.reload(logger: logger) } }
        let signals = SignalHandling(
            rotationRefusal: canRotate
                ? nil
                : configuration.caDirectory != nil
                    ? "a CA from --ca-dir is rotated by updating its files (the Secret every replica mounts)"
                    : "a CA loaded from --ca-cert is rotated by replacing its files",
            rotate: { trigger.yield() }, reloading: "the JWKS file", reload: reload, carryingOn: "the CA", logger: logger)
        loops += signals.services
        let listener = NamedService("ca listener") { [readiness] in
            try await serveUntilShutdown(
                [server], listening: transport,
                onListening: { bound in
                    readiness.markListening()
                    logger.notice(
                        "sds-agent ca serving Istio's CSR API",
                        metadata: [
                            "address": "\(bound)", "trust_domain": "\(configuration.tokens.trustDomain)",
                            "server_names": .list(configuration.serverNames), "pid": .number(Int(getpid())),
                            "root_not_after": "\(ca.activeCertificate.notValidAfter.formatted(.iso8601))",
                            "trusted_node_accounts": "\(configuration.trustedNodeAccounts)",
                        ])
                }, shutdownMessage: "ca shutting down", logger: logger)
        }
        return loops.map { .init(service: $0, successTerminationBehavior: .ignore) } + [.init(service: listener)]
    }

    /// After a rotation step: with a generated root, `root-cert.pem` holds every root trusted
    /// now, the active one first, so it verifies the TLS chain served before and after the new
    /// root signs; once a new CA signs (a rotation, or new files in `--ca-dir`), a TLS certificate
    /// the CA issued itself is issued again under it.
    private func followChanges() async {
        for await change in caChanges {
            if canRotate, let stateDirectory = configuration.stateDirectory {
                do {
                    try RootCAStore.persist(active: ca.activeAuthority, roots: ca.roots, stateDirectory: stateDirectory)
                } catch {
                    logger.error("CA rotation: cannot persist the roots", metadata: ["error": "\(error)"])
                }
            }
            guard change == .signerChanged, issuesOwnTLS else { continue }
            do {
                servingTLS.replace(with: try Self.issueServingTLS(authority: ca.activeAuthority, configuration: configuration, now: now()))
                if canRotate {
                    logger.notice("CA rotation: TLS certificate issued again under the new root")
                } else {
                    logger.notice("CA change: TLS certificate issued again under the new CA", metadata: ["subject": "\(ca.activeCertificate.subject)"])
                }
            } catch {
                logger.error("cannot issue the TLS certificate under the new CA", metadata: ["error": "\(error)"])
            }
        }
    }
}

extension CentralCAServer {
    /// A TLS certificate for ``CentralCAConfiguration/serverNames`` issued by `authority`.
    static func issueServingTLS(authority: SigningAuthority, configuration: CentralCAConfiguration, now: Date) throws -> ServingTLS {
        let (chain, key) = try authority.issueServingCertificate(names: configuration.serverNames, ttl: configuration.caTTL, now: now)
        return try ServingTLS(chainPEM: chain.map { try $0.pem() }.joined(), keyPEM: KeyFactory.pem(of: key))
    }
}

extension CentralCAServer: CustomStringConvertible {
    package var description: String { "CentralCAServer(listen: \(configuration.listenHost):\(configuration.listenPort))" }
}

/// A listening descriptor made at start, handed to the gRPC transport once (which then owns it);
/// closed here if the server never runs.
final class ListeningSocket: Sendable {
    private let fd: Mutex<Int32?>
    init(fd: Int32) { self.fd = Mutex(fd) }
    /// The descriptor, now owned by the caller.
    func take() -> Int32 { fd.withLock { value in defer { value = nil }; return value ?? -1 } }
    deinit { if let fd = fd.withLock({ $0 }) { close(fd) } }
}
