import Crypto
import FoundationEssentials
import Glibc
import SDSModel
import X509
import SwiftASN1

/// The narrow seam between the agent and whatever CA signs its workloads' certificates.
///
/// Two implementations: ``EmbeddedCA`` (signs in the process) and the Istio CSR API client
/// (`UpstreamCA`, a remote CA that may be slow or down). Either reports what changed through the
/// ``IssuerChange`` callback it is built with; the cache and the SDS server never know which.
public protocol CertificateIssuer: Sendable {
    /// Signs a certificate for `identity` (the authenticated caller, never taken from the CSR).
    /// `credential` is the caller's verified token, for a CA that is asked on the caller's behalf;
    /// nil for renewals when none is held, and for CAs that do not need it.
    ///
    /// - Returns: the leaf first, then any intermediates up to (not including) the root.
    func issue(csr: CertificateSigningRequest, for identity: SPIFFEID, ttl: Duration, credential: CallerCredential?)
        async throws(IssuanceError) -> [Certificate]

    /// The roots that certificates from this issuer chain to.
    func trustBundle() async -> TrustBundle

    /// Whether ``issue(csr:for:ttl:credential:)`` sends the caller's token on (a CA asked on the
    /// caller's behalf). When false, nobody holds tokens for it: not the cache, not each open stream.
    var usesCallerCredential: Bool { get }
}

extension CertificateIssuer {
    /// Signs without a caller credential (the embedded CA, tests).
    public func issue(csr: CertificateSigningRequest, for identity: SPIFFEID, ttl: Duration) async throws(IssuanceError)
        -> [Certificate]
    {
        try await issue(csr: csr, for: identity, ttl: ttl, credential: nil)
    }
}

/// What an issuer changed, for whoever must tell the streams.
public enum IssuerChange: Sendable, Equatable {
    /// The set of trusted roots changed: push the bundle to every stream.
    case bundleChanged
    /// New leaves are signed by another key: re-issue every certificate.
    case signerChanged
    /// Certificates were declared compromised (or cleared): re-issue the leaves under them.
    case taintChanged
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
        /// The issued chain failed verification against the CA's own roots (or, from an upstream
        /// CA, the answer is not a chain for the identity and key that were asked for).
        public static let verificationFailed = Code("verification_failed")
        /// An upstream CA refused the caller (its token, or the node's right to ask for it).
        public static let callerRefused = Code("caller_refused")

        /// Whether asking again later may succeed without anything changing here.
        public var isTransient: Bool { self == .unavailable }
        /// Whether the CA refused what was asked (the caller's fault, not the CA's).
        public var isRefusal: Bool { self == .csrRejected || self == .identityRejected || self == .callerRefused }
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

extension TrustBundle {
    /// The bundle of `roots`, versioned by a digest of its PEM. A set, not a list: each root once,
    /// in the order of its PEM, so the same roots in another order or with duplicates are the same
    /// version (a new version is pushed to every stream and costs each Envoy work per cluster).
    public init(roots: [Certificate], trustDomain: String, revocation: RevocationLists? = nil) {
        let pem = Set(roots.compactMap { try? $0.pem() }).sorted().joined()
        let revocationPEM = revocation?.pem ?? ""
        let versioned = revocation.map { pem + $0.pem + ($0.onlyLeaf ? "leaf" : "chain") } ?? pem
        let digest = SHA256.hash(data: Data(versioned.utf8)).prefix(8).hexString
        self.init(
            trustDomain: trustDomain, rootsPEM: roots.isEmpty ? "" : pem, version: digest, revocationPEM: revocationPEM,
            onlyVerifyLeafCRL: revocation?.onlyLeaf ?? false)
    }
}
