import CertificateAuthority
import CoreMetrics
import FoundationEssentials
import Glibc
import GRPCCore
import GRPCNIOTransportHTTP2
import IstioAPI
import Logging
import SDSModel
import Synchronization
import SwiftASN1
import X509
import SwiftProtobuf

/// A remote CA behind Istio's CSR API (istiod, cert-manager istio-csr, `sds-agent ca serve`):
/// the second implementation of the ``CertificateIssuer`` seam.
///
/// Keys stay on the node; only CSRs leave it. Each call carries a bearer token: the caller's own
/// (`forward`, Istio 1.4's node agent) or the agent's (`node`, with `ImpersonatedIdentity`, as
/// ztunnel asks istiod), and `ClusterID`. What comes back is checked before anyone sees it: the
/// leaf must hold the key that was sent and exactly the SPIFFE ID asked for, and chain to the
/// root(s) in the answer's last element. Those roots are the trust bundle (as Istio's agent takes
/// them); a change is reported as ``IssuerChange/bundleChanged`` and pushed to every stream.
///
/// A CA that does not answer is retried with backoff and jitter for at most
/// ``Configuration/issueDeadline``, then the caller gets `unavailable` (Envoy retries); the
/// connection is re-established by the gRPC client with its own bounded backoff.
public final class UpstreamCA: CertificateIssuer {
    /// Which token authenticates the agent's calls to the CA.
    public enum CredentialMode: String, Sendable, CaseIterable {
        /// The caller's verified token (the CA must accept its audience, e.g. `istio-ca`).
        case forward
        /// The agent's own projected token, re-read for every call, with `ImpersonatedIdentity`:
        /// workload tokens never leave the node (the CA must trust the agent's service account).
        case node
    }

    /// Where the CA is and how to talk to it.
    public struct Configuration: Sendable {
        /// The CA's replicas: each an IP address or a name (every address it resolves to is a
        /// replica), with a port.
        public var endpoints: [HostPort]
        /// The endpoints as configured, for logs (`a:15012,b:15012`).
        public var endpointsText: String { endpoints.map(\.description).joined(separator: ",") }
        /// PEM roots that verify the CA server's TLS certificate.
        public var serverBundleFile: String
        /// The name verified in its certificate (default: each endpoint's host, an IP SAN for an address).
        public var serverName: String?
        /// Which token goes with each call.
        public var credentialMode: CredentialMode
        /// The agent's own token (node mode), re-read for every call.
        public var tokenFile: String?
        /// Sent as the `ClusterID` metadata.
        public var clusterID: String
        /// The trust domain identities belong to.
        public var trustDomain: String
        /// Limit for one call.
        public var callTimeout: Duration
        /// Limit for one issuance, retries included: a new identity hears `unavailable` by then.
        public var issueDeadline: Duration
        /// Where the last trust bundle is kept, so a restart serves it before the CA answers.
        public var bundleCacheFile: String?
        /// Which key exchanges the link to the CA takes (`--tls-policy`).
        public var tlsPolicy: TLSPolicy

        public init(
            endpoints: [HostPort], serverBundleFile: String, serverName: String? = nil,
            credentialMode: CredentialMode = .forward, tokenFile: String? = nil, clusterID: String = "Kubernetes",
            trustDomain: String, tlsPolicy: TLSPolicy
        ) {
            self.init(
                endpoints: endpoints, serverBundleFile: serverBundleFile, serverName: serverName, credentialMode: credentialMode,
                tokenFile: tokenFile, clusterID: clusterID, trustDomain: trustDomain)
            self.tlsPolicy = tlsPolicy
        }

        public init(
            endpoints: [HostPort], serverBundleFile: String, serverName: String? = nil,
            credentialMode: CredentialMode = .forward, tokenFile: String? = nil, clusterID: String = "Kubernetes",
            trustDomain: String, callTimeout: Duration = .seconds(4), issueDeadline: Duration = .seconds(8),
            bundleCacheFile: String? = nil
        ) {
            self.endpoints = endpoints
            self.serverBundleFile = serverBundleFile
            self.serverName = serverName
            self.credentialMode = credentialMode
            self.tokenFile = tokenFile
            self.clusterID = clusterID
            self.trustDomain = trustDomain
            self.callTimeout = callTimeout
            self.issueDeadline = issueDeadline
            self.bundleCacheFile = bundleCacheFile
            self.tlsPolicy = Defaults.Links.tlsPolicy
        }

        /// One endpoint.
        public init(
            host: String, port: Int, serverBundleFile: String, serverName: String? = nil,
            credentialMode: CredentialMode = .forward, tokenFile: String? = nil, clusterID: String = "Kubernetes",
            trustDomain: String, callTimeout: Duration = .seconds(4), issueDeadline: Duration = .seconds(8),
            bundleCacheFile: String? = nil
        ) {
            self.init(
                endpoints: [HostPort(host: host, port: port)], serverBundleFile: serverBundleFile, serverName: serverName,
                credentialMode: credentialMode, tokenFile: tokenFile, clusterID: clusterID, trustDomain: trustDomain,
                callTimeout: callTimeout, issueDeadline: issueDeadline, bundleCacheFile: bundleCacheFile)
        }
    }

    struct State {
        var roots: [Certificate] = []
        var reachable: Bool?
        /// Certificates issued since start, and the last refusal of a forwarded token before any.
        var issued = 0
        var refusalBeforeAnyIssue: String?
        /// Calls waiting for the first roots, by id.
        var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
        var expiredWaiters: Set<Int> = []
        var nextWaiter = 0
        /// What the CA said is tainted in its last answer (`ca serve`'s metadata; none from istiod).
        var tainted = TaintedCertificates.none
        /// Tainted roots left out of the bundle once no leaf served chains to them.
        var dropped: Set<String> = []
        /// The roots of each replica's last answer, and when: the bundle is their union, so
        /// replicas that see different CA directories for a moment (a Secret update reaching pods
        /// one by one) do not make it flap.
        var rootsByReplica: [String: (roots: [Certificate], at: Date)] = [:]
        /// Each replica's last revocation lists (checked), and when: each issuer's newest is served.
        var revocationByReplica: [String: (lists: [RevocationList], at: Date)] = [:]
        /// The last announcement refused, logged and counted once.
        var refusedRevocation: [[UInt8]]?
        /// Who signed the last certificate issued, and what was above it (not roots).
        var leafIssuer: DistinguishedName?
        var chainAboveLeaf: [Certificate] = []
    }

    let configuration: Configuration
    /// Only in forward mode does the caller's token go to the CA.
    public var usesCallerCredential: Bool { configuration.credentialMode == .forward }
    let replicas: UpstreamReplicas
    let logger: Logger
    let now: @Sendable () -> Date
    private let clock: any Clock<Duration>
    let onChange: @Sendable (IssuerChange) -> Void
    let state: Mutex<State>
    private let metrics: Metrics

    private struct Metrics: Sendable {
        let up: Gauge
        let ok: Counter
        let unavailable: Counter
        let refused: Counter
        let invalid: Counter

        init(factory: any MetricsFactory) {
            up = Gauge(label: "sds_agent_upstream_ca_up", factory: factory)
            func count(_ result: String) -> Counter {
                Counter(label: "sds_agent_upstream_ca_requests_total", dimensions: [("result", result)], factory: factory)
            }
            ok = count("ok")
            unavailable = count("unavailable")
            refused = count("refused")
            invalid = count("invalid_answer")
        }
    }

    /// Builds the client (the TLS bundle is loaded here, so a bad file fails at start); calls
    /// wait for ``run()``, which keeps the connection and probes on `clock`.
    public init(
        configuration: Configuration, logger: Logger, metrics: any MetricsFactory = MetricsSystem.factory,
        now: @escaping @Sendable () -> Date = { Date() }, clock: any Clock<Duration> = ContinuousClock(),
        onChange: @escaping @Sendable (IssuerChange) -> Void = { _ in }
    ) throws(UpstreamCAError) {
        self.clock = clock
        guard !configuration.endpoints.isEmpty else { throw UpstreamCAError("--upstream-ca names no endpoint") }
        let bundle = configuration.serverBundleFile
        let bundleText: String
        do {
            bundleText = try InputFile.text(bundle)
        } catch {
            throw UpstreamCAError("cannot read --upstream-ca-bundle \(bundle): \(error.reason)")
        }
        guard let serverRoots = PEMCertificates.parse(bundleText), !serverRoots.isEmpty else {
            throw UpstreamCAError("--upstream-ca-bundle \(bundle) holds no PEM certificates (truncated or malformed?)")
        }
        replicas = try UpstreamReplicas(configuration: configuration, roots: serverRoots, logger: logger, metrics: metrics, now: now)
        self.configuration = configuration
        self.logger = logger
        self.now = now
        self.onChange = onChange
        self.metrics = Metrics(factory: metrics)
        var initial = State()
        if let file = configuration.bundleCacheFile, let pem = try? String(contentsOfFile: file, encoding: .utf8),
            let roots = PEMCertificates.parse(pem), !roots.isEmpty
        {
            initial.roots = roots
            logger.info(
                "upstream CA: serving the trust bundle kept from its last answer until it answers again",
                metadata: ["path": "\(file)", "roots": .number(roots.count)])
        }
        replicas.trust(answered: initial.roots)
        state = Mutex(initial)
    }

    /// Keeps the connections to the CA's replicas (reconnecting as needed, names resolved again)
    /// until cancelled; probes every replica not known to answer every couple of seconds, so
    /// readiness and `sds_agent_upstream_ca_up` tell the truth before any workload asks, and a
    /// replica that comes back is used again.
    public func run() async throws {
        await withDiscardingTaskGroup { group in
            group.addTask { await self.replicas.run(clock: self.clock) }
            group.addTask {
                while !Task.isCancelled {
                    let waiting = self.replicas.all.filter { $0.reachable != true }
                    await withDiscardingTaskGroup { probes in
                        for replica in waiting { probes.addTask { await self.probe(replica) } }
                    }
                    // With every replica answering, one of them is asked every interval anyway:
                    // its answer says what is tainted, so a taint reaches this agent within it.
                    if waiting.isEmpty, let replica = self.replicas.next(excluding: []) { await self.probe(replica) }
                    try? await self.clock.sleep(for: waiting.isEmpty ? Self.taintPollInterval : .seconds(2))
                }
            }
        }
    }

    /// How often a CA whose replicas all answer is asked anyway, for news of a taint.
    public static let taintPollInterval: Duration = .seconds(15)

    /// Every replica and whether its last call reached it (nil before the first), for `inspect`.
    public var endpoints: [(endpoint: String, reachable: Bool?)] { replicas.all.map { ($0.endpoint, $0.reachable) } }

    /// A call with no token: any answer but "cannot reach" proves the replica is there (istiod
    /// and `ca serve` refuse it with `unauthenticated`).
    func probe(_ replica: UpstreamReplicas.Replica) async {
        var metadata = Metadata()
        metadata.addString(configuration.clusterID, forKey: "ClusterID")
        // `ca serve` answers it without counting a refused CSR; istiod ignores the key.
        metadata.addString("1", forKey: "x-sds-agent-probe")
        var options = CallOptions.defaults
        options.timeout = configuration.callTimeout
        let ca = Istio_V1_Auth_IstioCertificateService.Client(wrapping: replica.client)
        do {
            let answer = try await ca.createCertificate(Istio_V1_Auth_IstioCertificateRequest(), metadata: metadata, options: options) {
                response in
                // A refusal (what a probe gets) is thrown here, with the CA's trailers.
                _ = try response.message
                return response.metadata
            }
            learnTaint(from: answer, answered: true)
            markReachable(replica, true, error: nil)
        } catch let error as RPCError where [.unavailable, .deadlineExceeded, .cancelled, .unknown].contains(error.code) {
            learnTaint(from: error.metadata, answered: false)
            markReachable(replica, false, error: unreachable(error, replica))
        } catch let error as RPCError {
            learnTaint(from: error.metadata, answered: true)
            learnRoots(from: error.metadata, of: replica)
            learnRevocation(from: error.metadata, of: replica.endpoint)
            markReachable(replica, true, error: nil)
        } catch {
            markReachable(replica, false, error: IssuanceError(code: .unavailable, message: "\(error)"))
        }
    }

    /// Closes the connections; calls in flight finish first.
    public func shutdown() { replicas.shutdown() }

    /// When the earliest root from the CA's answers expires (nil before the first answer).
    public var earliestRootNotAfter: Date? { state.withLock { $0.roots.map(\.notValidAfter).min() } }

    /// Why the CA refuses every forwarded token: set when it refused one and has issued none
    /// since start (an audience it does not accept, typically), for readiness; nil otherwise.
    public var refusesForwardedTokens: String? {
        state.withLock { state in
            state.refusalBeforeAnyIssue.map {
                // The CA's own status text: escaped and bounded, as it goes to /readyz and `check` as it is.
                "the upstream CA refuses the callers' forwarded tokens and has issued nothing yet (does it accept --audience?): \(CallerText($0, limit: 256))"
            }
        }
    }

    /// Whether a replica answered its last call (false once every replica failed its last; nil
    /// before any answer).
    public var isReachable: Bool? { replicas.reachable }

    public func issue(csr: CertificateSigningRequest, for identity: SPIFFEID, ttl: Duration, credential: CallerCredential?)
        async throws(IssuanceError) -> [Certificate]
    {
        let request: Istio_V1_Auth_IstioCertificateRequest
        do {
            request = try Self.request(csr: csr, identity: identity, ttl: ttl, mode: configuration.credentialMode)
        } catch {
            throw IssuanceError(code: .csrRejected, message: "cannot encode the CSR: \(error)")
        }
        // No token to send is not the CA's fault and does not pass by retrying now.
        let token = try bearerToken(for: credential)
        var attempts = Attempts(deadline: ContinuousClock.now + configuration.issueDeadline)
        while true {
            guard let replica = replicas.next(excluding: attempts.tried) else {
                // Every replica was tried in this round: a pause (backoff with jitter), a new round.
                guard let pause = attempts.nextRound() else {
                    throw attempts.outOfTime(configuration.endpointsText, lastFailure(of: replicas.all))
                }
                try? await Task.sleep(for: pause)
                continue
            }
            attempts.begin(replica.endpoint)
            do {
                let (chainPEM, answered) = try await call(
                    request, token: token, timeout: min(configuration.callTimeout, attempts.deadline - .now), on: replica)
                let (chain, roots) = try await verify(answer: chainPEM, for: identity, key: csr.publicKey)
                metrics.ok.increment()
                state.withLock {
                    $0.issued += 1
                    $0.refusalBeforeAnyIssue = nil
                }
                markReachable(replica, true, error: nil)
                adopt(roots: roots, from: replica.endpoint)
                noteIssued(chain: chain)
                learnRevocation(from: answered, of: replica.endpoint)
                return chain
            } catch {
                // A transient failure moves on to the next replica at once; the rest is final.
                try settle(error, of: replica, for: identity)
                guard ContinuousClock.now < attempts.deadline - .milliseconds(200) else {
                    throw attempts.outOfTime(configuration.endpointsText, error.message)
                }
            }
        }
    }

    /// One issuance's attempts over the replicas: rounds, each trying every replica once.
    private struct Attempts {
        let started = ContinuousClock.now
        let deadline: ContinuousClock.Instant
        var count = 0
        var round = 0
        var tried = Set<String>()

        init(deadline: ContinuousClock.Instant) { self.deadline = deadline }

        mutating func begin(_ endpoint: String) {
            count += 1
            tried.insert(endpoint)
        }

        /// The pause before the next round, or nil when it would not end before the deadline.
        mutating func nextRound() -> Duration? {
            round += 1
            tried = []
            let base = min(2.0, 0.2 * pow(2, Double(round - 1)))
            let pause = Duration.milliseconds(Int64(Double.random(in: base / 2...base) * 1000))
            return ContinuousClock.now + pause < deadline - .milliseconds(200) ? pause : nil
        }

        func outOfTime(_ endpoints: String, _ reason: String) -> IssuanceError {
            IssuanceError(
                code: .unavailable,
                message: "the upstream CA \(endpoints) did not answer in \(count) attempt(s) over \(started.duration(to: .now)): \(reason)")
        }
    }

    /// Counts and reports a failed call to `replica`; rethrows it unless it is transient (the
    /// CA did not answer), which the caller retries on another replica.
    private func settle(_ error: IssuanceError, of replica: UpstreamReplicas.Replica, for identity: SPIFFEID) throws(IssuanceError) {
        switch error.code {
        case .unavailable:
            metrics.unavailable.increment()
            markReachable(replica, false, error: error)
        case .verificationFailed:
            metrics.invalid.increment()
            markReachable(replica, true, error: nil)
            logger.error(
                "upstream CA: REFUSED ITS ANSWER; no certificate issued",
                metadata: ["spiffe_id": "\(identity)", "reason": "\(error.message)", "endpoint": "\(replica.endpoint)"])
            throw error
        default:
            metrics.refused.increment()
            if error.code == .callerRefused, configuration.credentialMode == .forward {
                state.withLock { if $0.issued == 0 { $0.refusalBeforeAnyIssue = error.message } }
            }
            markReachable(replica, true, error: nil)
            throw error
        }
    }

    /// Why the replicas did not answer, for the caller's status: each one's TLS refusal if any,
    /// else that it did not answer.
    private func lastFailure(of replicas: [UpstreamReplicas.Replica]) -> String {
        let reasons = replicas.map { replica in
            "\(replica.endpoint): " + (replica.verifier.failure.map { Self.tlsRefusedPrefix + $0 } ?? "no answer")
        }
        return reasons.joined(separator: "; ")
    }

    // MARK: - The call

    static func request(csr: CertificateSigningRequest, identity: SPIFFEID, ttl: Duration, mode: CredentialMode) throws
        -> Istio_V1_Auth_IstioCertificateRequest
    {
        var request = Istio_V1_Auth_IstioCertificateRequest()
        request.csr = try csr.pem()
        request.validityDuration = ttl.components.seconds
        if mode == .node {
            request.metadata.fields["ImpersonatedIdentity"] = .init(stringValue: identity.description)
        }
        return request
    }

    private func bearerToken(for credential: CallerCredential?) throws(IssuanceError) -> String {
        switch configuration.credentialMode {
        case .forward:
            guard let credential, credential.expiry > now() else {
                // The next stream of this identity brings a fresh token; the cache retries.
                throw IssuanceError(code: .unavailable, message: "no valid caller token to forward yet")
            }
            return credential.token
        case .node:
            guard let file = configuration.tokenFile,
                let token = try? String(contentsOfFile: file, encoding: .utf8).trimmed,
                !token.isEmpty
            else {
                throw IssuanceError(
                    code: .unavailable, message: "cannot read the agent's own token from \(configuration.tokenFile ?? "-")")
            }
            return token
        }
    }

    private func call(_ request: Istio_V1_Auth_IstioCertificateRequest, token: String, timeout: Duration, on replica: UpstreamReplicas.Replica)
        async throws(IssuanceError) -> (chain: [String], metadata: Metadata)
    {
        var metadata = Metadata()
        metadata.addString("Bearer \(token)", forKey: "authorization")
        metadata.addString(configuration.clusterID, forKey: "ClusterID")
        var options = CallOptions.defaults
        options.timeout = max(timeout, .milliseconds(100))
        // A replica that is down fails at once, so the next one is tried within the deadline.
        options.waitForReady = false
        let ca = Istio_V1_Auth_IstioCertificateService.Client(wrapping: replica.client)
        do {
            let (chain, answered) = try await ca.createCertificate(request, metadata: metadata, options: options) { response in
                (try response.message.certChain, response.metadata)
            }
            learnTaint(from: answered, answered: true)
            return (chain, answered)
        } catch let error as RPCError {
            switch error.code {
            case .unauthenticated, .permissionDenied, .invalidArgument, .failedPrecondition:
                learnTaint(from: error.metadata, answered: true)
                throw IssuanceError(code: .callerRefused, message: "the upstream CA refused: \(error.code): \(error.message)")
            default:
                learnTaint(from: error.metadata, answered: false)
                throw unreachable(error, replica)
            }
        } catch {
            throw IssuanceError(code: .unavailable, message: "\(error)")
        }
    }

    // MARK: - What comes back

    /// Parses and checks the CA's answer: the leaf (first element) must carry `key` and exactly
    /// `identity`, and the chain must verify to the root(s) in the last element.
    package func verify(answer: [String], for identity: SPIFFEID, key: Certificate.PublicKey) async throws(IssuanceError)
        -> (chain: [Certificate], roots: [Certificate])
    {
        func invalid(_ message: String) -> IssuanceError { IssuanceError(code: .verificationFailed, message: message) }
        // Istio's client rejects a chain of length <= 1: the root must come with the leaf.
        guard answer.count >= 2 else { throw invalid("the answer holds \(answer.count) element(s); a leaf and a root are needed") }
        let parsed = answer.compactMap(PEMCertificates.parse)
        guard parsed.count == answer.count else { throw invalid("the answer is not PEM certificates") }
        guard let leaf = parsed.first?.first, let roots = parsed.last, !roots.isEmpty else {
            throw invalid("the answer's first or last element holds no certificate")
        }
        let intermediates = Array(parsed.dropFirst().dropLast().joined()) + parsed[0].dropFirst()
        guard leaf.publicKey == key else { throw invalid("the leaf does not hold the key this agent sent") }
        var verifier = Verifier(rootCertificates: CertificateStore(roots)) {
            RFC5280Policy(fixedValidationTime: now().addingTimeInterval(1))
            SPIFFELeafPolicy(expected: identity)
            // As strict as our own CA's output, but for keyEncipherment, which istiod sets on every leaf.
            LeafProfilePolicy(refusesKeyEnciphermentOnEC: false)
        }
        let result = await verifier.validate(leaf: leaf, intermediates: CertificateStore(intermediates))
        if case .couldNotValidate(let failures) = result {
            throw invalid(
                "the leaf is not \(identity) under the returned root(s): \(failures.map { $0.policyFailureReason.description })")
        }
        // Served like an embedded CA's: leaf then intermediates; roots go to the validation context.
        return ([leaf] + intermediates.filter { !roots.contains($0) }, roots)
    }

    // MARK: - Reachability

    static let tlsRefusedPrefix = "TLS refused: "

    /// The CA could not be reached: a refused TLS handshake (which gRPC reports as a closed
    /// connection) says why it was refused.
    private func unreachable(_ error: RPCError, _ replica: UpstreamReplicas.Replica) -> IssuanceError {
        if let refusal = replica.verifier.failure {
            return IssuanceError(code: .unavailable, message: Self.tlsRefusedPrefix + refusal)
        }
        return IssuanceError(code: .unavailable, message: "\(error.code): \(error.message)")
    }

    /// Records a replica's outcome; the CA as a whole is reachable while one replica is, and its
    /// transitions are what the log and `sds_agent_upstream_ca_up` report.
    private func markReachable(_ replica: UpstreamReplicas.Replica, _ reachable: Bool, error: IssuanceError?) {
        let replicaWas = replica.mark(reachable)
        let several = replicas.all.count > 1
        if several, replicaWas != reachable, replicaWas != nil || !reachable {
            if reachable {
                logger.info("upstream CA replica answers again", metadata: ["endpoint": "\(replica.endpoint)"])
            } else {
                logger.warning(
                    "upstream CA replica does not answer; the others are tried",
                    metadata: ["endpoint": "\(replica.endpoint)", "error": "\(error?.message ?? "-")"])
            }
        }
        guard let now = replicas.reachable else { return }
        let previous = state.withLock { state -> Bool? in
            defer { state.reachable = now }
            return state.reachable
        }
        metrics.up.record(now ? 1 : 0)
        guard previous != now else { return }
        // A refused TLS handshake looks like a closed connection to gRPC: say why it was refused.
        let tlsRefusal = error?.message.hasPrefix(Self.tlsRefusedPrefix) == true
        if now {
            logger.notice("upstream CA reachable", metadata: ["ca": "\(configuration.endpointsText)"])
        } else {
            logger.error(
                tlsRefusal
                    ? "UPSTREAM CA REFUSED AT TLS: its certificate does not pass --upstream-ca-bundle/--upstream-ca-server-name; current certificates are served until they expire; new identities get unavailable"
                    : "UPSTREAM CA UNREACHABLE: current certificates are served until they expire; new identities get unavailable",
                metadata: ["ca": "\(configuration.endpointsText)", "error": "\(error?.message ?? "-")"])
        }
    }
}

/// A setting of the upstream CA that cannot work; the message names it.
public struct UpstreamCAError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
