import CertificateAuthority
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import SDSModel
import SDSServer
import SecretCache
import ServiceLifecycle
import WorkloadAuthentication

/// The running agent: the SDS gRPC server on the Unix socket, wired to its components.
///
/// Built by ``make(configuration:logger:)``, which loads every input (JWKS, CA) before anything
/// listens, so a bad setting fails at start with a message that names it.
public struct Agent: Service {
    private let configuration: AgentConfiguration
    private let service: SecretDiscoveryService
    private let logger: Logger
    /// The cache, exposed for tests and diagnostics.
    public let cache: SecretCache

    /// Validates `configuration` and builds the components.
    public static func make(configuration: AgentConfiguration, logger: Logger, now: @escaping @Sendable () -> Date = { Date() })
        async throws -> Agent
    {
        try configuration.validate()
        let keys = try await VerificationKeySet(jwksFile: configuration.jwksFile)
        let authenticator = KubernetesTokenVerifier(
            configuration: .init(
                trustDomain: configuration.trustDomain, issuers: configuration.issuers,
                audiences: configuration.audiences, clockSkew: configuration.clockSkew),
            keys: keys, now: now)

        let authority: SigningAuthority
        if let certFile = configuration.caCertificateFile, let keyFile = configuration.caKeyFile {
            authority = try RootCAStore.load(certificateFile: certFile, keyFile: keyFile, bundleFile: configuration.caBundleFile)
        } else {
            authority = try RootCAStore.loadOrCreate(
                stateDirectory: configuration.stateDirectory, trustDomain: configuration.trustDomain,
                ttl: configuration.caTTL, now: now(), logger: logger)
        }
        let ca = EmbeddedCA(authority: authority, trustDomain: configuration.trustDomain, logger: logger, now: now)
        let cache = SecretCache(
            issuer: ca, configuration: .init(certificateTTL: configuration.certificateTTL), logger: logger, now: now)
        let service = SecretDiscoveryService(
            configuration: .init(
                workloadSecretName: configuration.workloadSecretName,
                validationContextNames: configuration.effectiveValidationContextNames,
                tokenHeaderKey: configuration.tokenHeader),
            authenticator: authenticator, secrets: cache, logger: logger)
        logger.info(
            "keys and CA loaded",
            metadata: [
                "jwks": "\(configuration.jwksFile)", "key_ids": "\(keys.keyIDs.sorted())",
                "trust_domain": "\(configuration.trustDomain)",
            ])
        return Agent(configuration: configuration, service: service, logger: logger, cache: cache)
    }

    private init(configuration: AgentConfiguration, service: SecretDiscoveryService, logger: Logger, cache: SecretCache) {
        self.configuration = configuration
        self.service = service
        self.logger = logger
        self.cache = cache
    }

    /// Listens on the socket and serves until graceful shutdown (SIGTERM/SIGINT through the ServiceGroup).
    public func run() async throws {
        let path = configuration.socketPath
        let fd = try UnixSocketListener.bind(path: path, mode: mode_t(configuration.socketMode))
        defer { unlink(path) }
        let transport = HTTP2ServerTransport.Posix(
            listeningSocketDescriptor: Int(fd), transportSecurity: .plaintext,
            config: .defaults { config in
                config.http2.maxConcurrentStreams = configuration.maxStreamsPerConnection
            })
        let server = GRPCServer(transport: transport, services: [service])
        logger.notice(
            "sds-agent serving",
            metadata: [
                "socket": "\(path)", "mode": "\(String(configuration.socketMode, radix: 8))",
                "workload_secret": "\(configuration.workloadSecretName)",
                "validation_contexts": "\(configuration.effectiveValidationContextNames.sorted())",
                "cert_ttl": "\(configuration.certificateTTL)",
            ])
        try await withGracefulShutdownHandler {
            try await server.serve()
        } onGracefulShutdown: {
            logger.notice("shutting down: no new streams; open streams end")
            server.beginGracefulShutdown()
        }
    }
}
