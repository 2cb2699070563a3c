import FoundationEssentials
import SDSModel
import SwiftASN1
import X509

/// An X.509 certificate revocation list (RFC 5280 §5.1), read as far as the agent needs it: who
/// issued it, when, which serials it revokes, and whether a given CA signed it. swift-certificates
/// has no CRL type; this reads the DER with swift-asn1 and checks the signature with the CA's
/// public key (swift-certificates' own signature check).
public struct RevocationList: Sendable, Hashable {
    /// The whole CRL, as it is served.
    public let der: [UInt8]
    public let issuer: DistinguishedName
    public let thisUpdate: Date
    public let nextUpdate: Date?
    /// The revoked serial numbers, as big-endian bytes without leading zeros.
    public let revokedSerials: Set<[UInt8]>
    private let signedBytes: [UInt8]
    private let signatureAlgorithm: Certificate.SignatureAlgorithm?
    private let signature: [UInt8]

    /// Reads one DER-encoded CRL.
    public init(derEncoded der: [UInt8]) throws(RevocationListError) {
        do {
            let parsed = try Self.parse(der)
            (issuer, thisUpdate, nextUpdate, revokedSerials, signedBytes, signatureAlgorithm, signature) = parsed
        } catch let error as RevocationListError {
            throw error
        } catch {
            throw RevocationListError("not a DER certificate revocation list: \(error)")
        }
        self.der = der
    }

    /// Every `X509 CRL` PEM block of `pem` (at least one); anything else in between is ignored.
    public static func parseAll(pem: String) throws(RevocationListError) -> [RevocationList] {
        let documents: [PEMDocument]
        do {
            documents = try PEMDocument.parseMultiple(pemString: pem)
        } catch {
            throw RevocationListError("not PEM: \(error)")
        }
        let lists = documents.filter { $0.discriminator == "X509 CRL" }
        guard !lists.isEmpty else { throw RevocationListError("holds no X509 CRL block") }
        var parsed: [RevocationList] = []
        for document in lists { parsed.append(try RevocationList(derEncoded: document.derBytes)) }
        return parsed
    }

    /// PEM, as Envoy reads it.
    public var pem: String { PEMDocument(type: "X509 CRL", derBytes: der).pemString + "\n" }

    /// Whether `ca` issued it: the same name, and its key verifies the signature.
    public func isSigned(by ca: Certificate) -> Bool {
        guard ca.subject == issuer, let signatureAlgorithm else { return false }
        return ca.publicKey.isValidSignature(signature, for: signedBytes, signatureAlgorithm: signatureAlgorithm)
    }

    /// Whether it revokes `certificate` (same issuer, serial listed).
    public func revokes(_ certificate: Certificate) -> Bool {
        certificate.issuer == issuer && revokedSerials.contains(Self.normalized(Array(certificate.serialNumber.bytes)))
    }

    // MARK: - DER

    private typealias Parsed = (
        DistinguishedName, Date, Date?, Set<[UInt8]>, [UInt8], Certificate.SignatureAlgorithm?, [UInt8]
    )

    /// CertificateList ::= SEQUENCE { tbsCertList, signatureAlgorithm, signatureValue BIT STRING }
    private static func parse(_ der: [UInt8]) throws -> Parsed {
        let root = try DER.parse(der)
        return try DER.sequence(root, identifier: .sequence) { nodes in
            guard let tbs = nodes.next(), let algorithm = nodes.next(), let value = nodes.next() else {
                throw RevocationListError("a CRL is three elements: the list, the algorithm, the signature")
            }
            let outer = try Self.algorithm(algorithm)
            let signature = try ASN1BitString(derEncoded: value)
            let (inner, issuer, thisUpdate, nextUpdate, revoked) = try Self.tbsCertList(tbs)
            guard inner == outer else { throw RevocationListError("the signature algorithm differs inside and outside the list") }
            return (issuer, thisUpdate, nextUpdate, revoked, Array(tbs.encodedBytes), Self.signatureAlgorithm(outer), Array(signature.bytes))
        }
    }

    /// TBSCertList ::= SEQUENCE { version INTEGER OPTIONAL, signature AlgorithmIdentifier, issuer
    /// Name, thisUpdate Time, nextUpdate Time OPTIONAL, revokedCertificates SEQUENCE OF … OPTIONAL,
    /// crlExtensions [0] EXPLICIT Extensions OPTIONAL }
    private static func tbsCertList(_ node: ASN1Node) throws -> (String, DistinguishedName, Date, Date?, Set<[UInt8]>) {
        try DER.sequence(node, identifier: .sequence) { nodes in
            var all: [ASN1Node] = []
            while let next = nodes.next() { all.append(next) }
            var index = 0
            if all.first?.identifier == .integer {
                let version = try Int(derEncoded: all[0])
                guard version == 1 else { throw RevocationListError("version \(version + 1) is not a v2 CRL") }
                index = 1
            }
            guard all.count >= index + 3 else { throw RevocationListError("the list is missing its issuer or thisUpdate") }
            let algorithm = try Self.algorithm(all[index])
            let issuer = try DistinguishedName(derEncoded: all[index + 1])
            let thisUpdate = try Self.time(all[index + 2])
            index += 3
            var nextUpdate: Date?
            if index < all.count, [.utcTime, .generalizedTime].contains(all[index].identifier) {
                nextUpdate = try Self.time(all[index])
                index += 1
            }
            var revoked = Set<[UInt8]>()
            if index < all.count, all[index].identifier == .sequence {
                revoked = try Self.revokedSerials(all[index])
                index += 1
            }
            // What may follow is the extensions ([0]); nothing else.
            guard index == all.count || (index == all.count - 1 && all[index].identifier == ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific)) else {
                throw RevocationListError("unexpected elements after the revoked certificates")
            }
            return (algorithm, issuer, thisUpdate, nextUpdate, revoked)
        }
    }

    private static func revokedSerials(_ node: ASN1Node) throws -> Set<[UInt8]> {
        var serials = Set<[UInt8]>()
        try DER.sequence(node, identifier: .sequence) { entries in
            while let entry = entries.next() {
                try DER.sequence(entry, identifier: .sequence) { fields in
                    guard let serial = fields.next(), let date = fields.next() else {
                        throw RevocationListError("a revoked entry needs a serial and a date")
                    }
                    _ = try Self.time(date)
                    while fields.next() != nil {}
                    serials.insert(Self.normalized(Array(try ArraySlice<UInt8>(derEncoded: serial))))
                }
            }
        }
        return serials
    }

    /// AlgorithmIdentifier's OID, dotted.
    private static func algorithm(_ node: ASN1Node) throws -> String {
        try DER.sequence(node, identifier: .sequence) { fields in
            guard let oid = fields.next() else { throw RevocationListError("an algorithm identifier with no OID") }
            while fields.next() != nil {}
            return try ASN1ObjectIdentifier(derEncoded: oid).description
        }
    }

    /// The signature algorithms the agent's CAs sign with.
    private static func signatureAlgorithm(_ oid: String) -> Certificate.SignatureAlgorithm? {
        switch oid {
        case "1.2.840.10045.4.3.2": .ecdsaWithSHA256
        case "1.2.840.10045.4.3.3": .ecdsaWithSHA384
        case "1.2.840.10045.4.3.4": .ecdsaWithSHA512
        case "1.2.840.113549.1.1.11": .sha256WithRSAEncryption
        case "1.2.840.113549.1.1.12": .sha384WithRSAEncryption
        case "1.2.840.113549.1.1.13": .sha512WithRSAEncryption
        case "1.3.101.112": .ed25519
        default: nil
        }
    }

    /// UTCTime or GeneralizedTime, as a date (UTC).
    private static func time(_ node: ASN1Node) throws -> Date {
        let parts: (year: Int, month: Int, day: Int, hours: Int, minutes: Int, seconds: Int)
        switch node.identifier {
        case .utcTime:
            let time = try UTCTime(derEncoded: node)
            parts = (time.year, time.month, time.day, time.hours, time.minutes, time.seconds)
        case .generalizedTime:
            let time = try GeneralizedTime(derEncoded: node)
            parts = (time.year, time.month, time.day, time.hours, time.minutes, time.seconds)
        default:
            throw RevocationListError("a time that is neither UTCTime nor GeneralizedTime")
        }
        // Days from the civil date (Howard Hinnant's algorithm), no calendar needed.
        let y = parts.month <= 2 ? parts.year - 1 : parts.year
        let era = (y >= 0 ? y : y - 399) / 400
        let yearOfEra = y - era * 400
        let dayOfYear = (153 * (parts.month + (parts.month > 2 ? -3 : 9)) + 2) / 5 + parts.day - 1
        let dayOfEra = yearOfEra * 365 + yearOfEra / 4 - yearOfEra / 100 + dayOfYear
        let days = era * 146097 + dayOfEra - 719468
        return Date(timeIntervalSince1970: TimeInterval(days * 86400 + parts.hours * 3600 + parts.minutes * 60 + parts.seconds))
    }

    static func normalized(_ serial: [UInt8]) -> [UInt8] {
        let trimmed = serial.drop { $0 == 0 }
        return trimmed.isEmpty ? [0] : Array(trimmed)
    }

    public static func == (lhs: RevocationList, rhs: RevocationList) -> Bool { lhs.der == rhs.der }
    public func hash(into hasher: inout Hasher) { hasher.combine(der) }
}

/// Why a CRL was not taken, in words.
public struct RevocationListError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The CRLs in force for a CA hierarchy, as validation contexts carry them.
///
/// Envoy checks every CA of a peer's chain against a CRL by default, and then needs a CRL from
/// each issuer in the chain: with only the intermediate's CRL, every peer would be refused,
/// revoked or not (Envoy's `only_verify_leaf_cert_crl`, envoy#18289). So ``onlyLeaf`` is set
/// when not every CA that issues a certificate of the chain has a list; and a set without the
/// signing CA's own list (the leaves' issuer) is refused, since even the leaf-only check needs it.
public struct RevocationLists: Sendable, Hashable {
    public let lists: [RevocationList]
    /// `only_verify_leaf_cert_crl`.
    public let onlyLeaf: Bool

    /// The lists' PEM, in issuer order as read.
    public var pem: String { lists.map(\.pem).joined() }

    /// Checks `candidates` before they are served: each signed by a CA of `authority`'s hierarchy,
    /// one per issuer, none older than the list in force for its issuer (`current`), none past
    /// its `nextUpdate` at `now` (Envoy would refuse every peer), and one from the signing CA.
    public static func accept(
        _ candidates: [RevocationList], for authority: SigningAuthority, current: RevocationLists?, now: Date
    ) throws(RevocationListError) -> RevocationLists {
        let hierarchy = [authority.certificate] + authority.intermediates + authority.roots
        var seen = Set<DistinguishedName>()
        for list in candidates {
            guard hierarchy.contains(where: { list.isSigned(by: $0) }) else {
                throw RevocationListError("the CRL of \(list.issuer) is not signed by a CA of this hierarchy")
            }
            guard seen.insert(list.issuer).inserted else { throw RevocationListError("two CRLs of \(list.issuer)") }
            if let nextUpdate = list.nextUpdate, nextUpdate < now {
                throw RevocationListError("the CRL of \(list.issuer) expired at \(nextUpdate.formatted(.iso8601)) (nextUpdate): Envoy would refuse every peer")
            }
            if let inForce = current?.lists.first(where: { $0.issuer == list.issuer }), list.thisUpdate < inForce.thisUpdate {
                throw RevocationListError(
                    "the CRL of \(list.issuer) (thisUpdate \(list.thisUpdate.formatted(.iso8601))) is older than the one in force (\(inForce.thisUpdate.formatted(.iso8601)))")
            }
        }
        guard let accepted = served(candidates, for: authority) else {
            throw RevocationListError(
                "no CRL from the signing CA \(authority.certificate.subject): Envoy needs one from the leaves' issuer, or it refuses every peer")
        }
        return accepted
    }

    /// `lists` as served for a chain under `authority` (which may have changed since they were
    /// accepted): nil when the signing CA has no list among them (withheld: Envoy would refuse
    /// every peer), else with ``onlyLeaf`` set when a CA above the leaf's issuer has none.
    public static func served(_ lists: [RevocationList], for authority: SigningAuthority) -> RevocationLists? {
        served(lists, leafIssuer: authority.certificate.subject, chainAboveLeaf: authority.chainAboveLeaf)
    }

    /// The same, for a chain known only by what was served: the leaf's issuer and the
    /// certificates above the leaf that are not roots (an upstream CA's answer).
    public static func served(_ lists: [RevocationList], leafIssuer: DistinguishedName, chainAboveLeaf: [Certificate]) -> RevocationLists? {
        let issuers = Set(lists.map(\.issuer))
        guard issuers.contains(leafIssuer) else { return nil }
        // The issuers of the certificates in a workload's chain: the signing CA (of the leaf) and
        // the issuer of each certificate above it that is not a root.
        let needed = Set([leafIssuer] + chainAboveLeaf.map(\.issuer))
        return RevocationLists(lists: lists, onlyLeaf: !needed.isSubset(of: issuers))
    }

    init(lists: [RevocationList], onlyLeaf: Bool) {
        self.lists = lists
        self.onlyLeaf = onlyLeaf
    }
}
