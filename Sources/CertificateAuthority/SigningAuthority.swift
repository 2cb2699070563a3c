import Crypto
import FoundationEssentials
import Glibc
import X509
import SDSModel

/// A CA certificate and key that sign workload certificates, and the roots they chain to.
public struct SigningAuthority: Sendable {
    /// The certificate whose key signs leaves (a root, or an intermediate).
    public var certificate: Certificate
    /// The signing key; held in memory only once loaded.
    public var privateKey: Certificate.PrivateKey
    /// Certificates between `certificate` and the root, nearest first (empty when `certificate` is the root).
    public var intermediates: [Certificate]
    /// The trust anchors served to workloads as the validation context.
    public var roots: [Certificate]

    public init(
        certificate: Certificate, privateKey: Certificate.PrivateKey, intermediates: [Certificate] = [],
        roots: [Certificate]
    ) {
        self.certificate = certificate
        self.privateKey = privateKey
        self.intermediates = intermediates
        self.roots = roots
    }

    /// The certificates served after a leaf it signs: the signing certificate itself unless it is
    /// one of the roots (an operator's CA is usually an intermediate under their own root), then
    /// the intermediates above it. Roots are not sent; workloads have them in the validation context.
    public var chainAboveLeaf: [Certificate] {
        (roots.contains(certificate) ? [] : [certificate]) + intermediates.filter { !roots.contains($0) }
    }

    /// Creates a self-signed root for `trustDomain` with a key of `keyType`, valid from `now` for `ttl`.
    public static func makeSelfSignedRoot(trustDomain: String, ttl: Duration, now: Date, keyType: KeyType = .ecP256) throws
        -> SigningAuthority
    {
        let key = try KeyFactory.generate(keyType)
        let name = try DistinguishedName {
            OrganizationName("sds-agent")
            CommonName("sds-agent root CA for \(trustDomain)")
        }
        let extensions = try Certificate.Extensions {
            Critical(BasicConstraints.isCertificateAuthority(maxPathLength: nil))
            Critical(KeyUsage(digitalSignature: true, keyCertSign: true, cRLSign: true))
            SubjectKeyIdentifier(hash: key.publicKey)
            SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://\(trustDomain)")])
        }
        let certificate = try Certificate(
            version: .v3, serialNumber: CertificateProfile.serialNumber(), publicKey: key.publicKey,
            notValidBefore: now.addingTimeInterval(-60), notValidAfter: now.addingTimeInterval(ttl.timeInterval),
            issuer: name, subject: name, extensions: extensions,
            issuerPrivateKey: key)
        return SigningAuthority(certificate: certificate, privateKey: key, roots: [certificate])
    }
}

extension Certificate.SerialNumber {
    /// Lowercase hex of the serial's bytes, as `openssl x509 -serial` and Envoy's `/certs` print it.
    public var hexString: String {
        bytes.map { byte in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined()
    }
}
