import CertificateAuthority
import FoundationEssentials
import Logging
import SDSModel
import Synchronization
import UpstreamCA
import X509

/// The CA side of the agent: who signs (the embedded CA, or an upstream CA over Istio's CSR API),
/// the JWT-SVID key, and the stream of what the CA changed.
struct Issuance: Sendable {
    let issuer: any CertificateIssuer
    let ca: EmbeddedCA?
    let upstream: UpstreamCA?
    let jwt: JWTAuthority?
    let changes: AsyncStream<IssuerChange>
    /// The CA the agent generated itself (not files, not upstream): only it rotates on schedule or SIGUSR1.
    let canRotate: Bool
    /// `upstream`, `files` or `embedded`, for the start line.
    let kind: String

    /// What the CA says is tainted now, and whether it signs under a tainted certificate itself.
    var tainted: TaintedCertificates { ca?.tainted ?? upstream?.tainted ?? .none }
    var signerIsTainted: Bool { ca?.signerIsTainted ?? false }
    /// The roots a served chain may chain to (a tainted one included until dropped).
    var rootsForTaintCheck: [Certificate] { ca?.roots ?? upstream?.roots ?? [] }
    /// Leaves tainted roots out of the bundle (when a clean one is there).
    func dropTaintedRoots() -> Bool { ca?.dropTaintedRoots() ?? upstream?.dropTaintedRoots() ?? false }

    /// Whether `secret`'s chain holds a tainted certificate or chains to a tainted root.
    func isTainted(_ secret: WorkloadSecret) -> Bool {
        let tainted = self.tainted
        guard !tainted.isEmpty else { return false }
        return verdicts.verdict(chainPEM: secret.certificateChainPEM, tainted: tainted, roots: rootsForTaintCheck)
    }

    /// Each served chain's verdict, kept while the taint and the roots stay as they are.
    let verdicts = TaintVerdicts()

    /// Builds the issuer `configuration` asks for; nothing is generated or persisted before the
    /// inputs it needs have loaded.
    static func make(_ configuration: AgentConfiguration, logger: Logger, now: @escaping @Sendable () -> Date) async throws -> Issuance {
        let (changes, sink) = AsyncStream.makeStream(of: IssuerChange.self)
        if let upstream = configuration.upstreamCA {
            let client = try makeUpstream(upstream, configuration, logger: logger, now: now) { sink.yield($0) }
            return Issuance(
                issuer: client, ca: nil, upstream: client, jwt: nil, changes: changes, canRotate: false, kind: "upstream")
        }
        let fromFiles = configuration.caCertificateFile != nil || configuration.caDirectory != nil
        let ca = try makeEmbedded(configuration, logger: logger, now: now) { change, _ in sink.yield(change) }
        if let caDirectory = configuration.caDirectory {
            // Its revocation lists and taint before the first certificate or validation context.
            let watcher = CADirectoryWatcher(
                directory: caDirectory, ca: ca, activationDelay: configuration.caActivationDelay, logger: logger, now: now)
            await watcher.reloadRevocation()
            watcher.reloadTaint()
        }
        let jwt = configuration.attestation.workloadSocketPath == nil
            ? nil : try await JWTAuthority.loadOrCreate(stateDirectory: configuration.stateDirectory, trustDomain: configuration.trustDomain)
        return Issuance(
            issuer: ca, ca: ca, upstream: nil, jwt: jwt, changes: changes, canRotate: !fromFiles, kind: fromFiles ? "files" : "embedded")
    }

    private static func makeUpstream(
        _ upstream: UpstreamCA.Configuration, _ configuration: AgentConfiguration, logger: Logger,
        now: @escaping @Sendable () -> Date, onChange: @escaping @Sendable (IssuerChange) -> Void
    ) throws -> UpstreamCA {
        var upstream = upstream
        let directory = URL(fileURLWithPath: configuration.stateDirectory).appendingPathComponent("upstream").path
        do {
            try RootCAStore.makeDirectory(directory, mode: 0o700)
            upstream.bundleCacheFile = directory + "/trust-bundle.pem"
        } catch {
            logger.warning("upstream CA: cannot keep its trust bundle across restarts", metadata: ["error": "\(error)"])
        }
        let client = try UpstreamCA(configuration: upstream, logger: logger, now: now, onChange: onChange)
        logger.info(
            "upstream CA configured",
            metadata: [
                "ca": "\(upstream.endpointsText)", "credential": "\(upstream.credentialMode)",
                "cluster_id": "\(upstream.clusterID)",
            ])
        // istiod and `ca serve` accept tokens for `istio-ca` unless told otherwise: a forwarded
        // token for another audience alone is refused at every CSR.
        if upstream.credentialMode == .forward, !configuration.tokens.audiences.contains(Defaults.Tokens.istioCAAudience) {
            logger.warning(
                "upstream CA in forward mode: the callers' tokens go to the CA, which accepts audience istio-ca by default, and --audience does not include it; every CSR may be refused (readiness says so)",
                metadata: ["audiences": .list(configuration.tokens.audiences)])
        }
        return client
    }

    private static func makeEmbedded(
        _ configuration: AgentConfiguration, logger: Logger, now: @escaping @Sendable () -> Date,
        onChange: @escaping @Sendable (IssuerChange, EmbeddedCA) -> Void
    ) throws -> EmbeddedCA {
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
        checkLifetime(of: authority, certificateTTL: configuration.certificateTTL, logger: logger, now: now())
        // Leaves an old root signed before a restart expire within one certificate lifetime.
        return EmbeddedCA(
            authority: authority, trustDomain: configuration.trustDomain, logger: logger,
            additionalRoots: additionalRoots, retireAfter: now().addingTimeInterval(configuration.certificateTTL.timeInterval),
            now: now, rootKeyType: configuration.caKeyType, onChange: onChange)
    }

    /// The CA's own life bounds every leaf: said at start, before it is trusted.
    private static func checkLifetime(of authority: SigningAuthority, certificateTTL: Duration, logger: Logger, now: Date) {
        let notAfter = authority.certificate.notValidAfter
        logger.info("CA certificate", metadata: [
            "not_after": "\(notAfter.formatted(.iso8601))", "subject": "\(authority.certificate.subject)",
        ])
        if let reason = CertificateProfile.outlivesRoot(authority) {
            logger.warning("CA certificate outlives its root", metadata: ["reason": "\(reason)"])
        }
        if notAfter < now.addingTimeInterval(certificateTTL.timeInterval) {
            logger.warning(
                "certificates will be cut short: the CA expires before --cert-ttl runs out",
                metadata: [
                    "ca_not_after": "\(notAfter.formatted(.iso8601))",
                    "cert_ttl_ends": "\(now.addingTimeInterval(certificateTTL.timeInterval).formatted(.iso8601))",
                ])
        }
    }

    /// What readiness waits on from the CA: a certificate valid now, or an upstream that answers.
    func readinessChecks(upstreamAddress: String?, now: @escaping @Sendable () -> Date) -> [@Sendable () -> String?] {
        var checks: [@Sendable () -> String?] = []
        if let ca {
            checks.append {
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
        if let upstream, let upstreamAddress {
            checks.append { upstream.isReachable == false ? "the upstream CA \(upstreamAddress) does not answer" : upstream.refusesForwardedTokens }
        }
        return checks
    }

    /// When the CA (or the earliest upstream root) expires, for the `sds_agent_ca_expiry_seconds` gauge.
    var notAfter: Date? { ca?.activeCertificate.notValidAfter ?? upstream?.earliestRootNotAfter }
}

/// Whether a served chain is under the taint, each chain parsed once per taint and set of roots:
/// the taint follower asks about every cached leaf every second until no leaf is under it.
final class TaintVerdicts: Sendable {
    private struct State {
        var tainted = TaintedCertificates.none
        var roots: [Certificate] = []
        var byChain: [String: Bool] = [:]
    }
    private let state = Mutex(State())
    /// Verdicts kept at most; past it the memo starts again.
    static let limit = 65_536

    func verdict(chainPEM: String, tainted: TaintedCertificates, roots: [Certificate]) -> Bool {
        let known = state.withLock { state -> Bool? in
            if state.tainted != tainted || state.roots != roots { state = State(tainted: tainted, roots: roots) }
            return state.byChain[chainPEM]
        }
        if let known { return known }
        let verdict = PEMCertificates.parse(chainPEM).map { tainted.affects(chain: $0, roots: roots) } ?? false
        state.withLock { state in
            guard state.tainted == tainted, state.roots == roots else { return }
            if state.byChain.count >= Self.limit { state.byChain = [:] }
            state.byChain[chainPEM] = verdict
        }
        return verdict
    }
}
