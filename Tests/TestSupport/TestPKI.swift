import CertificateAuthority
import Crypto
import Foundation
import Logging
import SDSModel
import X509

/// A fresh embedded CA for tests, with a self-signed root made in memory.
public enum TestPKI {
    public static let trustDomain = "cluster.local"

    public static func authority(now: Date = Date(), ttl: Duration = .seconds(365 * 24 * 3600)) -> SigningAuthority {
        try! SigningAuthority.makeSelfSignedRoot(trustDomain: trustDomain, ttl: ttl, now: now)
    }

    /// An intermediate CA signed by `root`, as operators plug in: their root stays offline and
    /// the mesh CA signs with a certificate under it. Its `roots` are `root`'s.
    public static func intermediate(under root: SigningAuthority, now: Date = Date()) -> SigningAuthority {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let name = try! DistinguishedName {
            OrganizationName("example corp")
            CommonName("mesh intermediate CA")
        }
        let extensions = try! Certificate.Extensions {
            Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
            Critical(KeyUsage(keyCertSign: true, cRLSign: true))
            SubjectKeyIdentifier(hash: key.publicKey)
        }
        let certificate = try! Certificate(
            version: .v3, serialNumber: CertificateProfile.serialNumber(), publicKey: key.publicKey,
            notValidBefore: now.addingTimeInterval(-60), notValidAfter: now.addingTimeInterval(30 * 86400),
            issuer: root.certificate.subject, subject: name, extensions: extensions, issuerPrivateKey: root.privateKey)
        return SigningAuthority(certificate: certificate, privateKey: key, roots: root.roots)
    }

    public static func ca(now: @escaping @Sendable () -> Date = { Date() }) -> EmbeddedCA {
        EmbeddedCA(authority: authority(now: now()), trustDomain: trustDomain, logger: quietLogger, now: now)
    }

    public static func identity(_ namespace: String = "demo", _ serviceAccount: String = "frontend") -> SPIFFEID {
        try! SPIFFEID(trustDomain: trustDomain, namespace: namespace, serviceAccount: serviceAccount)
    }

    /// A logger that prints nothing (tests assert on values, not on log text).
    public static var quietLogger: Logger {
        var logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        logger.logLevel = .critical
        return logger
    }

    /// Writes `key` as PEM with mode 0600 (a CA key readable by others is refused).
    public static func writeKey(_ key: Certificate.PrivateKey, to path: String) throws {
        try key.serializeAsPEM().pemString.write(toFile: path, atomically: true, encoding: .utf8)
        chmod(path, 0o600)
    }

    /// A temporary directory removed by the caller.
    public static func temporaryDirectory() -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("sds-test-\(UUID().uuidString.prefix(8))").path
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }
}
