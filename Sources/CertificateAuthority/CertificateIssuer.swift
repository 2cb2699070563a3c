import Foundation
import SDSModel
import X509

/// The narrow seam between the agent and whatever CA signs its workloads' certificates.
///
/// The embedded CA implements it today; a plug-in or remote CA can replace it without the cache
/// or the SDS server noticing.
public protocol CertificateIssuer: Sendable {
    /// Signs a certificate for `identity` (the authenticated caller, never taken from the CSR).
    ///
    /// - Returns: the leaf first, then any intermediates up to (not including) the root.
    func issue(csr: CertificateSigningRequest, for identity: SPIFFEID, ttl: Duration) async throws(IssuanceError)
        -> [Certificate]

    /// The roots that certificates from this issuer chain to.
    func trustBundle() async -> TrustBundle
}

/// Why a certificate was not issued.
public struct IssuanceError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The kind of failure.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private var name: String
        private init(_ name: String) { self.name = name }
        /// The CSR is malformed, forged, or asks for something the CA does not grant.
        public static let csrRejected = Code("csr_rejected")
        /// The identity is outside the CA's trust domain.
        public static let identityRejected = Code("identity_rejected")
        /// The CA cannot sign right now (no key, expired root, signing failure).
        public static let unavailable = Code("ca_unavailable")
        /// The issued chain failed verification against the CA's own roots.
        public static let verificationFailed = Code("verification_failed")
        public var description: String { name }
    }

    /// The kind of failure.
    public var code: Code
    /// What went wrong, in words.
    public var message: String

    public init(code: Code, message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(message)" }
}
