import CertificateAuthority
import Foundation
import Logging
import SDSModel

/// A fresh embedded CA for tests, with a self-signed root made in memory.
public enum TestPKI {
    public static let trustDomain = "cluster.local"

    public static func authority(now: Date = Date(), ttl: Duration = .seconds(365 * 24 * 3600)) -> SigningAuthority {
        try! SigningAuthority.makeSelfSignedRoot(trustDomain: trustDomain, ttl: ttl, now: now)
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

    /// A temporary directory removed by the caller.
    public static func temporaryDirectory() -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("sds-test-\(UUID().uuidString.prefix(8))").path
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }
}
