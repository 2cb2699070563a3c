import CertificateAuthority
import CoreMetrics
import Crypto
import FoundationEssentials
import Glibc
import Logging
import SDSModel
import X509
import SwiftASN1

/// One current secret per identity, shared by every stream and every Envoy that asks for it.
///
/// The first request for an identity generates an ECDSA P-256 key in memory, builds a CSR and
/// has it signed through the ``CertificateIssuer`` seam; concurrent requests wait for that one
/// issuance (check, lock, check again). ``maintain()`` (driven by ``Rotator``) renews each
/// certificate at its ``RotationPolicy`` time with a fresh key and signals the identity's
/// streams; a failed renewal is retried with backoff while the old certificate, still valid,
/// keeps being served. Identities no stream has watched for `idleTTL` are dropped, so memory
/// follows the live pods.
public actor SecretCache {
    /// How certificates are minted and kept.
    public struct Configuration: Sendable {
        /// Lifetime requested for each workload certificate.
        public var certificateTTL: Duration
        /// When to renew.
        public var rotation: RotationPolicy
        /// How long an identity no stream watches stays cached.
        public var idleTTL: Duration
        /// Most renewals in flight at once: a remote CA answers slower than the embedded one,
        /// and a thousand identities renewed one by one would take minutes.
        public var maxConcurrentRenewals: Int
        /// The type of every workload key generated (`--workload-key-type`).
        public var keyType: KeyType = .ecP256
        /// Lifetime of the JWT-SVIDs served over SDS (`--jwt-svid-ttl`, as the Workload API's).
        public var jwtSVIDTTL: Duration = Defaults.Tokens.jwtSVIDTTL

        public init(
            certificateTTL: Duration = Defaults.Certificates.ttl, rotation: RotationPolicy = RotationPolicy(),
            idleTTL: Duration = .seconds(300), maxConcurrentRenewals: Int = 16
        ) {
            self.certificateTTL = certificateTTL
            self.rotation = rotation
            self.idleTTL = idleTTL
            self.maxConcurrentRenewals = max(1, maxConcurrentRenewals)
        }
    }

    private struct Entry {
        var secret: WorkloadSecret?
        var renewAt: Date = .distantPast
        var issuing: Task<WorkloadSecret, any Error>?
        var failures = 0
        var nextAttempt: Date = .distantPast
        var lastWatched: Date
        /// The newest caller token seen for the identity, for a CA asked on the caller's behalf;
        /// renewals use it while it is valid.
        var credential: CallerCredential?
    }

    private let issuer: any CertificateIssuer
    public nonisolated var usesCallerCredential: Bool { issuer.usesCallerCredential }
    let configuration: Configuration
    let logger: Logger
    let now: @Sendable () -> Date
    let updates = SecretUpdates()
    /// The JWT-SVID key (the agent's own CA's); nil with an upstream CA.
    let jwtSigner: (any JWTSVIDSigning)?
    /// JWT-SVIDs served over SDS, by identity and audiences (JWTSVIDs.swift).
    var jwtSVIDs: [JWTSVIDKey: JWTSVIDEntry] = [:]
    private var entries: [SPIFFEID: Entry] = [:] {
        didSet { metrics.identities.set(entries.count) }
    }
    private var issuedCount = 0
    private let metrics: Metrics

    /// The cache's metrics, created once.
    private struct Metrics: Sendable {
        let issued: Counter
        let renewed: Counter
        let failures: Counter
        let identities: Meter
        let issueDuration: CoreMetrics.Timer
        let factory: any MetricsFactory

        init(factory: any MetricsFactory) {
            issued = Counter(label: SecretCache.issuedMetric, dimensions: [("kind", "new")], factory: factory)
            renewed = Counter(label: SecretCache.issuedMetric, dimensions: [("kind", "renewal")], factory: factory)
            failures = Counter(label: "sds_agent_certificate_issue_failures_total", factory: factory)
            identities = Meter(label: "sds_agent_cached_identities", factory: factory)
            self.factory = factory
            issueDuration = CoreMetrics.Timer(label: "sds_agent_certificate_issue_seconds", factory: factory)
        }
    }

    /// Seconds until the earliest cached certificate expires; present only while one is cached.
    public static let expiryMetric = "sds_agent_certificate_expiry_seconds"
    private var earliestExpiry: Meter?

    /// Counts certificates issued, by `kind`: `new` (first request) or `renewal`.
    public static let issuedMetric = "sds_agent_certificates_issued_total"

    public init(
        issuer: any CertificateIssuer, configuration: Configuration, logger: Logger,
        metrics: any MetricsFactory = MetricsSystem.factory, now: @escaping @Sendable () -> Date = { Date() },
        jwt: (any JWTSVIDSigning)? = nil
    ) {
        self.issuer = issuer
        self.jwtSigner = jwt
        self.configuration = configuration
        self.logger = logger
        self.metrics = Metrics(factory: metrics)
        self.now = now
    }

    /// How many certificates this cache has had issued (for tests and diagnostics).
    package var issuedCertificates: Int { issuedCount }

    /// How many streams are watching for updates (all identities).
    public nonisolated var watcherCount: Int { updates.count }

    /// The identities currently cached.
    public var cachedIdentities: Set<SPIFFEID> { Set(entries.keys) }

    /// What the cache holds for one identity (`sds-agent inspect`).
    public struct IdentityReport: Sendable, Hashable {
        public var spiffeID: SPIFFEID
        public var serialNumberHex: String?
        public var notBefore: Date?
        public var notAfter: Date?
        /// When it will be renewed (or retried, after a failure).
        public var renewAt: Date?
        /// Renewal failures in a row.
        public var failures: Int
        /// An issuance is in flight.
        public var issuing: Bool
    }

    /// Every cached identity, sorted by SPIFFE ID.
    public func report() -> [IdentityReport] {
        entries.map { identity, entry in
            IdentityReport(
                spiffeID: identity, serialNumberHex: entry.secret?.serialNumberHex, notBefore: entry.secret?.notBefore,
                notAfter: entry.secret?.notAfter,
                renewAt: entry.secret == nil ? nil : max(entry.renewAt, entry.nextAttempt), failures: entry.failures,
                issuing: entry.issuing != nil)
        }.sorted { $0.spiffeID < $1.spiffeID }
    }

    public func trustBundle() async -> TrustBundle { await issuer.trustBundle() }

    public nonisolated func updates(for identity: SPIFFEID) -> AsyncStream<Void> { updates.watch(identity) }

    public nonisolated func watch(_ identity: SPIFFEID, signal: @escaping @Sendable () -> Void) -> SecretWatch {
        updates.watch(identity, signal: signal)
    }

    public func workloadSecret(for identity: SPIFFEID, credential: CallerCredential? = nil) async throws(SecretError)
        -> WorkloadSecret
    {
        let now = self.now()
        if let credential, entries[identity] != nil, credential.expiry > (entries[identity]?.credential?.expiry ?? .distantPast) {
            entries[identity]?.credential = credential
        }
        if let entry = entries[identity] {
            if let secret = entry.secret, now < secret.notAfter { return secret }
            if let task = entry.issuing { return try await Self.value(of: task) }
        }
        return try await issue(for: identity, reason: "first request", credential: credential)
    }

    /// Renews what is due, retries what failed, drops what nobody watches. Called every tick.
    public func maintain() async {
        let now = self.now()
        // Absent until a certificate is cached (a 0 on an idle node would fire "expiring soon"
        // alerts), and gone again once none is.
        if let earliest = entries.values.compactMap({ $0.secret?.notAfter }).min() {
            let meter = earliestExpiry ?? Meter(label: Self.expiryMetric, factory: metrics.factory)
            earliestExpiry = meter
            meter.set(earliest.timeIntervalSince(now))
        } else if let meter = earliestExpiry {
            meter.destroy()
            earliestExpiry = nil
        }
        let watched = updates.watchedIdentities
        for identity in entries.keys {
            if watched.contains(identity) { entries[identity]?.lastWatched = now }
        }
        await refreshJWTSVIDs(now: now)
        let idle = configuration.idleTTL.timeInterval
        for (identity, entry) in entries where entry.issuing == nil && now.timeIntervalSince(entry.lastWatched) > idle {
            entries[identity] = nil
            logger.info("dropped idle identity: no stream has asked for it", metadata: ["spiffe_id": "\(identity)"])
        }
        let due = entries.filter { _, entry in
            entry.secret != nil && entry.issuing == nil && now >= entry.renewAt && now >= entry.nextAttempt
        }.keys
        // Concurrently, at most `maxConcurrentRenewals` at a time (each waits for its CA answer).
        var pending = due.sorted()[...]
        await withTaskGroup(of: Void.self) { group in
            var running = 0
            while let identity = pending.popFirst() {
                if running == configuration.maxConcurrentRenewals {
                    await group.next()
                    running -= 1
                }
                let credential = entries[identity]?.credential
                group.addTask { _ = try? await self.issue(for: identity, reason: "rotation", credential: credential) }
                running += 1
            }
        }
    }

    /// Schedules a renewal of every cached certificate `affected` says must go (a chain under a
    /// tainted CA certificate), each at a random moment within `window` from now, so a mesh of
    /// agents does not ask its CA for all of them at once; ``maintain()`` renews them and tells
    /// their streams. Returns how many were scheduled.
    @discardableResult
    public func reissue(within window: Duration, where affected: (WorkloadSecret) -> Bool) -> Int {
        let now = self.now()
        var scheduled = 0
        for (identity, entry) in entries {
            guard let secret = entry.secret, affected(secret) else { continue }
            let at = now.addingTimeInterval(Double.random(in: 0...max(0, window.timeInterval)))
            entries[identity]?.renewAt = min(entry.renewAt, at)
            entries[identity]?.nextAttempt = .distantPast
            scheduled += 1
        }
        return scheduled
    }

    /// The cached identities whose certificate `affected` says must go (for the taint gauge and
    /// `inspect`).
    public func identities(where affected: (WorkloadSecret) -> Bool) -> Set<SPIFFEID> {
        Set(entries.compactMap { identity, entry in entry.secret.map(affected) == true ? identity : nil })
    }

    /// Renews every cached certificate at the next ``maintain()`` (after the CA changed its signer).
    public func renewAll() {
        for identity in entries.keys {
            entries[identity]?.renewAt = .distantPast
            entries[identity]?.nextAttempt = .distantPast
        }
    }

    /// Tells every stream that the trust bundle changed.
    public nonisolated func bundleChanged() { updates.bundleChanged() }

    private func issue(for identity: SPIFFEID, reason: String, credential: CallerCredential?) async throws(SecretError)
        -> WorkloadSecret
    {
        if let task = entries[identity]?.issuing { return try await Self.value(of: task) }
        let issuer = self.issuer
        // An expired token is no use to a CA; without one a forwarding CA refuses, and the next
        // stream's fresh token renews.
        let credential = credential.flatMap { $0.expiry > now() ? $0 : nil }
        let ttl = configuration.certificateTTL
        let keyType = configuration.keyType
        let duration = metrics.issueDuration
        let task = Task {
            let started = ContinuousClock.now
            defer { duration.recordNanoseconds(Int64(started.duration(to: .now) / .nanoseconds(1))) }
            return try await Self.mint(for: identity, issuer: issuer, ttl: ttl, keyType: keyType, credential: credential)
        }
        let issuedAt = now()
        entries[identity, default: Entry(lastWatched: issuedAt)].issuing = task
        if let credential, credential.expiry > (entries[identity]?.credential?.expiry ?? .distantPast) {
            entries[identity]?.credential = credential
        }
        do {
            let secret = try await Self.value(of: task)
            record(secret, for: identity, issuedAt: issuedAt, reason: reason)
            return secret
        } catch {
            recordFailure(error, for: identity)
            throw error
        }
    }

    /// A new secret in the cache: its renewal time, the counts, the log line, and a push to the
    /// identity's streams when it replaces one.
    private func record(_ secret: WorkloadSecret, for identity: SPIFFEID, issuedAt: Date, reason: String) {
        let previous = entries[identity]?.secret
        entries[identity, default: Entry(lastWatched: now())].secret = secret
        entries[identity]?.issuing = nil
        entries[identity]?.failures = 0
        entries[identity]?.nextAttempt = .distantPast
        // Measured from issuance, not from the backdated notBefore: with a short lifetime the
        // backdating would otherwise put the renewal point in the past.
        entries[identity]?.renewAt = configuration.rotation.renewalTime(
            notBefore: max(secret.notBefore, issuedAt), notAfter: secret.notAfter)
        issuedCount += 1
        (previous == nil ? metrics.issued : metrics.renewed).increment()
        logger.info(
            previous == nil ? "issued workload certificate" : "rotated workload certificate",
            metadata: [
                "spiffe_id": "\(identity)", "serial": "\(secret.serialNumberHex)", "reason": "\(reason)",
                "not_after": "\(secret.notAfter.formatted(.iso8601))",
                "renew_at": "\(entries[identity]?.renewAt.formatted(.iso8601) ?? "-")",
            ])
        if previous != nil { updates.certificateChanged(for: identity) }
    }

    /// A failed issuance: a renewal keeps serving the current secret and retries with backoff; a
    /// first issuance leaves nothing behind.
    private func recordFailure(_ error: SecretError, for identity: SPIFFEID) {
        metrics.failures.increment()
        entries[identity]?.issuing = nil
        if let current = entries[identity]?.secret {
            let failures = (entries[identity]?.failures ?? 0) + 1
            let delay = RotationPolicy.retryDelay(afterFailure: failures)
            entries[identity]?.failures = failures
            entries[identity]?.nextAttempt = now().addingTimeInterval(delay.timeInterval)
            logger.error(
                "CERTIFICATE RENEWAL FAILED; still serving the current certificate while it is valid",
                metadata: [
                    "spiffe_id": "\(identity)", "error": "\(error.message)", "attempt": "\(failures)",
                    "retry_in": "\(delay)", "current_not_after": "\(current.notAfter.formatted(.iso8601))",
                ])
        } else {
            entries[identity] = nil
            logger.error("cannot issue workload certificate", metadata: ["spiffe_id": "\(identity)", "error": "\(error.message)"])
        }
    }

    private static func value(of task: Task<WorkloadSecret, any Error>) async throws(SecretError) -> WorkloadSecret {
        do {
            return try await task.value
        } catch let error as SecretError {
            throw error
        } catch {
            throw SecretError(.unavailable, message: "\(error)", cause: error)
        }
    }

    /// Generates a key, builds a CSR for `identity`, and has it signed.
    static func mint(
        for identity: SPIFFEID, issuer: any CertificateIssuer, ttl: Duration, keyType: KeyType = .ecP256,
        credential: CallerCredential? = nil
    ) async throws(SecretError) -> WorkloadSecret {
        let key: (key: Certificate.PrivateKey, pem: String)
        let csr: CertificateSigningRequest
        let chain: [Certificate]
        do {
            key = try KeyFactory.generateWithPEM(keyType)
            csr = try KeyFactory.makeCSR(for: identity, key: key.key)
        } catch {
            throw SecretError(.failed, message: "cannot build a CSR for \(identity): \(error)", cause: error)
        }
        do {
            chain = try await issuer.issue(csr: csr, for: identity, ttl: ttl, credential: credential)
        } catch {
            let code: SecretError.Code = error.code.isTransient ? .unavailable : error.code.isRefusal ? .refused : .failed
            throw SecretError(
                code, message: error.code.isTransient ? "the CA cannot sign \(identity) now: \(error)" : "the CA refused \(identity): \(error)",
                cause: error)
        }
        do {
            let chainPEM = try chain.map { try $0.pem() }.joined()
            let leaf = chain[0]
            return WorkloadSecret(
                spiffeID: identity, certificateChainPEM: chainPEM, privateKeyPEM: key.pem,
                serialNumberHex: leaf.serialNumber.hexString, notBefore: leaf.notValidBefore,
                notAfter: leaf.notValidAfter)
        } catch {
            throw SecretError(.failed, message: "cannot encode the certificate for \(identity): \(error)", cause: error)
        }
    }

    /// A CSR for `identity` signed by a P-256 `key` (tests and tools; the cache uses ``KeyFactory``).
    public static func makeCSR(for identity: SPIFFEID, key: P256.Signing.PrivateKey) throws -> CertificateSigningRequest {
        try KeyFactory.makeCSR(for: identity, key: Certificate.PrivateKey(key))
    }
}
