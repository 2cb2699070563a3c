import ArgumentParser
import CertificateAuthority
import FoundationEssentials
import Glibc
import KubernetesAPI
import Logging
import Metrics
import Prometheus
import SDSAgent
import SDSModel
import TokenKeys
import SecretCache
import WorkloadAuthentication
import ServiceLifecycle
import UpstreamCA
import UnixSignals
import SDSServer

/// `sds-agent serve`: the agent itself. Its flags are a public contract (scripts, manifests).
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve SDS on a Unix socket: authenticate each Envoy by its service-account token, issue certificates from the embedded CA.")

    @Option(help: "Unix socket Envoys connect to (its directory is created).")
    var socket = "/var/run/sds-agent/sds.sock"

    @Option(help: "Octal file mode of the socket.")
    var socketMode = "0660"

    @Option(help: "SPIFFE trust domain of the identities issued.")
    var trustDomain = "cluster.local"

    @OptionGroup(title: "Token verification")
    var tokenOptions: TokenOptions

    @Option(help: ArgumentHelp("Workload certificate lifetime, e.g. 24h, 90s.", valueName: "duration"))
    var certTtl: Duration = Defaults.Certificates.ttl

    @Option(help: "Directory for the embedded CA's root (key file mode 0600).")
    var stateDir = "/var/lib/sds-agent"

    @Option(help: ArgumentHelp("Lifetime of a root the embedded CA generates, e.g. 8760h.", valueName: "duration"))
    var caTtl: Duration = Defaults.Certificates.caTTL

    @Option(help: "Another trust domain's roots to serve, TD=FILE (PEM or a SPIFFE bundle JSON; repeatable; watched): as validation context spiffe://TD and in --all-bundles-name.")
    var federatedBundle: [String] = []

    @Option(help: "Name of the validation context holding every trust domain's roots for Envoy's SPIFFE validator (SPIRE's ALL).")
    var allBundlesName = Defaults.Names.allBundles

    @Option(help: "A CA in Istio's cacerts layout (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem), checked at start and watched: a valid change is picked up without restart.")
    var caDir: String?

    @Option(help: "PEM certificate (signing cert first, then intermediates) to sign with instead of a generated root.")
    var caCert: String?

    @Option(help: "PEM private key for --ca-cert, or a key in a PKCS#11 token: 'pkcs11:token=…;object=…?module-path=…&pin-source=FILE' (RFC 7512).")
    var caKey: String?

    @Option(help: "PKCS#11 module (a .so) for pkcs11: key URIs that name no module-path.")
    var pkcs11Module: String?

    @Option(help: "PEM roots to serve when --ca-cert has no self-signed root.")
    var caBundle: String?

    @Option(help: "Name under which each workload's certificate is served.")
    var workloadSecretName = Defaults.Names.workloadSecret

    @Option(help: "Name the trust bundle is served under (repeatable; default: ROOTCA and spiffe://<trust-domain>).")
    var validationContextName: [String] = []

    @Option(help: "gRPC metadata key with the token ('authorization: Bearer' is accepted too).")
    var tokenHeader = Defaults.Tokens.header

    @Option(help: "Most concurrent SDS streams on one connection.")
    var maxStreamsPerConnection = Defaults.Limits.streamsPerConnection

    @Option(help: "Renew a certificate after this fraction of its lifetime (0.1-0.9).")
    var rotationFraction = 0.5

    @Option(help: "Random spread of the renewal point, relative (0.1 = ±10%).")
    var rotationJitter = 0.1

    @Option(help: ArgumentHelp("Drop an identity no stream has asked for in this long, e.g. 5m.", valueName: "duration"))
    var idleTtl: Duration = .seconds(300)

    @Option(help: ArgumentHelp("End a stream this long before the token it was opened with expires, e.g. 30s.", valueName: "duration"))
    var tokenExpiryMargin: Duration = Defaults.Tokens.expiryMargin

    @Option(help: ArgumentHelp("After a manual CA rotation (SIGUSR1), publish old + new roots this long before switching, e.g. 30s.", valueName: "duration"))
    var caActivationDelay: Duration = Defaults.Certificates.caActivationDelay

    @Option(help: ArgumentHelp("When a CA certificate is declared compromised (tainted-certs.pem in the CA directory, or announced by the upstream CA), re-issue every leaf under it at random moments within this window, e.g. 30s.", valueName: "duration"))
    var taintReissueWindow: Duration = Defaults.Certificates.taintReissueWindow

    @Option(help: ArgumentHelp("After a taint, keep a tainted root in the trust bundle at least this long (and until no leaf served chains to it), so leaves other nodes still hold under it verify meanwhile, e.g. 2m.", valueName: "duration"))
    var taintRootGrace: Duration = Defaults.Certificates.taintRootGrace

    @Option(help: "Only callers in these namespaces get identities (repeatable; 'team-*' matches a prefix).")
    var allowNamespace: [String] = []

    @Option(help: "Callers in these namespaces never get identities (repeatable; beats any allow rule).")
    var denyNamespace: [String] = []

    @Option(help: "Only these service accounts get identities, as NAMESPACE/NAME (repeatable; 'demo/*' allowed).")
    var allowServiceAccount: [String] = []

    @Option(help: "These service accounts never get identities, as NAMESPACE/NAME (repeatable).")
    var denyServiceAccount: [String] = []

    @Option(help: "Only processes running as this UID may call, checked by the socket's peer credentials (repeatable; e.g. Envoy's 1337).")
    var peerAllowedUid: [UInt32] = []

    @Flag(help: "Require the calling process to run in the pod its token is bound to (peer PID -> <proc-root>/<pid>/cgroup -> pod UID). Needs hostPID.")
    var peerPodBinding = false

    @Option(help: "Where the node's /proc is visible to the agent (for --peer-pod-binding, --workload-socket and --attestation-policy).")
    var procRoot = "/proc"

    @Option(help: "Peer-attested Unix socket: SDS without a token and the SPIFFE Workload API; the caller's identity is its pod's service account (peer PID -> cgroup -> pod from the API server). Needs --node-name and hostPID.")
    var workloadSocket: String?

    @Option(help: "This node's name (Deploy/: the downward API's spec.nodeName): its pods are listed and watched for attestation.")
    var nodeName: String?

    @Option(help: "YAML rules per identity on the pod's images, labels and node labels (applied on both sockets; reloaded on SIGHUP).")
    var attestationPolicy: String?

    @Option(help: ArgumentHelp("Lifetime of the JWT-SVIDs the Workload API issues, e.g. 5m.", valueName: "duration"))
    var jwtSvidTtl: Duration = Defaults.Tokens.jwtSVIDTTL

    @Option(help: "Most connections open on the socket at once; one more is closed at accept (logged, counted).")
    var maxConnections = AgentConfiguration.Limits.defaults.connections.maxConnections

    @Option(help: "Most SDS streams open at once; one more gets resource_exhausted.")
    var maxStreams = AgentConfiguration.Limits.defaults.streams.maxStreams

    @Option(help: "Most SDS streams one caller holds at once (its pod, else its identity); one more gets resource_exhausted for that caller only.")
    var maxStreamsPerCaller = AgentConfiguration.Limits.defaults.streams.maxStreamsPerCaller

    @Option(help: "Connections the kernel queues for the agent to accept (a node restart connects every sidecar at once; capped by net.core.somaxconn).")
    var listenBacklog = AgentConfiguration.Limits.defaults.listenBacklog

    @Option(help: "Largest request message in bytes; a larger one gets resource_exhausted.")
    var maxRequestBytes = AgentConfiguration.Limits.defaults.maxRequestBytes

    @Option(help: ArgumentHelp("A new connection must open a stream, and a new stream send its first request, within this long.", valueName: "duration"))
    var firstRequestTimeout: Duration = AgentConfiguration.Limits.defaults.streams.firstRequestTimeout

    @Option(help: ArgumentHelp("Close a connection that has had no open stream for this long.", valueName: "duration"))
    var idleConnectionTimeout: Duration = AgentConfiguration.Limits.defaults.connections.idleTimeout

    @Option(help: "Istio CSR API endpoint over TLS, HOST:PORT (istiod, cert-manager istio-csr, sds-agent ca serve), or a comma-separated list of replicas; a name that resolves to several addresses (a headless Service) is one replica per address. Calls are balanced, and a failed one is retried at once on another replica. Absent = embedded CA.")
    var upstreamCa: String?

    @Option(help: "PEM roots that verify the upstream CA server's TLS certificate.")
    var upstreamCaBundle: String?

    @Option(help: "Name to verify in the upstream CA's certificate (default: HOST of --upstream-ca).")
    var upstreamCaServerName: String?

    @Option(help: "Token sent to the upstream CA: forward (the caller's own; default) or node (the agent's, with ImpersonatedIdentity).")
    var upstreamCaCredential: UpstreamCA.CredentialMode = .forward

    @Option(help: "Node mode: the agent's own projected token for the upstream CA (re-read for every call).")
    var upstreamCaTokenFile: String?

    @Option(help: "Sent to the upstream CA as ClusterID.")
    var upstreamCaClusterId = "Kubernetes"

    @Option(help: ArgumentHelp(
            "Key exchange on the agent's own TLS links (upstream CA, API server): default (X25519MLKEM768 offered first, classical groups accepted) or pqc (X25519MLKEM768 over TLS 1.3 only; any other peer refused).",
            valueName: "policy"))
    var tlsPolicy: TLSPolicy = Defaults.Links.tlsPolicy

    @Option(help: "Key type of every workload certificate.")
    var workloadKeyType: KeyType = .ecP256

    @Option(help: "Key type of a root the embedded CA generates (the signature algorithm follows it).")
    var caKeyType: KeyType = .ecP256

    @Option(help: "Admin Unix socket (mode 0600) that `sds-agent inspect` reads; default <state-dir>/admin.sock, '' for none.")
    var adminSocket: String?

    @Option(help: "Serve Prometheus metrics at http://HOST:PORT/metrics, e.g. 0.0.0.0:9102 (default: off).")
    var metricsAddress: String?

    @Option(help: "Log level (any case).")
    var logLevel: Logger.Level = .info

    @Option(help: "Log line format: text, or json (one object per line).")
    var logFormat: LogFormat = .text

    @Option(help: "YAML file of settings: keys are these flags' long names (trust-domain: cluster.local); flags and SDS_AGENT_* variables win over it. Relative paths in it are taken from its own directory.")
    var config: String?

    /// The agent's configuration from these flags (with the file's and the environment's settings
    /// merged in by ``SDSAgentCommand/main()``); usage errors throw ``ValidationError``.
    func makeConfiguration() throws -> AgentConfiguration {
        if let metricsAddress, MetricsEndpoint.address(metricsAddress) == nil {
            throw ValidationError("--metrics-address '\(metricsAddress.callerText(limit: 128))' is not HOST:PORT such as 0.0.0.0:9102")
        }
        guard let mode = UInt16(socketMode, radix: 8) else {
            throw ValidationError("--socket-mode '\(socketMode.callerText(limit: 32))' is not an octal mode such as 0660")
        }
        var configuration = AgentConfiguration(
            socketPath: socket, socketMode: mode, jwksFile: nil, certificateTTL: certTtl,
            stateDirectory: stateDir, caTTL: caTtl, caCertificateFile: caCert, caKeyFile: caKey, caBundleFile: caBundle,
            workloadSecretName: workloadSecretName, validationContextNames: validationContextName,
            tokenHeader: tokenHeader, maxStreamsPerConnection: maxStreamsPerConnection)
        configuration.rotation = RotationPolicy(fraction: rotationFraction, jitter: rotationJitter)
        configuration.idleTTL = idleTtl
        configuration.tokenExpiryMargin = tokenExpiryMargin
        configuration.caActivationDelay = caActivationDelay
        configuration.taintReissueWindow = taintReissueWindow
        configuration.taintRootGrace = taintRootGrace
        configuration.authorization = AuthorizationPolicy(
            allowNamespaces: allowNamespace, denyNamespaces: denyNamespace,
            allowServiceAccounts: allowServiceAccount, denyServiceAccounts: denyServiceAccount)
        configuration.peerPolicy = PeerPolicy(
            allowedUIDs: Set(peerAllowedUid), requirePodBinding: peerPodBinding, procRoot: procRoot)
        configuration.tokens = tokenOptions.verification(
            trustDomain: trustDomain, defaultAudience: Defaults.Tokens.audience, tlsPolicy: tlsPolicy)
        configuration.limits.connections.maxConnections = maxConnections
        configuration.limits.connections.firstStreamTimeout = firstRequestTimeout
        configuration.limits.connections.idleTimeout = idleConnectionTimeout
        configuration.limits.streams.maxStreams = maxStreams
        configuration.limits.streams.maxStreamsPerCaller = maxStreamsPerCaller
        configuration.limits.streams.firstRequestTimeout = firstRequestTimeout
        configuration.limits.maxRequestBytes = maxRequestBytes
        configuration.limits.listenBacklog = listenBacklog
        configuration.adminSocketPath = adminSocket
        configuration.workloadKeyType = workloadKeyType
        configuration.caDirectory = caDir
        configuration.allBundlesName = allBundlesName
        configuration.federatedBundles = try federatedBundle.map { text in
            guard let source = FederatedBundles.Source(text) else {
                throw ValidationError("--federated-bundle '\(text.callerText(limit: 128))' is not TD=FILE such as other.example=/etc/bundles/other.pem")
            }
            return source
        }
        configuration.caKeyType = caKeyType
        configuration.attestation.workloadSocketPath = workloadSocket
        configuration.attestation.nodeName = nodeName
        configuration.attestation.policyFile = attestationPolicy
        configuration.attestation.jwtSVIDTTL = jwtSvidTtl
        configuration.upstreamCA = try upstreamConfiguration()
        return configuration
    }

    /// The `--upstream-ca*` flags, or nil without `--upstream-ca`.
    private func upstreamConfiguration() throws -> UpstreamCA.Configuration? {
        guard let upstreamCa else {
            if upstreamCaBundle != nil || upstreamCaServerName != nil || upstreamCaTokenFile != nil {
                throw ValidationError("--upstream-ca-bundle, --upstream-ca-server-name and --upstream-ca-token-file need --upstream-ca HOST:PORT")
            }
            return nil
        }
        guard let endpoints = HostPort.list(upstreamCa) else {
            throw ValidationError(
                "--upstream-ca '\(upstreamCa.callerText(limit: 128))' is not HOST:PORT such as istiod.istio-system.svc:15012 (or a comma-separated list of them)")
        }
        return .init(
            endpoints: endpoints, serverBundleFile: upstreamCaBundle ?? "", serverName: upstreamCaServerName,
            credentialMode: upstreamCaCredential, tokenFile: upstreamCaTokenFile, clusterID: upstreamCaClusterId,
            trustDomain: trustDomain, tlsPolicy: tlsPolicy)
    }

    /// The settings a SIGHUP applies (with the JWKS file's and the policy files' contents); a
    /// change to any other is logged as needing a restart.
    static let reloadableSettings: Set<String> = [
        "log-level", "allow-namespace", "deny-namespace", "allow-service-account", "deny-service-account", "attestation-policy",
    ]

    func run() async throws {
        PKCS11Settings.defaultModule = pkcs11Module
        let configuration = try makeConfiguration()
        let sharedLevel = SharedLogLevel(logLevel)
        let logger = bootstrapLogging(level: sharedLevel, format: logFormat, label: "sds-agent")
        let merged = ConfigSources.effective
        ProcessRun.logStart(logger, effective: merged, unknownVariables: ConfigSources.unknownVariables(flags: ConfigSources.serveFlags))
        var metricsEndpoint: MetricsEndpoint?
        let readiness = AgentReadiness()
        if let metricsAddress, let address = MetricsEndpoint.address(metricsAddress) {
            metricsEndpoint = MetricsEndpoint(
                address: address, registry: ProcessRun.bootstrapMetrics(), logger: logger, readiness: { readiness.notReadyReason })
        }
        let reload = Self.reloader(merged: merged, level: sharedLevel, logger: logger)
        try await ProcessRun.runUntilSignalled({
            let agent = try await Agent.make(configuration: configuration, logger: logger, readiness: readiness, reloadSettings: reload)
            return [.init(service: agent)] + (metricsEndpoint.map { [.init(service: $0)] } ?? [])
        }, logger: logger, stopped: "sds-agent stopped")
    }

    /// SIGHUP: the file and the environment are read again; the live settings (the log level)
    /// change, a file that no longer parses changes nothing. What changed but needs a restart is
    /// said once.
    static func reloader(
        merged: ConfigSources.Effective, level sharedLevel: SharedLogLevel, logger: Logger
    ) -> @Sendable () async -> AgentConfiguration? {
        {
            do {
                let (arguments, sources) = try ConfigSources.merge(arguments: merged.commandLine, flags: merged.flags)
                let fresh = try Serve.parse(arguments)
                let configuration = try fresh.makeConfiguration()
                let changed = ConfigSources.Effective(commandLine: merged.commandLine, merged: arguments, sources: sources, flags: merged.flags)
                    .changedSettings(since: merged).subtracting(Serve.reloadableSettings)
                if !changed.isEmpty {
                    logger.warning(
                        "SIGHUP: these settings changed but take effect only after a restart",
                        metadata: ["settings": .list(changed.sorted())])
                }
                if fresh.logLevel != sharedLevel.level {
                    logger.notice("log level changed", metadata: ["from": "\(sharedLevel.level)", "to": "\(fresh.logLevel)"])
                    sharedLevel.level = fresh.logLevel
                }
                return configuration
            } catch {
                logger.error("reload refused; keeping the settings in use", metadata: ["error": "\(Serve.message(for: error))"])
                return nil
            }
        }
    }
}

/// How log lines are written (`--log-format`).
enum LogFormat: String, ExpressibleByArgument, CaseIterable {
    case text, json
}

/// Every line passes the escaping handler: callers' text cannot forge a line (CWE-117), in either
/// format. The level is shared, so a reload changes it for every logger at once.
func bootstrapLogging(level: SharedLogLevel, format: LogFormat, label: String) -> Logger {
    LoggingSystem.bootstrap { label in
        switch format {
        case .text:
            var handler = EscapingLogHandler(wrapping: StreamLogHandler.standardError(label: label))
            handler.sharedLevel = level
            return handler
        case .json:
            var handler = EscapingLogHandler(wrapping: JSONLogHandler(label: label))
            handler.sharedLevel = level
            return handler
        }
    }
    return Logger(label: label)
}


extension Logger.Level: @retroactive ExpressibleByArgument {
    public init?(argument: String) {
        guard let level = SharedLogLevel.parse(argument) else { return nil }
        self = level
    }
    public static var allValueStrings: [String] { allCases.map(\.rawValue) }
}


extension UpstreamCA.CredentialMode: ExpressibleByArgument {}

/// Durations on the command line: `24h`, `90s`, `1h30m`, `500ms` (``DurationText``); shown in
/// help with their defaults in the same form. A value that does not parse is reported by
/// ``SDSAgentCommand/main()`` with what is expected (`<duration>` names the value).
extension Duration: @retroactive ExpressibleByArgument {
    public init?(argument: String) {
        guard let duration = DurationText.parse(argument) else { return nil }
        self = duration
    }
    public var defaultValueDescription: String { DurationText.format(self) }
    public static var defaultCompletionKind: CompletionKind { .default }
}

extension KeyType: ExpressibleByArgument {}
extension TLSPolicy: ExpressibleByArgument {}
