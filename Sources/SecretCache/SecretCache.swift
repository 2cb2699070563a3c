import CertificateAuthority
import Crypto
import Foundation
import Logging
import SDSModel
import X509

/// One current secret per identity, shared by every stream and every Envoy that asks for it.
///
/// The first request for an identity generates an ECDSA P-256 key in memory, builds a CSR and
/// has it signed through the ``CertificateIssuer`` seam. Concurrent requests for the same identity
/// wait for that one issuance (check, lock, check again) rather than minting their own. A cached
/// certificate is reused until `refreshFraction` of its lifetime has passed.
public actor SecretCache: SecretSource {
    /// How certificates are minted.
    public struct Configuration: Sendable {
        /// Lifetime requested for each workload certificate.
        public var certificateTTL: Duration
        /// Fraction of a certificate's lifetime after which a request gets a fresh one.
        public var refreshFraction: Double

        public init(certificateTTL: Duration = .seconds(24 * 3600), refreshFraction: Double = 0.5) {
            self.certificateTTL = certificateTTL
            self.refreshFraction = refreshFraction
        }
    }

    private enum Entry {
        case ready(WorkloadSecret)
        case issuing(Task<WorkloadSecret, any Error>)
    }

    private let issuer: any CertificateIssuer
    private let configuration: Configuration
    private let logger: Logger
    private let now: @Sendable () -> Date
    private var entries: [SPIFFEID: Entry] = [:]
    private var issuedCount = 0

    public init(
        issuer: any CertificateIssuer, configuration: Configuration, logger: Logger,
        now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.issuer = issuer
        self.configuration = configuration
        self.logger = logger
        self.now = now
    }

    /// How many certificates this cache has had issued (for tests and diagnostics).
    public var issuedCertificates: Int { issuedCount }

    public func trustBundle() async -> TrustBundle { await issuer.trustBundle() }

    public func workloadSecret(for identity: SPIFFEID) async throws(SecretError) -> WorkloadSecret {
        switch entries[identity] {
        case .ready(let secret) where isFresh(secret):
            return secret
        case .issuing(let task):
            return try await Self.value(of: task)
        case .ready, .none:
            break
        }
        let issuer = self.issuer
        let ttl = configuration.certificateTTL
        let task = Task { try await Self.mint(for: identity, issuer: issuer, ttl: ttl) }
        entries[identity] = .issuing(task)
        do {
            let secret = try await Self.value(of: task)
            entries[identity] = .ready(secret)
            issuedCount += 1
            logger.info(
                "issued workload certificate",
                metadata: [
                    "spiffe_id": "\(identity)", "serial": "\(secret.serialNumberHex)",
                    "not_after": "\(secret.notAfter.formatted(.iso8601))",
                ])
            return secret
        } catch {
            entries[identity] = nil
            logger.error("cannot issue workload certificate", metadata: ["spiffe_id": "\(identity)", "error": "\(error)"])
            throw error
        }
    }

    private func isFresh(_ secret: WorkloadSecret) -> Bool {
        let lifetime = secret.notAfter.timeIntervalSince(secret.notBefore)
        return now() < secret.notBefore.addingTimeInterval(lifetime * configuration.refreshFraction)
    }

    private static func value(of task: Task<WorkloadSecret, any Error>) async throws(SecretError) -> WorkloadSecret {
        do {
            return try await task.value
        } catch let error as SecretError {
            throw error
        } catch {
            throw SecretError(isTransient: true, message: "\(error)")
        }
    }

    /// Generates a key, builds a CSR for `identity`, and has it signed.
    static func mint(for identity: SPIFFEID, issuer: any CertificateIssuer, ttl: Duration) async throws(SecretError)
        -> WorkloadSecret
    {
        let key = P256.Signing.PrivateKey()
        let csr: CertificateSigningRequest
        let chain: [Certificate]
        do {
            csr = try makeCSR(for: identity, key: key)
        } catch {
            throw SecretError(isTransient: false, message: "cannot build a CSR for \(identity): \(error)")
        }
        do {
            chain = try await issuer.issue(csr: csr, for: identity, ttl: ttl)
        } catch {
            let transient = error.code == .unavailable
            throw SecretError(isTransient: transient, message: "the CA refused \(identity): \(error)")
        }
        do {
            let chainPEM = try chain.map { try $0.serializeAsPEM().pemString }.joined(separator: "\n") + "\n"
            let leaf = chain[0]
            return WorkloadSecret(
                spiffeID: identity, certificateChainPEM: chainPEM, privateKeyPEM: key.pemRepresentation + "\n",
                serialNumberHex: leaf.serialNumber.hexString, notBefore: leaf.notValidBefore,
                notAfter: leaf.notValidAfter)
        } catch {
            throw SecretError(isTransient: false, message: "cannot encode the certificate for \(identity): \(error)")
        }
    }

    /// A CSR with an empty subject and a URI SAN extension request for `identity`.
    public static func makeCSR(for identity: SPIFFEID, key: P256.Signing.PrivateKey) throws -> CertificateSigningRequest {
        let extensions = try Certificate.Extensions {
            SubjectAlternativeNames([.uniformResourceIdentifier(identity.description)])
        }
        let attributes = try CertificateSigningRequest.Attributes([
            .init(ExtensionRequest(extensions: extensions))
        ])
        return try CertificateSigningRequest(
            version: .v1, subject: DistinguishedName(), privateKey: Certificate.PrivateKey(key), attributes: attributes)
    }
}
