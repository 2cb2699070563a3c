import CertificateAuthority
import Crypto
import Foundation
import SDSModel
import TestSupport
import Testing
import X509

/// The profile every certificate the project makes keeps (docs/Architecture.md, "Certificate
/// profile"): each kind is made here and checked field by field.
@Suite struct CertificateProfileTests {
    /// RFC 5280 4.1.2.2: positive, at most 20 octets. swift-certificates' default made 21 octets
    /// for about half of all serials.
    func expectRFC5280Serial(_ serial: Certificate.SerialNumber, _ what: String) {
        #expect(serial.bytes.count <= 20, "\(what): \(serial.bytes.count) octets")
        #expect((serial.bytes.first ?? 0) & 0x80 == 0, "\(what): negative")
        #expect(serial.bytes.contains { $0 != 0 }, "\(what): zero")
    }

    @Test func serialsArePositiveAndAtMostTwentyOctets() {
        var seen = Set<Certificate.SerialNumber>()
        for _ in 0..<2000 {
            let serial = CertificateProfile.serialNumber()
            expectRFC5280Serial(serial, "serial")
            seen.insert(serial)
        }
        #expect(seen.count == 2000)
    }

    func expectLeafProfile(_ leaf: Certificate, keyType: KeyType, what: String) throws {
        expectRFC5280Serial(leaf.serialNumber, what)
        #expect(try leaf.extensions.basicConstraints == .notCertificateAuthority, "\(what)")
        let usage = try #require(try leaf.extensions.keyUsage)
        #expect(usage.digitalSignature && !usage.keyCertSign && !usage.cRLSign, "\(what)")
        // RFC 5280 4.2.1.3: keyEncipherment only where the key can encipher (RSA).
        #expect(usage.keyEncipherment == keyType.isRSA, "\(what): keyEncipherment \(usage.keyEncipherment)")
        #expect(leaf.extensions[oid: .X509ExtensionID.keyUsage]?.critical == true, "\(what)")
    }

    @Test(arguments: KeyType.allCases) func workloadLeavesOfEveryKeyType(_ keyType: KeyType) async throws {
        let ca = TestPKI.ca()
        let identity = TestPKI.identity()
        let key = try KeyFactory.generate(keyType)
        let csr = try KeyFactory.makeCSR(for: identity, key: key)
        // `serve` (strict CSR rules) and `ca serve` (key only, as istiod): the same profile.
        for rules in [EmbeddedCA.CSRRules.strict, .keyOnly] {
            let leaf = try await ca.issue(csr: csr, for: identity, ttl: .seconds(600), csrRules: rules)[0]
            try expectLeafProfile(leaf, keyType: keyType, what: "\(keyType) leaf, \(rules)")
            let eku = try #require(try leaf.extensions.extendedKeyUsage)
            #expect(Set(eku) == [.serverAuth, .clientAuth])
        }
    }

    @Test(arguments: [KeyType.ecP256, .ecP384, .rsa2048]) func generatedRoots(_ keyType: KeyType) throws {
        let root = try SigningAuthority.makeSelfSignedRoot(trustDomain: "cluster.local", ttl: .seconds(86400), now: Date(), keyType: keyType)
        expectRFC5280Serial(root.certificate.serialNumber, "root")
        let usage = try #require(try root.certificate.extensions.keyUsage)
        #expect(usage.keyCertSign && usage.cRLSign && !usage.keyEncipherment)
        guard case .isCertificateAuthority = try root.certificate.extensions.basicConstraints else {
            Issue.record("a root that is not a CA")
            return
        }
    }

    @Test func servingCertificates() throws {
        let (chain, _) = try TestPKI.authority().issueServingCertificate(names: ["127.0.0.1", "ca.example"], ttl: .seconds(600), now: Date())
        try expectLeafProfile(chain[0], keyType: .ecP256, what: "serving certificate")
        #expect(try chain[0].extensions.extendedKeyUsage.map(Array.init) == [.serverAuth])
    }

    /// An intermediate that outlives its root: leaves were clamped to the intermediate only and
    /// outlived the root by ~21 h.
    @Test func aLeafNeverOutlivesAnyCertificateOfItsChain() async throws {
        let now = Date()
        let root = TestPKI.authority(now: now, ttl: .seconds(86400))
        let intermediate = TestPKI.intermediate(under: root, now: now)
        #expect(intermediate.certificate.notValidAfter > root.certificate.notValidAfter, "the fixture outlives its root")
        #expect(CertificateProfile.outlivesRoot(intermediate) != nil, "warned at start")
        #expect(CertificateProfile.outlivesRoot(root) == nil)
        let ca = EmbeddedCA(authority: intermediate, trustDomain: TestPKI.trustDomain, logger: TestPKI.quietLogger, now: { now })
        let identity = TestPKI.identity()
        let csr = try KeyFactory.makeCSR(for: identity, key: KeyFactory.generate(.ecP256))
        let leaf = try await ca.issue(csr: csr, for: identity, ttl: .seconds(3 * 86400), credential: nil)[0]
        #expect(leaf.notValidAfter <= root.certificate.notValidAfter)
        let (serving, _) = try intermediate.issueServingCertificate(names: ["ca.example"], ttl: .seconds(3 * 86400), now: now)
        #expect(serving[0].notValidAfter <= root.certificate.notValidAfter)
    }
}
