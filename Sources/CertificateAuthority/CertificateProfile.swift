import FoundationEssentials
import SwiftASN1
import X509

/// The profile of every certificate this project makes, and the check an X.509-SVID leaf must
/// pass before it is served, whoever signed it (our CA or an upstream one).
///
/// - Serial numbers: positive, exactly 20 octets (RFC 5280 4.1.2.2 allows at most 20), 158 random bits.
/// - Key usage: `digitalSignature` on every leaf; `keyEncipherment` only for an RSA key (RFC 5280
///   4.2.1.3: an EC key does not encipher keys); CAs `keyCertSign` + `cRLSign`.
/// - A leaf is never valid longer than any certificate of its chain, up to and including the root.
public enum CertificateProfile {
    /// A random serial number of exactly 20 octets: the top bit cleared (positive, so DER adds no
    /// `00` octet that would make it 21) and the next one set (no leading zero octet to strip).
    /// swift-certificates' `SerialNumber()` takes 20 random bytes and prepends `00` when the top bit
    /// is set, which is 21 octets for half of all certificates.
    public static func serialNumber() -> Certificate.SerialNumber {
        var generator = SystemRandomNumberGenerator()
        var bytes = (0..<20).map { _ in UInt8.random(in: 0...255, using: &generator) }
        bytes[0] = (bytes[0] & 0x7F) | 0x40
        return Certificate.SerialNumber(bytes: bytes)
    }

    /// The key usage of an end-entity certificate for `publicKey`.
    public static func leafKeyUsage(for publicKey: Certificate.PublicKey) -> KeyUsage {
        KeyUsage(digitalSignature: true, keyEncipherment: KeyType(of: publicKey)?.isRSA ?? false)
    }

    /// The latest a certificate signed under `authority` may be valid to: the earliest end of the
    /// signing certificate, its intermediates and its roots.
    public static func latestNotAfter(under authority: SigningAuthority) -> Date {
        ([authority.certificate] + authority.intermediates + authority.roots).map(\.notValidAfter).min()
            ?? authority.certificate.notValidAfter
    }

    /// Why a CA certificate of `authority` outlives a root it chains to (a leaf is then clamped to
    /// the root, earlier than an operator may expect); nil when none does.
    public static func outlivesRoot(_ authority: SigningAuthority) -> String? {
        guard let root = authority.roots.map(\.notValidAfter).min() else { return nil }
        let outliving = ([authority.certificate] + authority.intermediates).filter {
            !authority.roots.contains($0) && $0.notValidAfter > root
        }
        guard let first = outliving.first else { return nil }
        return "the CA certificate \(first.subject) is valid until \(first.notValidAfter.formatted(.iso8601)), after its root (until \(root.formatted(.iso8601))); leaves are clamped to the root"
    }
}

extension KeyType {
    /// Whether it is an RSA key type.
    public var isRSA: Bool {
        switch self {
        case .rsa2048, .rsa3072, .rsa4096: true
        case .ecP256, .ecP384: false
        }
    }
}

/// Verifier policy for the profile of an X.509-SVID leaf, applied to every chain before it is
/// served (ztunnel's "third line of defence" against a confused deputy): not a CA, no
/// `keyCertSign`/`cRLSign`, `digitalSignature` set, the extended key usages served (server and
/// client auth, nothing else), and not valid beyond any certificate of its chain.
public struct LeafProfilePolicy: VerifierPolicy, Sendable {
    /// Whether `keyEncipherment` on an EC key is refused. Our own CA never sets it; istiod sets it
    /// on every leaf (Go's `x509.KeyUsageKeyEncipherment` in `GenCertFromCSR`), so an upstream
    /// answer is allowed it.
    public var refusesKeyEnciphermentOnEC: Bool

    public init(refusesKeyEnciphermentOnEC: Bool = true) {
        self.refusesKeyEnciphermentOnEC = refusesKeyEnciphermentOnEC
    }

    public var verifyingCriticalExtensions: [ASN1ObjectIdentifier] { [] }

    public func chainMeetsPolicyRequirements(chain: UnverifiedCertificateChain) async -> PolicyEvaluationResult {
        let leaf = chain.leaf
        if let reason = Self.refusal(leaf: leaf, refusesKeyEnciphermentOnEC: refusesKeyEnciphermentOnEC) {
            return .failsToMeetPolicy(reason: reason)
        }
        if let outlived = chain.dropFirst().first(where: { $0.notValidAfter < leaf.notValidAfter }) {
            return .failsToMeetPolicy(
                reason: "the leaf is valid until \(leaf.notValidAfter.formatted(.iso8601)), after \(outlived.subject) (until \(outlived.notValidAfter.formatted(.iso8601)))")
        }
        return .meetsPolicy
    }

    /// Why `leaf`'s own extensions are not an X.509-SVID leaf's; nil when they are.
    static func refusal(leaf: Certificate, refusesKeyEnciphermentOnEC: Bool) -> String? {
        do {
            if case .isCertificateAuthority = try leaf.extensions.basicConstraints {
                return "the leaf is a CA certificate (basicConstraints CA:TRUE)"
            }
            if let usage = try leaf.extensions.keyUsage {
                if usage.keyCertSign || usage.cRLSign { return "the leaf may sign certificates or CRLs (keyUsage keyCertSign/cRLSign)" }
                if !usage.digitalSignature { return "the leaf's keyUsage lacks digitalSignature" }
                if usage.keyEncipherment, refusesKeyEnciphermentOnEC, KeyType(of: leaf.publicKey)?.isRSA != true {
                    return "the leaf's keyUsage has keyEncipherment for a key that is not RSA"
                }
            }
            if let eku = try leaf.extensions.extendedKeyUsage {
                let usages = Set(eku)
                guard usages == [.serverAuth, .clientAuth] else {
                    return "the leaf's extended key usages are \(Array(eku)), not exactly serverAuth and clientAuth"
                }
            }
        } catch {
            return "the leaf's extensions are malformed"
        }
        return nil
    }
}
