import Crypto
import FoundationEssentials
import SDSModel
import SwiftASN1
import X509

/// CA certificates an operator declared compromised (`tainted-certs.pem` in the CA directory, as
/// SPIRE's tainted authorities), known by the SHA-256 of their DER: that is what travels to the
/// agents of a central CA, in the CSR API's response metadata (``metadataKey``).
///
/// A CA whose signing chain holds one refuses to sign; an agent re-issues every leaf whose chain
/// holds one (its own certificates, or the root it chains to).
public struct TaintedCertificates: Sendable, Hashable {
    /// Lowercase hex SHA-256 of each tainted certificate's DER.
    public let fingerprints: Set<String>

    public static let none = TaintedCertificates(fingerprints: [])
    /// The response metadata key `ca serve` sends them in, on answers and refusals alike.
    public static let metadataKey = "x-sds-agent-tainted"
    /// At most this many in one metadata value (64 × 65 bytes stays well under any header limit).
    public static let maximumCount = 64

    public init(fingerprints: Set<String>) { self.fingerprints = fingerprints }
    public init(_ certificates: [Certificate]) { self.init(fingerprints: Set(certificates.map(Self.fingerprint))) }

    public var isEmpty: Bool { fingerprints.isEmpty }

    public static func fingerprint(_ certificate: Certificate) -> String {
        var serializer = DER.Serializer()
        guard (try? serializer.serialize(certificate)) != nil else { return "" }
        return SHA256.hash(data: serializer.serializedBytes).hexString
    }

    public func contains(_ certificate: Certificate) -> Bool { fingerprints.contains(Self.fingerprint(certificate)) }

    /// Whether a workload chain (leaf first, then intermediates) holds a tainted certificate, or
    /// chains to a tainted root among `roots` (the root that signed its last certificate).
    public func affects(chain: [Certificate], roots: [Certificate]) -> Bool {
        guard !isEmpty else { return false }
        if chain.contains(where: contains) { return true }
        guard let top = chain.last else { return false }
        return roots.contains { root in
            contains(root) && root.subject == top.issuer && root.publicKey.isValidSignature(top.signature, for: top)
        }
    }

    /// Whether `authority` signs with a tainted key or under a tainted certificate: its own chain,
    /// or the root that chain ends in (another root trusted beside it, as during a rotation, is
    /// not its concern).
    public func affects(_ authority: SigningAuthority) -> Bool {
        affects(chain: [authority.certificate] + authority.intermediates.filter { !authority.roots.contains($0) }, roots: authority.roots)
    }

    /// The metadata value: the fingerprints, sorted, comma-separated.
    public var metadataValue: String { fingerprints.sorted().joined(separator: ",") }

    /// Reads a metadata value; nil when it is not one (an entry that is not 64 hex digits, or too
    /// many): a CA's answer is not trusted to be well-formed.
    public init?(metadataValue: String) {
        let entries = metadataValue.split(separator: ",", omittingEmptySubsequences: true).map { $0.lowercased() }
        guard entries.count <= Self.maximumCount,
            entries.allSatisfy({ $0.count == 64 && $0.allSatisfy { $0.isHexDigit } })
        else { return nil }
        self.init(fingerprints: Set(entries))
    }

    /// Reads `tainted-certs.pem` and checks that every certificate in it belongs to this CA's
    /// hierarchy: one of `roots`, or a CA certificate signed by one of them or by another
    /// certificate of the file or of `intermediates` (an intermediate already rotated out
    /// still chains to the root). A certificate of another PKI is refused: tainting it would do
    /// nothing, so it is a mistake worth a line.
    public static func load(pem: String, roots: [Certificate], intermediates: [Certificate]) throws(TaintError) -> [Certificate] {
        guard let certificates = PEMCertificates.parse(pem) else {
            throw TaintError("not PEM certificates (truncated or malformed)")
        }
        guard certificates.count <= maximumCount else {
            throw TaintError("\(certificates.count) certificates; at most \(maximumCount)")
        }
        let known = roots + intermediates + certificates
        for certificate in certificates where !roots.contains(certificate) {
            let signedByKnown = known.contains { issuer in
                issuer != certificate && issuer.subject == certificate.issuer
                    && issuer.publicKey.isValidSignature(certificate.signature, for: certificate)
            }
            guard signedByKnown, Self.isCA(certificate) else {
                throw TaintError("\(certificate.subject) (serial \(certificate.serialNumber.hexString)) is not a CA certificate of this hierarchy")
            }
        }
        return certificates
    }

    private static func isCA(_ certificate: Certificate) -> Bool {
        if case .isCertificateAuthority = try? certificate.extensions.basicConstraints { return true }
        return false
    }
}

/// What `ca serve` says in the metadata of every answer, refusals included, beside the CSR API's
/// own fields: what is tainted (``TaintedCertificates/metadataKey``) and the roots trusted now,
/// so an agent's periodic probe learns both before any CSR of it is due.
public enum CAAnnouncement {
    /// Every trusted root, DER, one value each.
    public static let rootsKey = "x-sds-agent-roots-bin"
    /// At most this many roots are sent (and taken).
    public static let maximumRoots = 8
    /// The revocation lists served now (`ca-crl.pem`), DER, one value each: agents in upstream
    /// mode serve them in their validation contexts as an agent with the directory would.
    public static let revocationKey = "x-sds-agent-crl-bin"
    /// At most this many lists are taken.
    public static let maximumRevocationLists = 8
    /// Lists larger than this in all (DER) are not announced: an answer's metadata travels in
    /// HTTP/2 headers (base64, a third larger), whose size peers bound (16 KiB by default).
    public static let maximumRevocationBytes = 8192
}

/// Why a taint file was not taken, in words.
public struct TaintError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
