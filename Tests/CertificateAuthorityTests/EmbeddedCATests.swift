import CertificateAuthority
import Crypto
import Foundation
import SDSModel
import SwiftASN1
import TestSupport
import Testing
import X509

@Suite struct EmbeddedCATests {
    let identity = TestPKI.identity()

    func csr(
        key: P256.Signing.PrivateKey = P256.Signing.PrivateKey(), subject: DistinguishedName = DistinguishedName(),
        sans: [GeneralName]? = nil
    ) throws -> CertificateSigningRequest {
        let names = sans ?? [.uniformResourceIdentifier(identity.description)]
        let extensions = try Certificate.Extensions { SubjectAlternativeNames(names) }
        let attributes = try CertificateSigningRequest.Attributes([.init(ExtensionRequest(extensions: extensions))])
        return try CertificateSigningRequest(
            version: .v1, subject: subject, privateKey: Certificate.PrivateKey(key), attributes: attributes)
    }

    @Test func issuesAnX509SVIDForTheCaller() async throws {
        let now = Date()
        let ca = TestPKI.ca(now: { now })
        let chain = try await ca.issue(csr: csr(), for: identity, ttl: .seconds(3600))
        let leaf = try #require(chain.first)
        #expect(chain.count == 1)
        #expect(leaf.subject.isEmpty)
        let san = try #require(try leaf.extensions.subjectAlternativeNames)
        #expect(Array(san) == [.uniformResourceIdentifier("spiffe://cluster.local/ns/demo/sa/frontend")])
        #expect(leaf.extensions[oid: .X509ExtensionID.subjectAlternativeName]?.critical == true)
        let usage = try #require(try leaf.extensions.keyUsage)
        #expect(usage.digitalSignature && !usage.keyEncipherment && !usage.keyCertSign)
        let eku = try #require(try leaf.extensions.extendedKeyUsage)
        #expect(Set(eku) == [.serverAuth, .clientAuth])
        #expect(try leaf.extensions.basicConstraints == .notCertificateAuthority)
        #expect(abs(leaf.notValidAfter.timeIntervalSince(now) - 3600) < 2)
        #expect(leaf.notValidBefore <= now)
    }

    @Test func serialsAreRandomAndUnique() async throws {
        let ca = TestPKI.ca()
        var serials = Set<String>()
        for _ in 0..<20 {
            let leaf = try await ca.issue(csr: csr(), for: identity, ttl: .seconds(60))[0]
            serials.insert(leaf.serialNumber.hexString)
            #expect(leaf.serialNumber.bytes.count >= 8)
        }
        #expect(serials.count == 20)
    }

    @Test func lifetimeIsCappedByTheCA() async throws {
        let now = Date()
        let ca = EmbeddedCA(
            authority: TestPKI.authority(now: now, ttl: .seconds(600)), trustDomain: TestPKI.trustDomain,
            logger: TestPKI.quietLogger, now: { now })
        let leaf = try await ca.issue(csr: csr(), for: identity, ttl: .seconds(86400))[0]
        // X.509 times have whole seconds.
        #expect(leaf.notValidAfter <= now.addingTimeInterval(601))
        #expect(leaf.notValidAfter < now.addingTimeInterval(3600))
    }

    @Test func identityComesFromTheCallerNotTheCSR() async throws {
        let ca = TestPKI.ca()
        let other = TestPKI.identity("kube-system", "admin")
        await #expect(throws: IssuanceError.self) {
            try await ca.issue(csr: csr(sans: [.uniformResourceIdentifier(other.description)]), for: identity, ttl: .seconds(60))
        }
    }

    @Test(arguments: [
        [GeneralName.dnsName("evil.example")], [.uniformResourceIdentifier("spiffe://cluster.local/ns/demo/sa/frontend"), .dnsName("x")],
        [.rfc822Name("a@b.c")], [.ipAddress(ASN1OctetString(contentBytes: [127, 0, 0, 1]))],
    ])
    func refusesCSRsAskingForOtherNames(_ sans: [GeneralName]) async throws {
        let ca = TestPKI.ca()
        let request = try csr(sans: sans)
        do {
            _ = try await ca.issue(csr: request, for: identity, ttl: .seconds(60))
            Issue.record("issued for \(sans)")
        } catch {
            #expect(error.code == .csrRejected)
        }
    }

    @Test func refusesACSRWithASubject() async throws {
        let ca = TestPKI.ca()
        let subject = try DistinguishedName { CommonName("admin") }
        await #expect(throws: IssuanceError.self) { try await ca.issue(csr: csr(subject: subject), for: identity, ttl: .seconds(60)) }
    }

    @Test func refusesAForgedCSR() async throws {
        // A CSR whose signature was not made by the key it carries: take a valid CSR and flip a bit
        // in the DER of its signature.
        var serializer = DER.Serializer()
        try serializer.serialize(csr())
        var der = serializer.serializedBytes
        der[der.count - 3] ^= 0x01
        let forged = try CertificateSigningRequest(derEncoded: der)
        let ca = TestPKI.ca()
        do {
            _ = try await ca.issue(csr: forged, for: identity, ttl: .seconds(60))
            Issue.record("issued for a forged CSR")
        } catch {
            #expect(error.code == .csrRejected)
            #expect(error.message.contains("signature"))
        }
    }

    @Test func refusesIdentitiesOutsideTheTrustDomain() async throws {
        let ca = TestPKI.ca()
        let foreign = try SPIFFEID(trustDomain: "other.domain", namespace: "demo", serviceAccount: "frontend")
        let request = try csr(sans: [.uniformResourceIdentifier(foreign.description)])
        do {
            _ = try await ca.issue(csr: request, for: foreign, ttl: .seconds(60))
            Issue.record("issued outside the trust domain")
        } catch {
            #expect(error.code == .identityRejected)
        }
    }

    @Test func trustBundleHoldsTheRoot() async throws {
        let authority = TestPKI.authority()
        let ca = EmbeddedCA(authority: authority, trustDomain: TestPKI.trustDomain, logger: TestPKI.quietLogger)
        let bundle = await ca.trustBundle()
        let roots = try PEMDocument.parseMultiple(pemString: bundle.rootsPEM).map { try Certificate(pemDocument: $0) }
        #expect(roots == [authority.certificate])
        #expect(!bundle.version.isEmpty)
    }
}

@Suite struct RootCAStoreTests {
    @Test func generatesPersistsAndReusesTheRoot() throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let first = try RootCAStore.loadOrCreate(
            stateDirectory: dir, trustDomain: "cluster.local", ttl: .seconds(86400), now: Date(), logger: TestPKI.quietLogger)
        let keyAttributes = try FileManager.default.attributesOfItem(atPath: dir + "/ca/root-key.pem")
        #expect((keyAttributes[.posixPermissions] as? Int) == 0o600)
        let dirAttributes = try FileManager.default.attributesOfItem(atPath: dir + "/ca")
        #expect((dirAttributes[.posixPermissions] as? Int) == 0o700)
        let second = try RootCAStore.loadOrCreate(
            stateDirectory: dir, trustDomain: "cluster.local", ttl: .seconds(86400), now: Date(), logger: TestPKI.quietLogger)
        #expect(second.certificate == first.certificate)
        #expect(second.privateKey.publicKey == first.privateKey.publicKey)
    }

    @Test func replacesAnExpiredRoot() throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let old = try RootCAStore.loadOrCreate(
            stateDirectory: dir, trustDomain: "cluster.local", ttl: .seconds(600), now: Date(), logger: TestPKI.quietLogger)
        let later = Date().addingTimeInterval(3600)
        let new = try RootCAStore.loadOrCreate(
            stateDirectory: dir, trustDomain: "cluster.local", ttl: .seconds(86400), now: later, logger: TestPKI.quietLogger)
        #expect(new.certificate != old.certificate)
        #expect(new.certificate.notValidAfter > later)
    }

    @Test func loadsPEMFilesAndRefusesAMismatchedKey() throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let a = TestPKI.authority()
        let b = TestPKI.authority()
        try a.certificate.serializeAsPEM().pemString.write(toFile: dir + "/ca.pem", atomically: true, encoding: .utf8)
        try TestPKI.writeKey(a.privateKey, to: dir + "/ca-key.pem")
        try TestPKI.writeKey(b.privateKey, to: dir + "/other-key.pem")
        let loaded = try RootCAStore.load(certificateFile: dir + "/ca.pem", keyFile: dir + "/ca-key.pem")
        #expect(loaded.roots == [a.certificate])
        #expect(throws: CAStoreError.self) { try RootCAStore.load(certificateFile: dir + "/ca.pem", keyFile: dir + "/other-key.pem") }
        #expect(throws: CAStoreError.self) { try RootCAStore.load(certificateFile: dir + "/missing.pem", keyFile: dir + "/ca-key.pem") }
    }

    /// The usual plug-in CA: an intermediate under the operator's root. Its certificate must be
    /// served after the leaf, or the chain cannot reach the root (it was dropped before, and every
    /// issuance failed with `verification_failed`).
    @Test(arguments: [false, true])
    func anIntermediateCAFromFilesIssuesChainsThatReachTheRoot(rootInTheCertificateFile: Bool) async throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let root = TestPKI.authority()
        let intermediate = TestPKI.intermediate(under: root)
        let certificates = [intermediate.certificate] + (rootInTheCertificateFile ? [root.certificate] : [])
        try certificates.map { try $0.serializeAsPEM().pemString }.joined(separator: "\n")
            .write(toFile: dir + "/ca.pem", atomically: true, encoding: .utf8)
        try TestPKI.writeKey(intermediate.privateKey, to: dir + "/ca-key.pem")
        try root.certificate.serializeAsPEM().pemString.write(toFile: dir + "/root.pem", atomically: true, encoding: .utf8)
        let loaded = try RootCAStore.load(
            certificateFile: dir + "/ca.pem", keyFile: dir + "/ca-key.pem", bundleFile: rootInTheCertificateFile ? nil : dir + "/root.pem")
        #expect(loaded.roots == [root.certificate])
        let ca = EmbeddedCA(authority: loaded, trustDomain: TestPKI.trustDomain, logger: TestPKI.quietLogger)
        let chain = try await ca.issue(csr: EmbeddedCATests().csr(), for: TestPKI.identity(), ttl: .seconds(3600))
        #expect(chain.count == 2)
        #expect(chain[1] == intermediate.certificate, "leaf, then the signing intermediate; the root stays out")
        #expect(chain[0].issuer == intermediate.certificate.subject)
        #expect(await ca.trustBundle().rootsPEM.contains(try root.certificate.serializeAsPEM().pemString))
        #expect(!(await ca.trustBundle().rootsPEM.contains(try intermediate.certificate.serializeAsPEM().pemString)))
    }
}
