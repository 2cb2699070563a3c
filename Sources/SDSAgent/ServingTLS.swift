import NIOCertificateReloading
import NIOSSL
import Synchronization

/// The TLS certificate `ca serve` presents, replaceable while it serves: after a root rotation
/// the CA issues its own serving certificate again under the new root, so the chain it presents
/// and `root-cert.pem` (every root the CA trusts, active first) always verify each other.
final class ServingTLS: CertificateReloader {
    private let current: Mutex<NIOSSLContextConfigurationOverride>

    /// Starts with `chainPEM` (leaf first) and its key.
    init(chainPEM: String, keyPEM: String) throws {
        current = Mutex(try Self.override(chainPEM: chainPEM, keyPEM: keyPEM))
    }

    var sslContextConfigurationOverride: NIOSSLContextConfigurationOverride { current.withLock { $0 } }

    /// New handshakes present what `other` holds; connections already open keep theirs.
    func replace(with other: ServingTLS) {
        let next = other.sslContextConfigurationOverride
        current.withLock { $0 = next }
    }

    private static func override(chainPEM: String, keyPEM: String) throws -> NIOSSLContextConfigurationOverride {
        var override = NIOSSLContextConfigurationOverride()
        override.certificateChain = try NIOSSLCertificate.fromPEMBytes(Array(chainPEM.utf8)).map { .certificate($0) }
        override.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(keyPEM.utf8), format: .pem))
        return override
    }
}
