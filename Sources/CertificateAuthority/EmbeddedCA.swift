import Crypto
import Foundation
import Logging
import SDSModel
import Synchronization
import X509

/// The CA built into the agent: signs workload certificates with a local signing key.
///
/// Every issued chain is verified against the CA's own roots before it is returned, with a
/// policy that requires exactly the caller's SPIFFE ID in the (critical) URI SAN.
public final class EmbeddedCA: CertificateIssuer {
    private let authority: Mutex<SigningAuthority>
    private let trustDomain: String
    private let now: @Sendable () -> Date
    private let logger: Logger

    /// Creates a CA that signs with `authority` for identities in `trustDomain`.
    public init(
        authority: SigningAuthority, trustDomain: String, logger: Logger,
        now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.authority = Mutex(authority)
        self.trustDomain = trustDomain
        self.logger = logger
        self.now = now
    }

    public func trustBundle() async -> TrustBundle {
        let roots = authority.withLock { $0.roots }
        let pem = roots.compactMap { try? $0.serializeAsPEM().pemString }.joined(separator: "\n") + "\n"
        let digest = SHA256.hash(data: Data(pem.utf8)).prefix(8).map { String(format: "%02x", $0) }.joined()
        return TrustBundle(trustDomain: trustDomain, rootsPEM: pem, version: digest)
    }

    public func issue(csr: CertificateSigningRequest, for identity: SPIFFEID, ttl: Duration) async throws(IssuanceError)
        -> [Certificate]
    {
        guard identity.trustDomain == trustDomain else {
            throw IssuanceError(
                code: .identityRejected, message: "\(identity) is outside trust domain \(trustDomain)")
        }
        if let reason = CSRPolicy.evaluate(csr, for: identity) {
            throw IssuanceError(code: .csrRejected, message: reason)
        }
        let authority = self.authority.withLock { $0 }
        let now = self.now()
        guard authority.certificate.notValidAfter > now else {
            throw IssuanceError(
                code: .unavailable, message: "the CA certificate expired at \(authority.certificate.notValidAfter)")
        }
        // Backdate a little for peers whose clocks lag; never outlive the signing certificate.
        let notBefore = now.addingTimeInterval(-60)
        let notAfter = min(now.addingTimeInterval(ttl.timeInterval), authority.certificate.notValidAfter)

        let leaf: Certificate
        do {
            let extensions = try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true, keyEncipherment: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                // The subject is empty, so the SAN must be critical (RFC 5280 4.2.1.6, SPIFFE X509-SVID).
                Critical(SubjectAlternativeNames([.uniformResourceIdentifier(identity.description)]))
                SubjectKeyIdentifier(hash: csr.publicKey)
                if let ski = try authority.certificate.extensions.subjectKeyIdentifier {
                    AuthorityKeyIdentifier(keyIdentifier: ski.keyIdentifier)
                }
            }
            leaf = try Certificate(
                version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: csr.publicKey,
                notValidBefore: notBefore, notValidAfter: notAfter, issuer: authority.certificate.subject,
                subject: DistinguishedName(), extensions: extensions, issuerPrivateKey: authority.privateKey)
        } catch {
            throw IssuanceError(code: .unavailable, message: "signing failed: \(error)")
        }

        let chain = [leaf] + authority.intermediates
        try await verify(chain: chain, roots: authority.roots, identity: identity, at: now)
        logger.debug(
            "issued certificate",
            metadata: [
                "spiffe_id": "\(identity)", "serial": "\(leaf.serialNumber.hexString)",
                "not_after": "\(notAfter.formatted(.iso8601))",
            ])
        return chain
    }

    private func verify(chain: [Certificate], roots: [Certificate], identity: SPIFFEID, at time: Date)
        async throws(IssuanceError)
    {
        var verifier = Verifier(rootCertificates: CertificateStore(roots)) {
            RFC5280Policy(fixedValidationTime: time)
            SPIFFELeafPolicy(expected: identity)
        }
        let result = await verifier.validate(leaf: chain[0], intermediates: CertificateStore(chain.dropFirst()))
        if case .couldNotValidate(let failures) = result {
            throw IssuanceError(
                code: .verificationFailed,
                message: "issued chain does not verify: \(failures.map { $0.policyFailureReason.description })")
        }
    }
}
