import ArgumentParser
import CertificateAuthority
import FoundationEssentials
import Glibc
import KubernetesAPI
import Logging
import Metrics
import Prometheus
import SDSAgent
import ServiceLifecycle
import UpstreamCA
import UnixSignals
import SDSModel
import TokenKeys

/// `sds-agent ca`: the central CA for meshes without istiod.
struct CA: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "A central CA speaking Istio's CSR API, for agents in --upstream-ca mode.",
        subcommands: [CAServe.self, CAInit.self, CATaint.self])
}

/// `sds-agent ca serve`: its flags are a public contract (scripts, manifests).
struct CAServe: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve istio.v1.auth.IstioCertificateService over TLS: authenticate callers by their service-account token, sign their identity.")

    @Option(help: "HOST:PORT to listen on (TLS), e.g. 0.0.0.0:15012.")
    var listen: String

    @Option(help: "SPIFFE trust domain of the identities issued.")
    var trustDomain: String

    @OptionGroup(title: "Token verification")
    var tokenOptions: TokenOptions

    @Option(help: "Directory of a root it generates: DIR/ca/root-cert.pem (as `serve` keeps it; key mode 0600). Single replica: the root and its rotation live here. For replicas use --ca-dir.")
    var stateDir: String?

    @Option(help: "A CA in Istio's cacerts layout (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem), watched for changes: every replica that mounts the same directory (one Secret) is the same CA; no --state-dir. `sds-agent ca init` makes one.")
    var caDir: String?

    @Option(help: ArgumentHelp("Lifetime of a root it generates, e.g. 8760h.", valueName: "duration"))
    var caTtl: Duration = Defaults.Certificates.caTTL

    @Option(help: "Key type of a root it generates (the signature algorithm follows it).")
    var caKeyType: KeyType = .ecP256

    @Option(help: "PEM certificate (signing cert first, then intermediates) to sign with instead of a generated root.")
    var caCert: String?

    @Option(help: "PEM private key for --ca-cert, or a key in a PKCS#11 token: 'pkcs11:token=…;object=…?module-path=…&pin-source=FILE' (RFC 7512).")
    var caKey: String?

    @Option(help: "PKCS#11 module (a .so) for pkcs11: key URIs that name no module-path.")
    var pkcs11Module: String?

    @Option(help: ArgumentHelp("Certificate lifetime when a request asks for none, e.g. 24h.", valueName: "duration"))
    var certTtl: Duration = Defaults.Certificates.ttl

    @Option(help: ArgumentHelp("Longest certificate lifetime granted, whatever is asked (istiod's default).", valueName: "duration"))
    var maxCertTtl: Duration = Defaults.Certificates.maxTTL

    @Option(help: ArgumentHelp("After SIGUSR1, send old + new roots this long before signing with the new one; longer than the agents' renewal interval.", valueName: "duration"))
    var caActivationDelay: Duration = Defaults.Certificates.caActivationDelay

    @Option(help: ArgumentHelp(
            "Key exchange on its TLS links (agents calling, the API server): default (X25519MLKEM768 preferred, classical groups accepted) or pqc (X25519MLKEM768 over TLS 1.3 only; any other peer refused).",
            valueName: "policy"))
    var tlsPolicy: TLSPolicy = Defaults.Links.tlsPolicy

    @Option(help: "SAN of its TLS certificate (repeatable; default localhost and 127.0.0.1).")
    var serverName: [String] = []

    @Option(help: "PEM TLS certificate chain to present instead of one it issues itself.")
    var tlsCert: String?

    @Option(help: "PEM private key for --tls-cert.")
    var tlsKey: String?

    @Option(help: "NAMESPACE/NAME of a node agent's service account that may ask for identities of pods on its node (ImpersonatedIdentity; repeatable).")
    var trustedNodeAccount: [String] = []

    @Option(help: "Serve Prometheus metrics at http://HOST:PORT/metrics (default: off).")
    var metricsAddress: String?

    @Option(help: "Log level (any case).")
    var logLevel: Logger.Level = .info

    @Option(help: "Log line format: text, or json (one object per line).")
    var logFormat: LogFormat = .text

    @Option(help: "YAML file of settings, as for serve: keys are these flags' long names; flags and SDS_AGENT_* variables win over it. Relative paths in it are taken from its own directory.")
    var config: String?

    func run() async throws {
        PKCS11Settings.defaultModule = pkcs11Module
        let logger = bootstrapLogging(level: SharedLogLevel(logLevel), format: logFormat, label: "sds-agent-ca")
        ProcessRun.logStart(
            logger, effective: ConfigSources.effective, unknownVariables: ConfigSources.unknownVariables(flags: ConfigSources.caServeFlags))
        var metrics: (address: HostPort, registry: PrometheusCollectorRegistry)?
        if let metricsAddress {
            guard let address = MetricsEndpoint.address(metricsAddress) else {
                throw ValidationError("--metrics-address '\(metricsAddress)' is not HOST:PORT such as 0.0.0.0:9102")
            }
            metrics = (address, ProcessRun.bootstrapMetrics())
        }
        // `:PORT` is every address, as for `serve --metrics-address`.
        guard let address = HostPort(listen, emptyHost: "0.0.0.0") else {
            throw ValidationError("--listen '\(listen.callerText(limit: 128))' is not HOST:PORT such as 0.0.0.0:15012")
        }
        let tokens = tokenOptions.verification(
            trustDomain: trustDomain, defaultAudience: Defaults.Tokens.istioCAAudience, tlsPolicy: tlsPolicy)
        var configuration = CentralCAConfiguration(listenHost: address.host, listenPort: address.port, tokens: tokens, stateDirectory: stateDir)
        configuration.caDirectory = caDir
        configuration.caTTL = caTtl
        configuration.caKeyType = caKeyType
        configuration.caCertificateFile = caCert
        configuration.caKeyFile = caKey
        configuration.certificateTTL = certTtl
        configuration.maxCertificateTTL = maxCertTtl
        configuration.caActivationDelay = caActivationDelay
        if !serverName.isEmpty { configuration.serverNames = serverName }
        configuration.tlsCertificateFile = tlsCert
        configuration.tlsKeyFile = tlsKey
        configuration.trustedNodeAccounts = trustedNodeAccount
        configuration.tlsPolicy = tlsPolicy
        try await ProcessRun.runUntilSignalled({
            let server = try await CentralCAServer.make(configuration: configuration, logger: logger)
            var services: [ServiceGroupConfiguration.ServiceConfiguration] = [.init(service: server)]
            if let metrics {
                // Ready only once the CA's port listens (and its verifier has keys).
                services.append(.init(service: MetricsEndpoint(
                    address: metrics.address, registry: metrics.registry, logger: logger,
                    readiness: { server.readiness.notReadyReason })))
            }
            return services
        }, logger: logger, stopped: "sds-agent ca stopped")
    }
}
