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

    @Test(.timeLimit(.minutes(1))) func theRunningLoopPreparesAndActivatesAsItsClockTicks() async throws {
        let wall = ManualClock()
        let ticks = TestClock()
        let (changes, change) = AsyncStream.makeStream(of: EmbeddedCA.Change.self)
        let ca = EmbeddedCA(
            authority: TestPKI.authority(now: wall.now, ttl: .seconds(600)), trustDomain: TestPKI.trustDomain,
            logger: TestPKI.quietLogger, now: { wall.now }, onChange: { new, _ in change.yield(new) })
        var seen = changes.makeAsyncIterator()
        let (triggers, trigger) = AsyncStream.makeStream(of: Void.self)
        let rotator = CARotator(
            ca: ca, schedule: .init(rootTTL: .seconds(600), activationDelay: .seconds(30)), triggers: triggers,
            logger: TestPKI.quietLogger, interval: .seconds(1), clock: ticks, now: { wall.now })
        let original = ca.activeCertificate
        let loop = Task { try await rotator.run() }
        defer { loop.cancel() }
        #expect(await ticks.sleeping())
        wall.advance(320)  // past half of the root's life, but no tick yet: nothing happens
        #expect(ca.preparedCertificate == nil)
        ticks.advance(by: .seconds(1))
        #expect(await ticks.sleeping())
        let prepared = try #require(ca.preparedCertificate, "the tick after half its life prepares the next root")
        #expect(ca.activeCertificate == original)
        #expect(await seen.next() == .bundleChanged)

        // SIGUSR1 with a root already prepared: a newer one is made, and activated after the
        // delay, in wall time. (The change is announced once the trigger is handled.)
        trigger.yield()
        #expect(await seen.next() == .bundleChanged)
        wall.advance(29)
        ticks.advance(by: .seconds(1))
        #expect(await ticks.sleeping())
        #expect(ca.activeCertificate == original)
        wall.advance(2)
        ticks.advance(by: .seconds(1))
        #expect(await ticks.sleeping())
        #expect(ca.activeCertificate != original && ca.activeCertificate != prepared, "the manual rotation made and activated a newer root")
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
