import Crypto
import Foundation
import SDSModel
import SecretCache
import SwiftASN1
import TestSupport
import Testing
import X509
import _CryptoExtras
import CertificateAuthority

/// What operators bring: key types, CAs that must be checked before they are trusted, Istio's
/// cacerts layout and changes to it.
@Suite struct CAOperatorTests {
    @Test(arguments: KeyType.allCases)
    func everyKeyTypeMakesACSRTheCASignsAndTheTypeIsRecognised(_ type: KeyType) async throws {
        let key = try KeyFactory.generate(type)
        #expect(KeyType(of: key.publicKey) == type)
        let csr = try KeyFactory.makeCSR(for: TestPKI.identity(), key: key)
        #expect(CSRPolicy.evaluate(csr, for: TestPKI.identity()) == nil)
        let chain = try await TestPKI.ca().issue(csr: csr, for: TestPKI.identity(), ttl: .seconds(600))
        #expect(chain[0].publicKey == key.publicKey)
        #expect(try KeyFactory.pem(of: key).contains("PRIVATE KEY-----"))
    }

    @Test func anRSARootSignsP256LeavesAndAP384RootSignsRSALeaves() async throws {
        for (rootType, leafType) in [(KeyType.rsa2048, KeyType.ecP256), (.ecP384, .rsa2048)] {
            let root = try SigningAuthority.makeSelfSignedRoot(trustDomain: "cluster.local", ttl: .seconds(3600), now: Date(), keyType: rootType)
            let ca = EmbeddedCA(authority: root, trustDomain: "cluster.local", logger: TestPKI.quietLogger)
            let key = try KeyFactory.generate(leafType)
            let chain = try await ca.issue(csr: try KeyFactory.makeCSR(for: TestPKI.identity(), key: key), for: TestPKI.identity(), ttl: .seconds(600))
            #expect(KeyType(of: chain[0].publicKey) == leafType)
            // The signature algorithm follows the CA key.
            #expect(rootType == .rsa2048 ? chain[0].signatureAlgorithm == .sha256WithRSAEncryption : chain[0].signatureAlgorithm == .ecdsaWithSHA384)
        }
    }

    @Test func ourPEMIsByteForByteSwiftASN1sForEveryLengthAndForCertificatesCSRsAndKeys() async throws {
        for length in 1..<200 {
            let der = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ length) }
            #expect(PEM.encode(der, label: "CERTIFICATE") == PEMDocument(type: "CERTIFICATE", derBytes: der).pemString + "\n")
        }
        let (key, pem) = try KeyFactory.generateWithPEM(.ecP256)
        #expect(pem == (try KeyFactory.pem(of: key)))
        #expect(try Certificate.PrivateKey(pemEncoded: pem).publicKey == key.publicKey)
        let csr = try KeyFactory.makeCSR(for: TestPKI.identity(), key: key)
        #expect(try csr.pem() == csr.serializeAsPEM().pemString + "\n")
        let chain = try await TestPKI.ca().issue(csr: csr, for: TestPKI.identity(), ttl: .seconds(600))
        for certificate in chain {
            #expect(try certificate.pem() == certificate.serializeAsPEM().pemString + "\n")
        }
        let (rsa, rsaPEM) = try KeyFactory.generateWithPEM(.rsa2048)
        #expect(rsaPEM == (try KeyFactory.pem(of: rsa)))
    }

    @Test func p256KeysFromRawScalarsAreDistinctValidAndTheirPublicPointIsTheirs() throws {
        var seen = Set<Data>()
        for _ in 0..<64 {
            let key = KeyFactory.p256()
            #expect(seen.insert(key.rawRepresentation).inserted)
            // The public point is the scalar's: BoringSSL recomputes it from the raw scalar and agrees.
            let again = try P256.Signing.PrivateKey(rawRepresentation: key.rawRepresentation)
            #expect(again.publicKey.rawRepresentation == key.publicKey.rawRepresentation)
            let message = Data("proof of possession".utf8)
            #expect(key.publicKey.isValidSignature(try key.signature(for: message), for: message))
        }
        // Scalars BoringSSL must refuse, so that the loop in `p256()` draws again: 0 and the group order.
        #expect(throws: (any Error).self) { try P256.Signing.PrivateKey(rawRepresentation: Data(count: 32)) }
        let hex = Array("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551")
        let order = Data(stride(from: 0, to: hex.count, by: 2).map { UInt8(String(hex[$0...$0 + 1]), radix: 16)! })
        #expect(throws: (any Error).self) { try P256.Signing.PrivateKey(rawRepresentation: order) }
    }

    @Test func aKeyTypeTheCADoesNotSignIsRefused() throws {
        let key = Certificate.PrivateKey(P521.Signing.PrivateKey())
        let csr = try KeyFactory.makeCSR(for: TestPKI.identity(), key: key)
        #expect(CSRPolicy.evaluate(csr, for: TestPKI.identity())?.contains("not one this CA signs") == true)
    }

    // MARK: - Checked before trusted

    func write(_ certificates: [Certificate], _ path: String) throws {
        try certificates.map { try $0.serializeAsPEM().pemString }.joined(separator: "\n").write(toFile: path, atomically: true, encoding: .utf8)
    }

    func certificate(
        key: Certificate.PrivateKey, issuer: SigningAuthority?, isCA: Bool, keyCertSign: Bool, notBefore: Date, notAfter: Date
    ) throws -> Certificate {
        let name = try DistinguishedName { CommonName("test CA \(UUID().uuidString.prefix(6))") }
        let extensions = try Certificate.Extensions {
            Critical(isCA ? BasicConstraints.isCertificateAuthority(maxPathLength: nil) : BasicConstraints.notCertificateAuthority)
            Critical(KeyUsage(digitalSignature: true, keyCertSign: keyCertSign))
        }
        return try Certificate(
            version: .v3, serialNumber: .init(), publicKey: key.publicKey, notValidBefore: notBefore, notValidAfter: notAfter,
            issuer: issuer?.certificate.subject ?? name, subject: name, extensions: extensions,
            issuerPrivateKey: issuer?.privateKey ?? key)
    }

    @Test func aCAThatCannotSignIsRefusedAtLoadNamingTheFile() throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let now = Date()
        let key = try KeyFactory.generate(.ecP256)
        try TestPKI.writeKey(key, to: dir + "/key.pem")
        let cases: [(String, Certificate, String)] = [
            ("expired", try certificate(key: key, issuer: nil, isCA: true, keyCertSign: true, notBefore: now - 7200, notAfter: now - 60), "expired"),
            ("not yet valid", try certificate(key: key, issuer: nil, isCA: true, keyCertSign: true, notBefore: now + 3600, notAfter: now + 7200), "not valid before"),
            ("not a CA", try certificate(key: key, issuer: nil, isCA: false, keyCertSign: true, notBefore: now - 60, notAfter: now + 3600), "not a CA"),
            ("no keyCertSign", try certificate(key: key, issuer: nil, isCA: true, keyCertSign: false, notBefore: now - 60, notAfter: now + 3600), "keyCertSign"),
        ]
        for (what, cert, says) in cases {
            try write([cert], dir + "/\(what).pem")
            do {
                _ = try RootCAStore.load(certificateFile: dir + "/\(what).pem", keyFile: dir + "/key.pem")
                Issue.record("accepted a CA that is \(what)")
            } catch {
                #expect(error.message.contains(says) && error.message.contains("\(what).pem"), "\(what): \(error)")
            }
        }
        // An intermediate that does not chain to the named root.
        let root = TestPKI.authority()
        let intermediate = TestPKI.intermediate(under: root)
        try write([intermediate.certificate], dir + "/int.pem")
        try TestPKI.writeKey(intermediate.privateKey, to: dir + "/int-key.pem")
        try write([TestPKI.authority().certificate], dir + "/other-root.pem")
        #expect(throws: CAStoreError.self) {
            try RootCAStore.load(certificateFile: dir + "/int.pem", keyFile: dir + "/int-key.pem", bundleFile: dir + "/other-root.pem")
        }
        // A key every user can read.
        try intermediate.privateKey.serializeAsPEM().pemString.write(toFile: dir + "/open-key.pem", atomically: true, encoding: .utf8)
        chmod(dir + "/open-key.pem", 0o644)
        do {
            _ = try RootCAStore.load(certificateFile: dir + "/int.pem", keyFile: dir + "/open-key.pem")
            Issue.record("accepted a world-readable key")
        } catch {
            #expect(error.message.contains("readable by every user"))
        }
    }

    // MARK: - cacerts

    func writeCACerts(_ authority: SigningAuthority, root: SigningAuthority, in dir: String) throws {
        try write([authority.certificate], dir + "/ca-cert.pem")
        try TestPKI.writeKey(authority.privateKey, to: dir + "/ca-key.pem")
        try write([authority.certificate, root.certificate], dir + "/cert-chain.pem")  // as Istio writes it
        try write([root.certificate], dir + "/root-cert.pem")
    }

    @Test func istiosCACertsLayoutLoadsWithoutServingAnythingTwice() async throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let root = TestPKI.authority()
        let intermediate = TestPKI.intermediate(under: root)
        try writeCACerts(intermediate, root: root, in: dir)
        let loaded = try RootCAStore.load(caDirectory: dir)
        #expect(loaded.certificate == intermediate.certificate && loaded.roots == [root.certificate] && loaded.intermediates.isEmpty)
        #expect(loaded.chainAboveLeaf == [intermediate.certificate])
        try "not a key".write(toFile: dir + "/ca-key.pem", atomically: true, encoding: .utf8)
        chmod(dir + "/ca-key.pem", 0o600)
        do {
            _ = try RootCAStore.load(caDirectory: dir)
            Issue.record("loaded a broken key")
        } catch {
            #expect(error.message.contains("ca-key.pem"))
        }
    }

    final class Changes: @unchecked Sendable {
        var seen: [IssuerChange] = []
    }

    @Test func aNewIntermediateSignsAtOnceAndANewRootIsPublishedFirst() async throws {
        let root = TestPKI.authority()
        let first = TestPKI.intermediate(under: root)
        let changes = Changes()
        let ca = EmbeddedCA(authority: first, trustDomain: "cluster.local", logger: TestPKI.quietLogger, onChange: { change, _ in changes.seen.append(change) })
        let second = TestPKI.intermediate(under: root)
        ca.replaceSigner(with: second)
        #expect(ca.activeCertificate == second.certificate && ca.roots == [root.certificate])
        #expect(changes.seen == [.signerChanged])
        let newRoot = TestPKI.authority()
        let third = TestPKI.intermediate(under: newRoot)
        ca.prepare(third)
        #expect(Set(ca.roots) == [root.certificate, newRoot.certificate], "both roots are served before the new one signs")
        #expect(ca.activeCertificate == second.certificate)
        #expect(ca.activatePrepared())
        #expect(ca.activeCertificate == third.certificate && ca.roots.contains(root.certificate), "the old root stays until its leaves expire")
        #expect(changes.seen == [.signerChanged, .bundleChanged, .signerChanged])
    }
}
