import CertificateAuthority
import Crypto
import Foundation
import SDSModel
import TestSupport
import Testing
import X509

/// Forced rotation of a compromised key (issue 24): what the CA does with a taint.
@Suite struct TaintTests {
    func csr() throws -> CertificateSigningRequest {
        let extensions = try Certificate.Extensions { SubjectAlternativeNames([.uniformResourceIdentifier(TestPKI.identity().description)]) }
        return try CertificateSigningRequest(
            version: .v1, subject: DistinguishedName(), privateKey: Certificate.PrivateKey(P256.Signing.PrivateKey()),
            attributes: .init([.init(ExtensionRequest(extensions: extensions))]))
    }

    @Test func aTaintedIntermediateWithNoReplacementIsARefusalNotSilentIssuance() async throws {
        let root = TestPKI.authority()
        let intermediate = TestPKI.intermediate(under: root)
        let ca = EmbeddedCA(authority: intermediate, trustDomain: TestPKI.trustDomain, logger: TestPKI.quietLogger)
        let before = try await ca.issue(csr: csr(), for: TestPKI.identity(), ttl: .seconds(600), credential: nil)
        #expect(!ca.signerIsTainted)

        #expect(ca.taint([intermediate.certificate]))
        #expect(!ca.taint([intermediate.certificate]), "the same set again is no change")
        #expect(ca.signerIsTainted)
        let request = try csr()
        let refusal = await #expect(throws: IssuanceError.self) {
            _ = try await ca.issue(csr: request, for: TestPKI.identity(), ttl: .seconds(600), credential: nil)
        }
        #expect(refusal?.code == .unavailable && refusal?.message.contains("tainted") == true)
        // The leaf issued before chains through the tainted intermediate.
        #expect(ca.tainted.affects(chain: before, roots: ca.roots))

        // The operator puts a new intermediate in the directory: it signs, and its leaves are clean.
        let replacement = TestPKI.intermediate(under: root)
        ca.replaceSigner(with: replacement)
        #expect(!ca.signerIsTainted)
        let after = try await ca.issue(csr: csr(), for: TestPKI.identity(), ttl: .seconds(600), credential: nil)
        #expect(!ca.tainted.affects(chain: after, roots: ca.roots))
        #expect(ca.tainted.affects(chain: before, roots: ca.roots))

        #expect(ca.taint([]) && !ca.signerIsTainted, "a removed file clears the taint")
    }

    @Test func aTaintedRootWithAPreparedReplacementStopsSigningAtOnceAndLeavesTheBundleWhenDropped() async throws {
        let old = TestPKI.authority()
        let ca = EmbeddedCA(authority: old, trustDomain: TestPKI.trustDomain, logger: TestPKI.quietLogger)
        let oldLeaf = try await ca.issue(csr: csr(), for: TestPKI.identity(), ttl: .seconds(600), credential: nil)
        let next = try ca.prepareRotation(ttl: .seconds(86400))
        #expect(!ca.dropTaintedRoots(), "nothing tainted: nothing to drop")

        ca.taint([old.certificate])
        #expect(ca.activeCertificate == next, "the clean prepared root signs at once, not after the delay")
        #expect(ca.tainted.affects(chain: oldLeaf, roots: ca.roots))
        let newLeaf = try await ca.issue(csr: csr(), for: TestPKI.identity(), ttl: .seconds(600), credential: nil)
        #expect(!ca.tainted.affects(chain: newLeaf, roots: ca.roots))
        #expect(Set(ca.roots) == [old.certificate, next], "kept while leaves may chain to it")

        #expect(ca.dropTaintedRoots())
        #expect(ca.roots == [next])
    }

    @Test func aTaintFileMayNameOnlyCACertificatesOfThisHierarchy() throws {
        let root = TestPKI.authority()
        let current = TestPKI.intermediate(under: root)
        let rotatedOut = TestPKI.intermediate(under: root)
        let stranger = TestPKI.intermediate(under: TestPKI.authority())
        let pem = { (certificates: [Certificate]) in certificates.map { try! $0.pem() }.joined() }
        let loaded = try TaintedCertificates.load(
            pem: pem([rotatedOut.certificate, root.certificate]), roots: root.roots, intermediates: [current.certificate])
        #expect(loaded.count == 2)
        #expect(throws: TaintError.self) {
            try TaintedCertificates.load(pem: pem([stranger.certificate]), roots: root.roots, intermediates: [current.certificate])
        }
        #expect(throws: TaintError.self) {
            try TaintedCertificates.load(pem: "-----BEGIN CERTIFICATE-----\ntruncated", roots: root.roots, intermediates: [])
        }
    }

    @Test func theMetadataValueRoundTripsAndAMalformedOneIsIgnored() {
        let root = TestPKI.authority()
        let tainted = TaintedCertificates([root.certificate, TestPKI.intermediate(under: root).certificate])
        #expect(TaintedCertificates(metadataValue: tainted.metadataValue) == tainted)
        #expect(TaintedCertificates(metadataValue: "")?.isEmpty == true)
        #expect(TaintedCertificates(metadataValue: "zz") == nil)
        #expect(TaintedCertificates(metadataValue: String(repeating: String(repeating: "a", count: 64) + ",", count: 65)) == nil)
    }
}
