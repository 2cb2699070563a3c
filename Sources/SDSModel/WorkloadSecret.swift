import FoundationEssentials
import Glibc

/// A workload's current X.509-SVID: certificate chain and private key, as Envoy takes them (PEM).
///
/// The private key lives only in memory; nothing writes it to disk.
public struct WorkloadSecret: Sendable, Hashable {
    /// The identity in the certificate's URI SAN.
    public var spiffeID: SPIFFEID
    /// Leaf first, then any intermediates; the root is not included (it is in the trust bundle).
    public var certificateChainPEM: String
    /// PKCS#8 PEM of the leaf's private key.
    public var privateKeyPEM: String
    /// The leaf's serial number, lowercase hex; also the secret's version.
    public var serialNumberHex: String
    /// Validity start.
    public var notBefore: Date
    /// Validity end.
    public var notAfter: Date

    public init(
        spiffeID: SPIFFEID, certificateChainPEM: String, privateKeyPEM: String, serialNumberHex: String,
        notBefore: Date, notAfter: Date
    ) {
        self.spiffeID = spiffeID
        self.certificateChainPEM = certificateChainPEM
        self.privateKeyPEM = privateKeyPEM
        self.serialNumberHex = serialNumberHex
        self.notBefore = notBefore
        self.notAfter = notAfter
    }

    /// An opaque version string for xDS responses.
    public var version: String { serialNumberHex }
}

/// The set of root certificates that workloads of a trust domain validate peers against.
public struct TrustBundle: Sendable, Hashable {
    /// The trust domain the roots belong to.
    public var trustDomain: String
    /// Concatenated PEM of every root currently trusted.
    public var rootsPEM: String
    /// An opaque version: a digest of the roots (and of the revocation lists).
    public var version: String
    /// PEM certificate revocation lists for chains under these roots (the CA directory's
    /// `ca-crl.pem`); empty for none.
    public var revocationPEM: String
    /// Whether Envoy checks only the leaf against them (`only_verify_leaf_cert_crl`): set when
    /// not every CA of the chain publishes a list.
    public var onlyVerifyLeafCRL: Bool

    public init(trustDomain: String, rootsPEM: String, version: String, revocationPEM: String = "", onlyVerifyLeafCRL: Bool = false) {
        self.trustDomain = trustDomain
        self.rootsPEM = rootsPEM
        self.version = version
        self.revocationPEM = revocationPEM
        self.onlyVerifyLeafCRL = onlyVerifyLeafCRL
    }

    /// Whether it holds no root yet (an upstream CA that has not answered once).
    public var isEmpty: Bool { !rootsPEM.contains("-----BEGIN") }
}
