import CertificateAuthority
import Crypto
import Foundation
import SDSModel
import Synchronization
import TestSupport
import Testing
import X509

@Suite struct RootRotationTests {

    final class Changes: Sendable {
        let seen = Mutex<[EmbeddedCA.Change]>([])
        var all: [EmbeddedCA.Change] { seen.withLock { $0 } }
    }

    func csr() throws -> CertificateSigningRequest {
        let extensions = try Certificate.Extensions { SubjectAlternativeNames([.uniformResourceIdentifier(TestPKI.identity().description)]) }
        return try CertificateSigningRequest(
            version: .v1, subject: DistinguishedName(), privateKey: Certificate.PrivateKey(P256.Signing.PrivateKey()),
            attributes: .init([.init(ExtensionRequest(extensions: extensions))]))
    }

    @Test func publishesBothRootsThenSwitchesThenRetiresTheOldOneAfterItsLastLeaf() async throws {
        let clock = ManualClock()
        let changes = Changes()
        let original = TestPKI.authority(now: clock.now)
        let ca = EmbeddedCA(
            authority: original, trustDomain: TestPKI.trustDomain, logger: TestPKI.quietLogger, now: { clock.now },
            onChange: { change, _ in changes.seen.withLock { $0.append(change) } })
        let oldLeaf = try await ca.issue(csr: csr(), for: TestPKI.identity(), ttl: .seconds(100))[0]

        let next = try ca.prepareRotation(ttl: .seconds(86400))
        #expect(ca.roots == [original.certificate, next])
        #expect(try await ca.issue(csr: csr(), for: TestPKI.identity(), ttl: .seconds(10))[0].issuer == original.certificate.subject)

        #expect(ca.activatePrepared())
        let newLeaf = try await ca.issue(csr: csr(), for: TestPKI.identity(), ttl: .seconds(100))[0]
        #expect(newLeaf.signature != oldLeaf.signature)
        #expect(next.publicKey.isValidSignature(newLeaf.signature, for: newLeaf))
        #expect(Set(ca.roots) == [original.certificate, next], "the old root stays while its leaves live")

        clock.advance(50)
        #expect(!ca.retireExpiredRoots())
        clock.advance(51)  // past the old root's last leaf (100 s)
        #expect(ca.retireExpiredRoots())
        #expect(ca.roots == [next])
        #expect(changes.all == [.bundleChanged, .signerChanged, .bundleChanged])
    }

    @Test func activatingWithNothingPreparedDoesNothing() {
        let ca = TestPKI.ca()
        #expect(!ca.activatePrepared())
    }

    @Test func theScheduleRotatesAtHalfAndActivatesAtASixthRemaining() throws {
        let clock = ManualClock()
        let ca = EmbeddedCA(
            authority: TestPKI.authority(now: clock.now, ttl: .seconds(600)), trustDomain: TestPKI.trustDomain,
            logger: TestPKI.quietLogger, now: { clock.now })
        let rotator = CARotator(
            ca: ca, schedule: .init(rootTTL: .seconds(600)), triggers: AsyncStream { $0.finish() }, logger: TestPKI.quietLogger,
            now: { clock.now })
        let manual = ManualActivation()
        let original = ca.activeCertificate
        clock.advance(200)
        rotator.tick(manualActivation: manual)
        #expect(ca.preparedCertificate == nil)
        clock.advance(120)  // 320 s of 660 s (600 s + 60 s backdating) lived: past half
        rotator.tick(manualActivation: manual)
        let prepared = try #require(ca.preparedCertificate)
        #expect(ca.activeCertificate == original)
        clock.advance(240)  // 560 s: less than a sixth (110 s) remains
        rotator.tick(manualActivation: manual)
        #expect(ca.activeCertificate == prepared && ca.preparedCertificate == nil)
    }

    @Test func aRotatedRootIsPersistedAndTheOldOneStillTrustedAfterARestart() throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let original = try RootCAStore.loadOrCreate(
            stateDirectory: dir, trustDomain: "cluster.local", ttl: .seconds(86400), now: Date(), logger: TestPKI.quietLogger)
        let ca = EmbeddedCA(authority: original, trustDomain: "cluster.local", logger: TestPKI.quietLogger)
        try ca.prepareRotation(ttl: .seconds(86400))
        ca.activatePrepared()
        try RootCAStore.persist(active: ca.activeAuthority, roots: ca.roots, stateDirectory: dir)

        let reloaded = try RootCAStore.loadOrCreate(
            stateDirectory: dir, trustDomain: "cluster.local", ttl: .seconds(86400), now: Date(), logger: TestPKI.quietLogger)
        #expect(reloaded.certificate == ca.activeCertificate)
        #expect(Set(RootCAStore.additionalRoots(stateDirectory: dir, now: Date())) == Set(ca.roots))
    }
}
