import CertificateAuthority
import FoundationEssentials
import Glibc
import KubernetesAPI
import SDSModel
import SDSServer
import SecretCache
import UpstreamCA
import WorkloadAuthentication

/// Everything `sds-agent serve` needs, validated before anything starts.
package struct AgentConfiguration: Sendable {
    /// Path of the Unix domain socket Envoys connect to.
    package var socketPath: String
    /// File mode of the socket (default 0o660: owner and group; see README for Kubernetes).
    package var socketMode: UInt16
    /// How callers' tokens are verified (trust domain, keys, issuers, audiences, clock skew).
    package var tokens: TokenVerification
    /// SPIFFE trust domain, e.g. `cluster.local` (kept in ``tokens``, which verifies it).
    package var trustDomain: String {
        get { tokens.trustDomain }
        set { tokens.trustDomain = newValue }
    }
    /// Lifetime of workload certificates.
    package var certificateTTL: Duration
    /// Directory for the embedded CA's root (created; key file mode 0600).
    package var stateDirectory: String
    /// Lifetime of a root the embedded CA generates.
    package var caTTL: Duration
    /// Other trust domains' bundles to serve (`--federated-bundle TD=FILE`).
    package var federatedBundles: [FederatedBundles.Source] = []
    /// The all-bundles validation context (`--all-bundles-name`): Envoy's SPIFFE validator with one
    /// entry per trust domain, ours and the federated ones.
    package var allBundlesName = Defaults.Names.allBundles
    /// A CA in Istio's `cacerts` layout, watched for changes (`--ca-dir`).
    package var caDirectory: String?
    /// PEM certificate (chain) of a CA to sign with instead of a generated root.
    package var caCertificateFile: String?
    /// PEM private key for `caCertificateFile`.
    package var caKeyFile: String?
    /// PEM roots to serve when `caCertificateFile` holds no self-signed root.
    package var caBundleFile: String?
    /// Name of the workload certificate secret.
    package var workloadSecretName: String
    /// Names the trust bundle is served under; empty means `ROOTCA` and `spiffe://<trust-domain>`.
    package var validationContextNames: [String]
    /// Metadata key carrying the token.
    package var tokenHeader: String
    /// Most concurrent streams one Envoy connection may open.
    package var maxStreamsPerConnection: Int
    /// When certificates are renewed (fraction of lifetime and jitter).
    package var rotation: RotationPolicy = RotationPolicy()
    /// How long an identity no stream watches stays cached.
    package var idleTTL: Duration = .seconds(300)
    /// A stream ends this long before the token it was opened with expires.
    package var tokenExpiryMargin: Duration = Defaults.Tokens.expiryMargin
    /// After a manual CA rotation (SIGUSR1), how long old + new roots are published before the switch.
    package var caActivationDelay: Duration = Defaults.Certificates.caActivationDelay
    /// After a taint, the window over which every leaf under it is re-issued.
    package var taintReissueWindow: Duration = Defaults.Certificates.taintReissueWindow
    /// After a taint, how long a tainted root stays in the bundle at least.
    package var taintRootGrace: Duration = Defaults.Certificates.taintRootGrace
    /// Who may get identities (allow/deny rules on namespaces and service accounts).
    package var authorization: AuthorizationPolicy = .allowAll
    /// Checks on the caller's Unix peer credentials (allowed UIDs, pod binding).
    package var peerPolicy: PeerPolicy = .none
    /// Bounds on connections, streams and requests.
    package var limits: Limits = .defaults
    /// The type of every workload key (`--workload-key-type`).
    package var workloadKeyType: KeyType = .ecP256
    /// The type of a root the embedded CA generates (`--ca-key-type`).
    package var caKeyType: KeyType = .ecP256
    /// The admin socket (`sds-agent inspect`); nil for `<state-dir>/admin.sock`, empty for none.
    package var adminSocketPath: String?
    /// The admin socket in use, or nil when it is off.
    package var effectiveAdminSocketPath: String? {
        guard let adminSocketPath else { return stateDirectory + "/admin.sock" }
        return adminSocketPath.isEmpty ? nil : adminSocketPath
    }
    /// A remote CA behind Istio's CSR API instead of the embedded CA (`--upstream-ca`).
    package var upstreamCA: UpstreamCA.Configuration?
    /// Attestation through the caller's pod: the peer-attested socket, the node, the policy.
    package var attestation = Attestation()

    /// Attestation through the caller's pod (peer PID → cgroup → pod from the API server).
    package struct Attestation: Sendable, Hashable {
        /// The peer-attested socket (`--workload-socket`): SDS without a token, and the SPIFFE
        /// Workload API; nil for none.
        package var workloadSocketPath: String?
        /// This node (`--node-name`): whose pods are listed and watched.
        package var nodeName: String?
        /// YAML rules on images, labels and node labels per identity (`--attestation-policy`).
        package var policyFile: String?
        /// Lifetime of the JWT-SVIDs the Workload API issues (`--jwt-svid-ttl`).
        package var jwtSVIDTTL: Duration = Defaults.Tokens.jwtSVIDTTL

        package init() {}

        /// Whether pods must be looked up: a peer-attested socket or a policy file.
        package var needsPods: Bool { workloadSocketPath != nil || policyFile != nil }
    }

    /// The attestation policy in the file, or none; the error names the file.
    package func loadAttestationPolicy() throws(ConfigurationError) -> AttestationPolicy {
        guard let file = attestation.policyFile else { return .none }
        return try AttestationPolicyFile.load(file)
    }

    /// Bounds on what callers can make the agent hold; each is answered to the offending caller
    /// only, logged (throttled) and counted.
    package struct Limits: Sendable, Hashable {
        /// Connections: how many, time to the first stream, idle time.
        package var connections: ConnectionGuard.Limits = .defaults
        /// Streams: how many, time to the first request.
        package var streams: StreamLimits = .defaults
        /// Largest request message accepted (a larger one gets `resource_exhausted`). Envoy's
        /// first request carries its whole Node, about 61 KB.
        package var maxRequestBytes = 1 << 20
        /// Connections the kernel queues before the agent accepts them: a node restart brings
        /// every sidecar's streams at once, one connection each (capped by `net.core.somaxconn`).
        package var listenBacklog: Int32 = 4096

        /// The defaults, written once: the flags and the docs show these.
        package static let defaults = Limits()
    }

    package init(
        socketPath: String = "/var/run/sds-agent/sds.sock", socketMode: UInt16 = 0o660,
        trustDomain: String = "cluster.local", jwksFile: String?, issuers: [String] = ["https://kubernetes.default.svc.cluster.local"],
        audiences: [String] = [Defaults.Tokens.audience], clockSkew: Duration = Defaults.Tokens.clockSkew,
        certificateTTL: Duration = Defaults.Certificates.ttl,
        stateDirectory: String = "/var/lib/sds-agent", caTTL: Duration = Defaults.Certificates.caTTL,
        caCertificateFile: String? = nil, caKeyFile: String? = nil, caBundleFile: String? = nil,
        workloadSecretName: String = Defaults.Names.workloadSecret, validationContextNames: [String] = [],
        tokenHeader: String = Defaults.Tokens.header, maxStreamsPerConnection: Int = Defaults.Limits.streamsPerConnection
    ) {
        self.socketPath = socketPath
        self.socketMode = socketMode
        self.tokens = TokenVerification(
            trustDomain: trustDomain, jwksFile: jwksFile, issuers: issuers, audiences: audiences, clockSkew: clockSkew)
        self.certificateTTL = certificateTTL
        self.stateDirectory = stateDirectory
        self.caTTL = caTTL
        self.caCertificateFile = caCertificateFile
        self.caKeyFile = caKeyFile
        self.caBundleFile = caBundleFile
        self.workloadSecretName = workloadSecretName
        self.validationContextNames = validationContextNames
        self.tokenHeader = tokenHeader
        self.maxStreamsPerConnection = maxStreamsPerConnection
    }

    /// The validation-context names actually served.
    package var effectiveValidationContextNames: Set<String> {
        validationContextNames.isEmpty ? [Defaults.Names.rootCA, "spiffe://\(trustDomain)"] : Set(validationContextNames)
    }

    /// How the cache keeps identities' secrets.
    var cacheConfiguration: SecretCache.Configuration {
        var cache = SecretCache.Configuration(certificateTTL: certificateTTL, rotation: rotation, idleTTL: idleTTL)
        cache.keyType = workloadKeyType
        cache.jwtSVIDTTL = attestation.jwtSVIDTTL
        return cache
    }

    /// What the SDS server is told: the names it serves, the token header and the policies.
    var serverConfiguration: SDSServerConfiguration {
        var server = SDSServerConfiguration(
            workloadSecretName: workloadSecretName, validationContextNames: effectiveValidationContextNames,
            tokenHeaderKey: tokenHeader, tokenExpiryMargin: tokenExpiryMargin, authorization: authorization,
            peerPolicy: peerPolicy, limits: limits.streams)
        server.federatedTrustDomains = Set(federatedBundles.map(\.trustDomain))
        server.allBundlesName = allBundlesName
        return server
    }

    /// Checks the configuration, section by section; the error says which setting is wrong and why.
    package func validate() throws(ConfigurationError) {
        try tokens.validate()
        try validateServing()
        try validateCA()
        try validateLimits()
        try validateAttestation()
        _ = try loadAttestationPolicy()
        if let rule = authorization.malformedRule() {
            throw fail(.invalidValue, "authorization rule '\(rule)' is malformed: namespaces are NAME or PREFIX*, service accounts NAMESPACE/NAME")
        }
    }

    private func fail(_ code: ConfigurationError.Code, _ message: String) -> ConfigurationError {
        ConfigurationError(code, message: message)
    }

    /// The sockets and the names served.
    private func validateServing() throws(ConfigurationError) {
        guard !stateDirectory.isEmpty else {
            throw fail(.invalidValue, "--state-dir must not be empty: the CA's key would be written to the working directory")
        }
        guard !socketPath.isEmpty else { throw fail(.invalidValue, "--socket must not be empty") }
        if validationContextNames.contains(where: \.isEmpty) {
            throw fail(.invalidValue, "--validation-context-name must not be empty (an empty ConfigMap key gives an empty value); leave it out for ROOTCA and spiffe://<trust-domain>")
        }
        guard tokenExpiryMargin < .seconds(600) else {
            throw fail(.invalidValue, "--token-expiry-margin \(DurationText.format(tokenExpiryMargin)) is not shorter than the shortest token Kubernetes projects (10m): every stream would end at once; use e.g. 30s")
        }
        var federated = Set<String>()
        for source in federatedBundles {
            guard SPIFFEID.isValidTrustDomain(source.trustDomain), source.trustDomain != trustDomain,
                federated.insert(source.trustDomain).inserted
            else {
                throw fail(.invalidValue, "--federated-bundle '\(source.trustDomain)=\(source.file)': the trust domain must be valid, not ours (\(trustDomain)) and named once")
            }
        }
        guard !allBundlesName.isEmpty, allBundlesName != workloadSecretName, !effectiveValidationContextNames.contains(allBundlesName),
            !federated.contains(where: { "spiffe://\($0)" == allBundlesName })
        else {
            throw fail(.conflictingSettings, "--all-bundles-name '\(allBundlesName)' must be non-empty and differ from every other served name")
        }
        guard socketMode <= 0o777 else { throw fail(.invalidValue, "--socket-mode must be an octal mode such as 0660") }
        // Connecting needs write permission: without it for the owner, no sidecar could connect.
        guard socketMode & 0o600 == 0o600 else {
            throw fail(.invalidValue, "--socket-mode \(String(socketMode, radix: 8)) lets not even the owner connect: it needs at least 0600 (usually 0660)")
        }
        guard !workloadSecretName.isEmpty, !effectiveValidationContextNames.contains(workloadSecretName) else {
            throw fail(.conflictingSettings, "--workload-secret-name must be non-empty and differ from every --validation-context-name")
        }
    }

    /// Who signs: the embedded CA, its files or directory, or an upstream CA; and the lifetimes.
    private func validateCA() throws(ConfigurationError) {
        if caDirectory != nil && (caCertificateFile != nil || caBundleFile != nil || upstreamCA != nil) {
            throw fail(.conflictingSettings, "--ca-dir names the CA; leave out --ca-cert, --ca-key, --ca-bundle and --upstream-ca")
        }
        if caBundleFile != nil && caCertificateFile == nil {
            throw fail(.invalidValue, "--ca-bundle names the roots of a CA given with --ca-cert/--ca-key; there is none")
        }
        guard certificateTTL >= .seconds(10) else { throw fail(.invalidValue, "--cert-ttl must be at least 10s") }
        guard taintReissueWindow <= .seconds(3600) else { throw fail(.invalidValue, "--taint-reissue-window must be at most 1h") }
        guard caTTL > certificateTTL else { throw fail(.invalidValue, "--ca-ttl must be longer than --cert-ttl") }
        guard (caCertificateFile == nil) == (caKeyFile == nil) else {
            throw fail(.conflictingSettings, "--ca-cert and --ca-key go together")
        }
        if let upstream = upstreamCA {
            guard caCertificateFile == nil, caBundleFile == nil else {
                throw fail(.conflictingSettings, "--upstream-ca and --ca-cert/--ca-bundle both name the CA; use one")
            }
            guard !upstream.serverBundleFile.isEmpty else {
                throw fail(.missingSetting, "--upstream-ca needs --upstream-ca-bundle: the PEM roots that verify the CA server's certificate")
            }
            if upstream.credentialMode == .node && (upstream.tokenFile ?? "").isEmpty {
                throw fail(.missingSetting, "--upstream-ca-credential node needs --upstream-ca-token-file: the agent's own projected token")
            }
            guard !upstream.clusterID.isEmpty else { throw fail(.invalidValue, "--upstream-ca-cluster-id must not be empty") }
        }
    }

    /// Bounds on connections, streams and requests; the renewal schedule.
    private func validateLimits() throws(ConfigurationError) {
        guard !tokenHeader.isEmpty else { throw fail(.invalidValue, "--token-header must not be empty") }
        guard maxStreamsPerConnection > 0 else { throw fail(.invalidValue, "--max-streams-per-connection must be positive") }
        guard limits.connections.maxConnections > 0 else { throw fail(.invalidValue, "--max-connections must be positive") }
        guard limits.listenBacklog > 0 else { throw fail(.invalidValue, "--listen-backlog must be positive") }
        guard limits.streams.maxStreams > 0 else { throw fail(.invalidValue, "--max-streams must be positive") }
        guard limits.streams.maxStreamsPerCaller > 0 else { throw fail(.invalidValue, "--max-streams-per-caller must be positive") }
        guard limits.maxRequestBytes >= 64 * 1024 else {
            throw fail(.invalidValue, "--max-request-bytes must be at least 65536: Envoy's first request carries its whole Node (about 61 KB)")
        }
        guard limits.streams.firstRequestTimeout >= .seconds(1) else { throw fail(.invalidValue, "--first-request-timeout must be at least 1s") }
        guard limits.connections.idleTimeout >= .seconds(1) else { throw fail(.invalidValue, "--idle-connection-timeout must be at least 1s") }
        guard (0.1...0.9).contains(rotation.fraction) else { throw fail(.invalidValue, "--rotation-fraction must be between 0.1 and 0.9") }
        guard (0...0.5).contains(rotation.jitter) else { throw fail(.invalidValue, "--rotation-jitter must be between 0 and 0.5") }
        guard tokenExpiryMargin >= .zero else { throw fail(.invalidValue, "--token-expiry-margin must not be negative") }
    }

    /// Peer binding, attestation through the pods, the peer-attested socket.
    private func validateAttestation() throws(ConfigurationError) {
        if peerPolicy.requirePodBinding {
            guard FileKind.at(peerPolicy.procRoot) == .directory else {
                throw fail(.unreadableInput, "--proc-root '\(peerPolicy.procRoot)' is not a directory; --peer-pod-binding reads <proc-root>/<pid>/cgroup")
            }
        }
        if attestation.needsPods {
            let what = attestation.workloadSocketPath != nil ? "--workload-socket" : "--attestation-policy"
            guard let node = attestation.nodeName, !node.isEmpty else {
                throw fail(.missingSetting, "\(what) needs --node-name: the pods of this node are read from the API server (Deploy/: the downward API's spec.nodeName)")
            }
            guard KubernetesName.isValid(node) || node.split(separator: ".").allSatisfy({ KubernetesName.isValid(String($0)) }) else {
                throw fail(.invalidValue, "--node-name '\(node)' is not a Kubernetes node name")
            }
            guard tokens.kubernetesAPI != nil else {
                throw fail(.missingSetting, "\(what) needs the API server: --kube-api-server https://… (in a pod, KUBERNETES_SERVICE_HOST sets it)")
            }
            guard FileKind.at(peerPolicy.procRoot) == .directory else {
                throw fail(.unreadableInput, "--proc-root '\(peerPolicy.procRoot)' is not a directory; \(what) reads <proc-root>/<pid>/cgroup")
            }
        }
        if let workloadSocket = attestation.workloadSocketPath {
            guard !workloadSocket.isEmpty, workloadSocket != socketPath else {
                throw fail(.conflictingSettings, "--workload-socket must be a path other than --socket")
            }
            if upstreamCA?.credentialMode == .forward {
                throw fail(.conflictingSettings, "--workload-socket callers send no token to forward: use --upstream-ca-credential node")
            }
        }
        guard attestation.jwtSVIDTTL >= .seconds(10), attestation.jwtSVIDTTL <= .seconds(24 * 3600) else {
            throw fail(.invalidValue, "--jwt-svid-ttl must be between 10s and 24h")
        }
    }
}

extension AgentConfiguration {
    /// The longest Unix socket path (`sun_path` less its terminating zero).
    package static let maxSocketPathBytes = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1

    /// What ``validate()`` cannot see: the files and directories named exist, can be read and
    /// hold what they should (a JWKS with keys, a CA whose key matches, PEM bundles), and every
    /// socket path fits. `serve` and `config check` both run it, so `config check` says ok
    /// exactly when `serve` would start. It writes nothing.
    package func checkInputs() async throws(ConfigurationError) {
        func readable(_ path: String?, _ flag: String) throws(ConfigurationError) {
            guard let path else { return }
            do {
                _ = try InputFile.bytes(path)
            } catch {
                throw ConfigurationError(.unreadableInput, message: "cannot read \(flag) \(path): \(error.reason)")
            }
        }
        try readable(tokens.jwksFile, "--jwks")
        try readable(caCertificateFile, "--ca-cert")
        // A pkcs11: URI is no file: the token is opened (and the key checked) below.
        try readable(caKeyFile.flatMap { PKCS11URI.isURI($0) ? nil : $0 }, "--ca-key")
        try readable(caBundleFile, "--ca-bundle")
        try readable(upstreamCA?.serverBundleFile, "--upstream-ca-bundle")
        for source in federatedBundles { try readable(source.file, "--federated-bundle \(source.trustDomain)=") }
        if let caDirectory, let problem = InputFile.directoryProblem(caDirectory) {
            throw ConfigurationError(.unreadableInput, message: "cannot read --ca-dir \(caDirectory): \(problem)")
        }
        if let jwks = tokens.jwksFile {
            do {
                _ = try await VerificationKeySet(jwksFile: jwks)
            } catch {
                throw ConfigurationError(message: error.message)
            }
        }
        do {
            if let caDirectory {
                _ = try RootCAStore.load(caDirectory: caDirectory)
            } else if let certificate = caCertificateFile, let key = caKeyFile {
                _ = try RootCAStore.load(certificateFile: certificate, keyFile: key, bundleFile: caBundleFile)
            }
        } catch {
            throw ConfigurationError(message: error.message)
        }
        for source in federatedBundles {
            do {
                _ = try FederatedBundles.read(source)
            } catch {
                throw ConfigurationError(message: "--federated-bundle \(source.trustDomain)=\(source.file): \(error.message)")
            }
        }
        if let bundle = upstreamCA?.serverBundleFile, (try? InputFile.text(bundle)).flatMap(PEMCertificates.parse)?.isEmpty != false {
            throw ConfigurationError(.unreadableInput, message: "--upstream-ca-bundle \(bundle) holds no PEM certificates (truncated or malformed?)")
        }
        let sockets = [("--socket", socketPath), ("--workload-socket", attestation.workloadSocketPath), ("--admin-socket", effectiveAdminSocketPath)]
        for case let (flag, path?) in sockets where path.utf8.count > Self.maxSocketPathBytes {
            throw ConfigurationError(
                message: "\(flag) \(path) is \(path.utf8.count) bytes; a Unix socket path has at most \(Self.maxSocketPathBytes)")
        }
    }
}

/// A configuration that cannot work: what kind of problem (``code``), the setting at fault
/// (``key``, its flag without dashes) and a message that names the flag. Tests match the code and
/// the key, never the words.
package struct ConfigurationError: Error, Sendable, CustomStringConvertible {
    package enum Code: String, Sendable {
        /// A value outside what the setting allows.
        case invalidValue = "invalid_value"
        /// A setting that another one needs is not set.
        case missingSetting = "missing_setting"
        /// Settings that cannot be used together.
        case conflictingSettings = "conflicting_settings"
        /// An input file that cannot be read or does not hold what it must.
        case unreadableInput = "unreadable_input"
    }

    package var code: Code
    /// The setting at fault, as its flag without the dashes (`cert-ttl`): the first flag the
    /// message names unless given; nil when the message names none.
    package var key: String?
    /// What is wrong, in words.
    package var message: String

    package init(_ code: Code = .invalidValue, key: String? = nil, message: String) {
        self.code = code
        self.message = message
        self.key = key ?? message.firstMatch(of: /--([a-z0-9][a-z0-9-]*)/).map { String($0.1) }
    }

    package var description: String { message }
}
