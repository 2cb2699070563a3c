import Crypto
import FoundationEssentials
import Glibc
import Logging
import SDSModel
import Synchronization
import X509

/// The CA built into the agent: signs workload certificates with a local signing key, and can
/// roll to a new root without breaking any connection.
///
/// Root rotation has three steps (SPIRE's prepared/active slots):
/// 1. ``prepareRotation(ttl:)`` makes the next root and adds it to the trust bundle (old + new);
/// 2. ``activatePrepared()`` signs with the next root from then on (the agent then re-issues every
///    leaf, pushed to every stream);
/// 3. ``retireExpiredRoots()`` drops an old root once the last leaf it signed has expired.
/// Every issued chain is verified against the current roots before it is returned.
public final class EmbeddedCA: CertificateIssuer {
    /// The embedded CA signs for the authenticated identity; it never sees the token.
    public let usesCallerCredential = false

    /// What changed, for whoever must tell the streams.
    public typealias Change = IssuerChange

    struct RetiringRoot {
        var root: Certificate
        var lastLeafNotAfter: Date
    }

    struct State {
        var active: SigningAuthority
        var prepared: SigningAuthority?
        var retiring: [RetiringRoot] = []
        var lastLeafNotAfter: Date = .distantPast
        /// The revocation lists accepted last (`ca-crl.pem`), served while they cover the signer.
        var revocation: [RevocationList] = []
        /// Certificates declared compromised (`tainted-certs.pem`).
        var tainted = TaintedCertificates.none
        /// The PEM of the roots last asked for, kept while they are the roots (every CSR answer
        /// carries it).
        var rootsPEM: (roots: [Certificate], pem: String)?

        var roots: [Certificate] {
            var all = active.roots + (prepared?.roots ?? []) + retiring.map(\.root)
            var seen = Set<Certificate>()
            all.removeAll { !seen.insert($0).inserted }
            return all
        }
    }

    private let state: Mutex<State>
    private let trustDomain: String
    private let now: @Sendable () -> Date
    private let logger: Logger
    private let onChange: @Sendable (Change, EmbeddedCA) -> Void
    private let rootKeyType: KeyType

    /// Creates a CA that signs with `authority` for identities in `trustDomain`. `additionalRoots`
    /// (e.g. a root being retired, from the state directory) stay trusted until `retireAfter`.
    public init(
        authority: SigningAuthority, trustDomain: String, logger: Logger, additionalRoots: [Certificate] = [],
        retireAfter: Date = .distantPast, now: @escaping @Sendable () -> Date = { Date() }, rootKeyType: KeyType = .ecP256,
        onChange: @escaping @Sendable (Change, EmbeddedCA) -> Void = { _, _ in }
    ) {
        self.rootKeyType = rootKeyType
        var state = State(active: authority)
        state.retiring = additionalRoots.filter { !authority.roots.contains($0) }.map {
            RetiringRoot(root: $0, lastLeafNotAfter: retireAfter)
        }
        self.state = Mutex(state)
        self.trustDomain = trustDomain
        self.logger = logger
        self.now = now
        self.onChange = onChange
    }

    /// The signing material in use now.
    public var activeAuthority: SigningAuthority { state.withLock { $0.active } }

    /// The certificate that signs leaves now.
    public var activeCertificate: Certificate { state.withLock { $0.active.certificate } }

    /// The next root, between ``prepareRotation(ttl:)`` and ``activatePrepared()``.
    public var preparedCertificate: Certificate? { state.withLock { $0.prepared?.certificate } }

    /// Every root currently trusted.
    public var roots: [Certificate] { state.withLock { $0.roots } }

    /// The roots' PEM, one after the other (encoded once per set of roots).
    public var rootsPEM: String {
        state.withLock { state in
            let roots = state.roots
            if let cached = state.rootsPEM, cached.roots == roots { return cached.pem }
            let pem = roots.compactMap { try? $0.pem() }.joined()
            state.rootsPEM = (roots, pem)
            return pem
        }
    }

    public func trustBundle() async -> TrustBundle {
        let (roots, lists, active) = state.withLock { ($0.roots, $0.revocation, $0.active) }
        return TrustBundle(roots: roots, trustDomain: trustDomain, revocation: RevocationLists.served(lists, for: active))
    }

    /// The revocation lists served now (nil when none covers the signer), as `ca serve` announces them.
    public var servedRevocation: RevocationLists? {
        state.withLock { RevocationLists.served($0.revocation, for: $0.active) }
    }

    /// The revocation lists accepted last (whether or not they cover the signer now).
    public var revocationLists: [RevocationList] { state.withLock { $0.revocation } }

    /// Serves `lists` (checked by ``RevocationLists/accept(_:for:current:now:)``) in every
    /// validation context from now on; an empty list withdraws them. Announced as a bundle change.
    public func setRevocationLists(_ lists: [RevocationList]) {
        let changed = state.withLock { state in
            defer { state.revocation = lists }
            return state.revocation != lists
        }
        if changed { onChange(.bundleChanged, self) }
    }

    /// The certificates declared compromised now.
    public var tainted: TaintedCertificates { state.withLock { $0.tainted } }

    /// Whether the CA signs with a tainted key or under a tainted certificate now (it refuses to).
    public var signerIsTainted: Bool { state.withLock { $0.tainted.affects($0.active) } }

    /// Declares `certificates` compromised (checked by ``TaintedCertificates/load(pem:roots:intermediates:)``):
    /// from now on the CA refuses to sign under them; a prepared CA that is clean signs at once
    /// instead of after its activation delay. Announced as ``Change/taintChanged``; returns whether
    /// the set changed.
    @discardableResult
    public func taint(_ certificates: [Certificate]) -> Bool {
        let fresh = TaintedCertificates(certificates)
        let (changed, activateNow) = state.withLock { state -> (Bool, Bool) in
            guard state.tainted != fresh else { return (false, false) }
            state.tainted = fresh
            let activeTainted = fresh.affects(state.active)
            return (true, activeTainted && state.prepared.map { !fresh.affects($0) } == true)
        }
        guard changed else { return false }
        logger.notice(
            fresh.isEmpty ? "CA taint cleared" : "CA taint: certificates declared compromised; leaves under them are re-issued",
            metadata: [
                "subjects": .list(certificates.map { "\($0.subject)" }), "serials": .list(certificates.map { $0.serialNumber.hexString }),
                "signer_tainted": "\(signerIsTainted)",
            ])
        if activateNow { activatePrepared() }
        onChange(.taintChanged, self)
        return true
    }

    /// Drops tainted roots from the bundle, once the caller knows no leaf it serves chains to them
    /// and a clean root is trusted beside them. Returns whether the bundle changed.
    @discardableResult
    public func dropTaintedRoots() -> Bool {
        let dropped = state.withLock { state -> [Certificate] in
            let tainted = state.tainted
            guard state.roots.contains(where: { !tainted.contains($0) }) else { return [] }
            let gone = state.retiring.map(\.root).filter(tainted.contains)
            state.retiring.removeAll { tainted.contains($0.root) }
            if let prepared = state.prepared, tainted.affects(prepared) { state.prepared = nil }
            return gone
        }
        guard !dropped.isEmpty else { return false }
        logger.notice(
            "CA taint: tainted root(s) removed from the trust bundle; no leaf served chains to them",
            metadata: ["serials": .list(dropped.map { $0.serialNumber.hexString })])
        onChange(.bundleChanged, self)
        return true
    }

    /// Step 1: makes the next self-signed root and publishes it in the bundle next to the current one.
    @discardableResult
    public func prepareRotation(ttl: Duration) throws -> Certificate {
        let next = try SigningAuthority.makeSelfSignedRoot(trustDomain: trustDomain, ttl: ttl, now: now(), keyType: rootKeyType)
        let replaced = state.withLock { state -> Bool in
            defer { state.prepared = next }
            return state.prepared != nil
        }
        logger.notice(
            "CA rotation: prepared the next root; trust bundle now holds old and new",
            metadata: ["serial": "\(next.certificate.serialNumber.hexString)", "replaced_prepared": "\(replaced)"])
        onChange(.bundleChanged, self)
        return next.certificate
    }

    /// An operator's new CA (files replaced on disk) under the roots trusted now: signs with it
    /// at once (same roots: no bundle change) and asks for every leaf to be re-issued.
    public func replaceSigner(with authority: SigningAuthority) {
        state.withLock { state in
            state.active = authority
            state.lastLeafNotAfter = .distantPast
        }
        logger.notice(
            "CA files changed: now signing with the new CA certificate under the same root(s)",
            metadata: ["serial": "\(authority.certificate.serialNumber.hexString)", "subject": "\(authority.certificate.subject)"])
        onChange(.signerChanged, self)
    }

    /// An operator's new CA under another root: published in the bundle next to the current roots
    /// first (step 1 of a rotation, with material given instead of generated); ``activatePrepared()``
    /// signs with it later.
    public func prepare(_ authority: SigningAuthority) {
        state.withLock { $0.prepared = authority }
        logger.notice(
            "CA files changed: the new root is in the trust bundle next to the old one; it signs after the activation delay",
            metadata: ["serial": "\(authority.certificate.serialNumber.hexString)", "roots": .number(authority.roots.count)])
        onChange(.bundleChanged, self)
    }

    /// Step 2: signs with the prepared root from now on. Returns false when none is prepared.
    @discardableResult
    public func activatePrepared() -> Bool {
        let activated = state.withLock { state -> SigningAuthority? in
            guard let next = state.prepared else { return nil }
            for root in state.active.roots where !next.roots.contains(root) {
                state.retiring.append(RetiringRoot(root: root, lastLeafNotAfter: state.lastLeafNotAfter))
            }
            state.active = next
            state.prepared = nil
            state.lastLeafNotAfter = .distantPast
            return next
        }
        guard let activated else { return false }
        logger.notice(
            "CA rotation: now signing with the new root; old root stays trusted until its last leaf expires",
            metadata: ["serial": "\(activated.certificate.serialNumber.hexString)"])
        onChange(.signerChanged, self)
        return true
    }

    /// Step 3: drops old roots whose last leaf has expired. Returns whether the bundle changed.
    @discardableResult
    public func retireExpiredRoots() -> Bool {
        let now = self.now()
        let retired = state.withLock { state -> [Certificate] in
            let done = state.retiring.filter { $0.lastLeafNotAfter < now }.map(\.root)
            state.retiring.removeAll { $0.lastLeafNotAfter < now }
            return done
        }
        guard !retired.isEmpty else { return false }
        logger.notice(
            "CA rotation: retired old root(s); every leaf they signed has expired",
            metadata: ["serials": .list(retired.map { $0.serialNumber.hexString })])
        onChange(.bundleChanged, self)
        return true
    }

    public func issue(csr: CertificateSigningRequest, for identity: SPIFFEID, ttl: Duration, credential: CallerCredential?)
        async throws(IssuanceError) -> [Certificate]
    {
        try await issue(csr: csr, for: identity, ttl: ttl, csrRules: .strict)
    }

    /// How much of a CSR the CA looks at.
    public enum CSRRules: Sendable {
        /// ``CSRPolicy``: the CSR may ask for nothing but the caller's identity (the agent's own CSRs).
        case strict
        /// Only the key and its proof of possession; the rest is ignored and overwritten by the
        /// caller's identity, as istiod does for any client (`sds-agent ca serve`).
        case keyOnly
    }

    /// Signs a certificate for `identity` with the key in `csr`, checked by `csrRules`.
    public func issue(csr: CertificateSigningRequest, for identity: SPIFFEID, ttl: Duration, csrRules: CSRRules)
        async throws(IssuanceError) -> [Certificate]
    {
        try check(csr, for: identity, csrRules)
        let (authority, roots, tainted) = state.withLock { ($0.active, $0.roots, $0.tainted) }
        guard !tainted.affects(authority) else {
            throw IssuanceError(
                code: .unavailable,
                message: "the signing CA \(authority.certificate.subject) is tainted (tainted-certs.pem) and the CA directory holds no replacement: refusing to sign")
        }
        let now = self.now()
        guard authority.certificate.notValidAfter > now else {
            throw IssuanceError(
                code: .unavailable, message: "the CA certificate expired at \(authority.certificate.notValidAfter)")
        }
        // Backdate a little for peers whose clocks lag; never outlive any certificate of the chain.
        let notBefore = now.addingTimeInterval(-60)
        let notAfter = min(now.addingTimeInterval(ttl.timeInterval), CertificateProfile.latestNotAfter(under: authority))

        let leaf = try Self.leaf(for: identity, key: csr.publicKey, notBefore: notBefore, notAfter: notAfter, signedBy: authority)
        let chain = [leaf] + authority.chainAboveLeaf
        try await verify(chain: chain, roots: roots, identity: identity, at: now)
        state.withLock { state in
            // Only leaves of the key that is still active count towards its retirement.
            if state.active.certificate == authority.certificate {
                state.lastLeafNotAfter = max(state.lastLeafNotAfter, notAfter)
            } else if let index = state.retiring.firstIndex(where: { authority.roots.contains($0.root) }) {
                state.retiring[index].lastLeafNotAfter = max(state.retiring[index].lastLeafNotAfter, notAfter)
            }
        }
        logger.debug(
            "issued certificate",
            metadata: [
                "spiffe_id": "\(identity)", "serial": "\(leaf.serialNumber.hexString)",
                "not_after": "\(notAfter.formatted(.iso8601))",
            ])
        return chain
    }

    /// The CSR's checks before anything is signed: the identity is ours, and the CSR passes `csrRules`.
    private func check(_ csr: CertificateSigningRequest, for identity: SPIFFEID, _ csrRules: CSRRules) throws(IssuanceError) {
        guard identity.trustDomain == trustDomain else {
            throw IssuanceError(code: .identityRejected, message: "\(identity) is outside trust domain \(trustDomain)")
        }
        switch csrRules {
        case .strict:
            if let reason = CSRPolicy.evaluate(csr, for: identity) {
                throw IssuanceError(code: .csrRejected, message: reason)
            }
        case .keyOnly:
            guard csr.publicKey.isValidSignature(csr.signature, for: csr) else {
                throw IssuanceError(code: .csrRejected, message: "the CSR's signature does not verify with its own public key")
            }
            if let reason = CSRPolicy.keyTypeRefusal(csr) { throw IssuanceError(code: .csrRejected, message: reason) }
        }
    }

    /// The workload leaf (``CertificateProfile``): empty subject, the identity as its only and
    /// critical SAN, serverAuth + clientAuth.
    private static func leaf(
        for identity: SPIFFEID, key: Certificate.PublicKey, notBefore: Date, notAfter: Date, signedBy authority: SigningAuthority
    ) throws(IssuanceError) -> Certificate {
        do {
            let extensions = try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(CertificateProfile.leafKeyUsage(for: key))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                // The subject is empty, so the SAN must be critical (RFC 5280 4.2.1.6, SPIFFE X509-SVID).
                Critical(SubjectAlternativeNames([.uniformResourceIdentifier(identity.description)]))
                SubjectKeyIdentifier(hash: key)
                if let ski = try authority.certificate.extensions.subjectKeyIdentifier {
                    AuthorityKeyIdentifier(keyIdentifier: ski.keyIdentifier)
                }
            }
            return try Certificate(
                version: .v3, serialNumber: CertificateProfile.serialNumber(), publicKey: key,
                notValidBefore: notBefore, notValidAfter: notAfter, issuer: authority.certificate.subject,
                subject: DistinguishedName(), extensions: extensions, issuerPrivateKey: authority.privateKey)
        } catch {
            throw IssuanceError(code: .unavailable, message: "signing failed: \(error)")
        }
    }

    private func verify(chain: [Certificate], roots: [Certificate], identity: SPIFFEID, at time: Date)
        async throws(IssuanceError)
    {
        var verifier = Verifier(rootCertificates: CertificateStore(roots)) {
            RFC5280Policy(fixedValidationTime: time)
            SPIFFELeafPolicy(expected: identity)
            LeafProfilePolicy()
        }
        let result = await verifier.validate(leaf: chain[0], intermediates: CertificateStore(chain.dropFirst()))
        if case .couldNotValidate(let failures) = result {
            throw IssuanceError(
                code: .verificationFailed,
                message: "issued chain does not verify: \(failures.map { $0.policyFailureReason.description })")
        }
    }
}
