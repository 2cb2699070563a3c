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
        /// Host name or IP address of the CA.
        public var host: String
        /// Its port.
        public var port: Int
        /// PEM roots that verify the CA server's TLS certificate.
        public var serverBundleFile: String
        /// The name verified in its certificate (default: `host`, an IP SAN for an address).
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

        public init(
            host: String, port: Int, serverBundleFile: String, serverName: String? = nil,
            credentialMode: CredentialMode = .forward, tokenFile: String? = nil, clusterID: String = "Kubernetes",
            trustDomain: String, callTimeout: Duration = .seconds(4), issueDeadline: Duration = .seconds(8),
            bundleCacheFile: String? = nil
        ) {
            self.host = host
            self.port = port
            self.serverBundleFile = serverBundleFile
            self.serverName = serverName
            self.credentialMode = credentialMode
            self.tokenFile = tokenFile
            self.clusterID = clusterID
            self.trustDomain = trustDomain
            self.callTimeout = callTimeout
            self.issueDeadline = issueDeadline
            self.bundleCacheFile = bundleCacheFile
        }
    }

    private struct State {
        var roots: [Certificate] = []
        var reachable: Bool?
        /// Certificates issued since start, and the last refusal of a forwarded token before any.
        var issued = 0
        var refusalBeforeAnyIssue: String?
        /// Calls waiting for the first roots, by id.
        var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
        var expiredWaiters: Set<Int> = []
        var nextWaiter = 0
    }

    private let configuration: Configuration
    /// Only in forward mode does the caller's token go to the CA.
    public var usesCallerCredential: Bool { configuration.credentialMode == .forward }
    private let client: GRPCClient<HTTP2ClientTransport.Posix>
    private let logger: Logger
    private let now: @Sendable () -> Date
    private let clock: any Clock<Duration>
    private let onChange: @Sendable (IssuerChange) -> Void
    private let state: Mutex<State>
    private let metrics: Metrics
    private let serverVerifier: UpstreamServerVerifier

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
        let target: any ResolvableTarget
        let isAddress = Self.isIPAddress(configuration.host)
        if configuration.host.contains(":") {
            target = .ipv6(address: configuration.host, port: configuration.port)
        } else if isAddress {
            target = .ipv4(address: configuration.host, port: configuration.port)
        } else {
            target = .dns(host: configuration.host, port: configuration.port)
        }
        let bundle = configuration.serverBundleFile
        let serverName = configuration.serverName
        let bundleText: String
        do {
            bundleText = try InputFile.text(bundle)
        } catch {
            throw UpstreamCAError("cannot read --upstream-ca-bundle \(bundle): \(error.reason)")
        }
        guard let serverRoots = PEMCertificates.parse(bundleText), !serverRoots.isEmpty else {
            throw UpstreamCAError("--upstream-ca-bundle \(bundle) holds no PEM certificates (truncated or malformed?)")
        }
        let serverVerifier = UpstreamServerVerifier(
            roots: serverRoots, referenceName: serverName ?? configuration.host, now: now)
        self.serverVerifier = serverVerifier
        do {
            let transport = try HTTP2ClientTransport.Posix(
                target: target,
                transportSecurity: .tls { tls in
                    tls.trustRoots = .certificates([.file(path: bundle, format: .pem)])
                    tls.serverCertificateVerification = .fullVerification
                    // Our own check replaces BoringSSL's: the configured name is the only identity.
                    tls.customVerificationCallback = serverVerifier.callback
                },
                config: .defaults { config in
                    // Back soon after an outage: the default backoff grows to two minutes.
                    config.backoff = .init(initial: .milliseconds(250), max: .seconds(5), multiplier: 1.6, jitter: 0.2)
                    config.connection.maxIdleTime = .seconds(24 * 3600)
                    // A name other than the address: verified in the certificate and sent as SNI.
                    if let serverName, !Self.isIPAddress(serverName) { config.http2.authority = serverName }
                })
            client = GRPCClient(transport: transport)
        } catch {
            throw UpstreamCAError("cannot set up the client for \(configuration.host):\(configuration.port): \(error)")
        }
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
        state = Mutex(initial)
    }

    /// Keeps the connection to the CA (reconnecting as needed) until cancelled; until the CA has
    /// answered, and while it does not, probes it every couple of seconds, so readiness and
    /// `sds_agent_upstream_ca_up` tell the truth before any workload asks.
    public func run() async throws {
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await self.client.runConnections() }
            group.addTask {
                while !Task.isCancelled {
                    if self.isReachable != true { await self.probe() }
                    try? await self.clock.sleep(for: self.isReachable == true ? .seconds(10) : .seconds(2))
                }
            }
        }
    }

    /// A call with no token: any answer but "cannot reach" proves the CA is there (istiod and
    /// `ca serve` refuse it with `unauthenticated`).
    func probe() async {
        var metadata = Metadata()
        metadata.addString(configuration.clusterID, forKey: "ClusterID")
        // `ca serve` answers it without counting a refused CSR; istiod ignores the key.
        metadata.addString("1", forKey: "x-sds-agent-probe")
        var options = CallOptions.defaults
        options.timeout = configuration.callTimeout
        let ca = Istio_V1_Auth_IstioCertificateService.Client(wrapping: client)
        do {
            _ = try await ca.createCertificate(Istio_V1_Auth_IstioCertificateRequest(), metadata: metadata, options: options)
            markReachable(true, error: nil)
        } catch let error as RPCError where [.unavailable, .deadlineExceeded, .cancelled, .unknown].contains(error.code) {
            markReachable(false, error: unreachable(error))
        } catch is RPCError {
            markReachable(true, error: nil)
        } catch {
            markReachable(false, error: IssuanceError(code: .unavailable, message: "\(error)"))
        }
    }

    /// Closes the connection; calls in flight finish first.
    public func shutdown() { client.beginGracefulShutdown() }

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

    /// Whether the last call reached the CA (nil before the first).
    public var isReachable: Bool? { state.withLock { $0.reachable } }

    /// The roots from the CA's last answer. Before the first answer (and with none kept from a
    /// previous run) it waits up to `issueDeadline` for one, then returns an empty bundle.
    public func trustBundle() async -> TrustBundle {
        if state.withLock({ $0.roots.isEmpty }) {
            await waitForRoots(upTo: configuration.issueDeadline)
        }
        return TrustBundle(roots: state.withLock { $0.roots }, trustDomain: configuration.trustDomain)
    }

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
        let started = ContinuousClock.now
        let deadline = started + configuration.issueDeadline
        var attempt = 0
        while true {
            attempt += 1
            do {
                let chainPEM = try await call(request, token: token, timeout: min(configuration.callTimeout, deadline - .now))
                let (chain, roots) = try await verify(answer: chainPEM, for: identity, key: csr.publicKey)
                metrics.ok.increment()
                state.withLock {
                    $0.issued += 1
                    $0.refusalBeforeAnyIssue = nil
                }
                markReachable(true, error: nil)
                adopt(roots: roots)
                return chain
            } catch {
                switch error.code {
                case .unavailable:
                    metrics.unavailable.increment()
                    markReachable(false, error: error)
                    // Backoff with full jitter, bounded by what is left of the deadline.
                    let base = min(2.0, 0.2 * pow(2, Double(attempt - 1)))
                    let pause = Duration.milliseconds(Int64(Double.random(in: base / 2...base) * 1000))
                    guard ContinuousClock.now + pause < deadline - .milliseconds(200) else {
                        throw IssuanceError(
                            code: .unavailable,
                            message: "the upstream CA \(configuration.host):\(configuration.port) did not answer in \(attempt) attempt(s) over \(started.duration(to: .now)): \(error.message)")
                    }
                    try? await Task.sleep(for: pause)
                case .verificationFailed:
                    metrics.invalid.increment()
                    markReachable(true, error: nil)
                    logger.error(
                        "upstream CA: REFUSED ITS ANSWER; no certificate issued",
                        metadata: ["spiffe_id": "\(identity)", "reason": "\(error.message)"])
                    throw error
                default:
                    metrics.refused.increment()
                    if error.code == .callerRefused, configuration.credentialMode == .forward {
                        state.withLock { if $0.issued == 0 { $0.refusalBeforeAnyIssue = error.message } }
                    }
                    markReachable(true, error: nil)
                    throw error
                }
            }
        }
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

    private func call(_ request: Istio_V1_Auth_IstioCertificateRequest, token: String, timeout: Duration)
        async throws(IssuanceError) -> [String]
    {
        var metadata = Metadata()
        metadata.addString("Bearer \(token)", forKey: "authorization")
        metadata.addString(configuration.clusterID, forKey: "ClusterID")
        var options = CallOptions.defaults
        options.timeout = max(timeout, .milliseconds(100))
        let ca = Istio_V1_Auth_IstioCertificateService.Client(wrapping: client)
        do {
            return try await ca.createCertificate(request, metadata: metadata, options: options).certChain
        } catch let error as RPCError {
            switch error.code {
            case .unauthenticated, .permissionDenied, .invalidArgument, .failedPrecondition:
                throw IssuanceError(code: .callerRefused, message: "the upstream CA refused: \(error.code): \(error.message)")
            default:
                throw unreachable(error)
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

    // MARK: - Bundle and reachability

    private func adopt(roots: [Certificate]) {
        let (changed, waiters) = state.withLock { state -> (Bool, [CheckedContinuation<Void, Never>]) in
            let waiters = Array(state.waiters.values)
            state.waiters = [:]
            guard Set(roots) != Set(state.roots) else { return (false, waiters) }
            state.roots = roots
            return (true, waiters)
        }
        for waiter in waiters { waiter.resume() }
        guard changed else { return }
        logger.notice(
            "upstream CA: trust bundle changed; pushing it to every stream",
            metadata: [
                "roots": .number(roots.count), "serials": .list(roots.map { $0.serialNumber.hexString }),
            ])
        if let file = configuration.bundleCacheFile {
            let pem = TrustBundle(roots: roots, trustDomain: configuration.trustDomain).rootsPEM
            do {
                try AtomicFile.write(pem, to: file, mode: 0o644)
            } catch {
                logger.warning("upstream CA: cannot keep the trust bundle for a restart", metadata: ["path": "\(file)", "error": "\(error)"])
            }
        }
        onChange(.bundleChanged)
    }

    static let tlsRefusedPrefix = "TLS refused: "

    /// The CA could not be reached: a refused TLS handshake (which gRPC reports as a closed
    /// connection) says why it was refused.
    private func unreachable(_ error: RPCError) -> IssuanceError {
        if let refusal = serverVerifier.failure {
            return IssuanceError(code: .unavailable, message: Self.tlsRefusedPrefix + refusal)
        }
        return IssuanceError(code: .unavailable, message: "\(error.code): \(error.message)")
    }

    private func markReachable(_ reachable: Bool, error: IssuanceError?) {
        // A refused TLS handshake looks like a closed connection to gRPC: say why it was refused.
        let tlsRefusal = error?.message.hasPrefix(Self.tlsRefusedPrefix) == true
        let previous = state.withLock { state -> Bool? in
            defer { state.reachable = reachable }
            return state.reachable
        }
        metrics.up.record(reachable ? 1 : 0)
        guard previous != reachable else { return }
        if reachable {
            logger.notice(
                "upstream CA reachable", metadata: ["ca": "\(configuration.host):\(configuration.port)"])
        } else {
            logger.error(
                tlsRefusal
                    ? "UPSTREAM CA REFUSED AT TLS: its certificate does not pass --upstream-ca-bundle/--upstream-ca-server-name; current certificates are served until they expire; new identities get unavailable"
                    : "UPSTREAM CA UNREACHABLE: current certificates are served until they expire; new identities get unavailable",
                metadata: ["ca": "\(configuration.host):\(configuration.port)", "error": "\(error?.message ?? "-")"])
        }
    }

    private func waitForRoots(upTo limit: Duration) async {
        let id = state.withLock { state -> Int in
            state.nextWaiter += 1
            return state.nextWaiter
        }
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                await withCheckedContinuation { continuation in
                    let resumeNow = self.state.withLock { state -> Bool in
                        if !state.roots.isEmpty || state.expiredWaiters.remove(id) != nil { return true }
                        state.waiters[id] = continuation
                        return false
                    }
                    if resumeNow { continuation.resume() }
                }
            }
            group.addTask { try? await Task.sleep(for: limit) }
            await group.next()
            group.cancelAll()
            // Time is up (or roots came): release this waiter, or mark it so it never suspends.
            let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
                if let waiter = state.waiters.removeValue(forKey: id) { return waiter }
                state.expiredWaiters.insert(id)
                return nil
            }
            waiter?.resume()
        }
        state.withLock { _ = $0.expiredWaiters.remove(id) }
    }

    /// An IPv4 or IPv6 literal (the same test the serving certificate uses for IP SANs).
    private static func isIPAddress(_ text: String) -> Bool { SigningAuthority.addressBytes(text) != nil }
}

/// A setting of the upstream CA that cannot work; the message names it.
public struct UpstreamCAError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
