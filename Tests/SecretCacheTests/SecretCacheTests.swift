import CertificateAuthority
import Foundation
import MetricsTestKit
import SDSModel
import SecretCache
import Synchronization
import TestSupport
import Testing
import X509

/// An issuer that fails while `failing` is set, counting attempts.
final class FlakyIssuer: CertificateIssuer, @unchecked Sendable {
    let usesCallerCredential = true
    let ca: EmbeddedCA
    private let state = Mutex<(failing: Bool, attempts: Int)>((false, 0))
    init(ca: EmbeddedCA) { self.ca = ca }
    var failing: Bool {
        get { state.withLock { $0.failing } }
        set { state.withLock { $0.failing = newValue } }
    }
    var attempts: Int { state.withLock { $0.attempts } }
    func issue(csr: CertificateSigningRequest, for identity: SPIFFEID, ttl: Duration, credential: CallerCredential?) async throws(IssuanceError) -> [Certificate] {
        let failing = state.withLock { state -> Bool in
            state.attempts += 1
            return state.failing
        }
        if failing { throw IssuanceError(code: .unavailable, message: "CA offline") }
        return try await ca.issue(csr: csr, for: identity, ttl: ttl)
    }
    func trustBundle() async -> TrustBundle { await ca.trustBundle() }
}

@Suite struct SecretCacheTests {

    @Test func concurrentRequestsForOneIdentityShareOneCertificate() async throws {
        let cache = SecretCache(issuer: TestPKI.ca(), configuration: .init(certificateTTL: .seconds(3600)), logger: TestPKI.quietLogger)
        let identity = TestPKI.identity()
        let serials = try await withThrowingTaskGroup(of: String.self) { group in
            for _ in 0..<50 { group.addTask { try await cache.workloadSecret(for: identity).serialNumberHex } }
            return try await group.reduce(into: Set<String>()) { $0.insert($1) }
        }
        #expect(serials.count == 1)
        #expect(await cache.issuedCertificates == 1)
    }

    @Test func identitiesGetTheirOwnKeysAndCertificates() async throws {
        let cache = SecretCache(issuer: TestPKI.ca(), configuration: .init(), logger: TestPKI.quietLogger)
        let a = try await cache.workloadSecret(for: TestPKI.identity("demo", "a"))
        let b = try await cache.workloadSecret(for: TestPKI.identity("demo", "b"))
        #expect(a.privateKeyPEM != b.privateKeyPEM && a.serialNumberHex != b.serialNumberHex)
        let leaf = try Certificate(pemEncoded: a.certificateChainPEM)
        #expect(try leaf.extensions.subjectAlternativeNames.map(Array.init) == [.uniformResourceIdentifier("spiffe://cluster.local/ns/demo/sa/a")])
        #expect(a.privateKeyPEM.hasPrefix("-----BEGIN PRIVATE KEY-----"))
    }

    /// The node's wall clock steps forward an hour, past every certificate's end (30 minutes):
    /// nothing expired is served, and the next tick renews every identity and tells its streams.
    /// (End to end under libfaketime is not possible: the Swift runtime loses its arguments when
    /// libfaketime is preloaded, so the agent cannot start under it; RELIABILITY.md.)
    @Test func aClockSteppedForwardAnHourServesNothingExpiredAndRenewsEveryIdentity() async throws {
        let clock = ManualClock()
        let cache = SecretCache(
            issuer: TestPKI.ca(now: { clock.now }),
            configuration: .init(certificateTTL: .seconds(1800), idleTTL: .seconds(7200)),  // nothing idles out
            logger: TestPKI.quietLogger, now: { clock.now })
        let identities = (0..<20).map { TestPKI.identity("demo", "sa-\($0)") }
        var before: [SPIFFEID: String] = [:]
        for identity in identities { before[identity] = try await cache.workloadSecret(for: identity).serialNumberHex }
        let watched = identities[1]
        let updates = cache.updates(for: watched)
        var signals = updates.makeAsyncIterator()

        clock.advance(3600)
        // A caller asking before the next tick gets a certificate valid now, never the expired one.
        let asked = try await cache.workloadSecret(for: identities[0])
        #expect(asked.serialNumberHex != before[identities[0]])
        #expect(asked.notBefore <= clock.now && clock.now < asked.notAfter)
        await cache.maintain()
        for identity in identities {
            let secret = try await cache.workloadSecret(for: identity)
            #expect(secret.serialNumberHex != before[identity], "\(identity) was not renewed")
            #expect(clock.now < secret.notAfter)
        }
        #expect(await cache.issuedCertificates == 40, "20 before, then each renewed once")
        #expect(await signals.next() != nil, "the watched identity's streams are told to push")
    }

    @Test func maintainRotatesWhenDueAndSignalsTheIdentitysStreams() async throws {
        let clock = ManualClock()
        let ca = TestPKI.ca(now: { clock.now })
        let cache = SecretCache(
            issuer: ca, configuration: .init(certificateTTL: .seconds(1000), rotation: .init(fraction: 0.5, jitter: 0)),
            logger: TestPKI.quietLogger, now: { clock.now })
        let identity = TestPKI.identity()
        let other = TestPKI.identity("demo", "other")
        let first = try await cache.workloadSecret(for: identity)
        _ = try await cache.workloadSecret(for: other)
        var updates = cache.updates(for: identity).makeAsyncIterator()
        var otherUpdates = cache.updates(for: other).makeAsyncIterator()

        clock.advance(400)
        await cache.maintain()
        #expect(try await cache.workloadSecret(for: identity) == first, "not due yet: same certificate")
        clock.advance(99)
        await cache.maintain()
        #expect(try await cache.workloadSecret(for: identity) == first, "499 s of 1000 s: still not due")

        clock.advance(2)  // past 50% of the 1000 s from issuance
        await cache.maintain()
        let second = try await cache.workloadSecret(for: identity)
        #expect(second.serialNumberHex != first.serialNumberHex)
        #expect(second.privateKeyPEM != first.privateKeyPEM, "rotation re-keys")
        #expect(await updates.next() != nil)
        #expect(await otherUpdates.next() != nil)  // `other` was due too
    }

    @Test(.timeLimit(.minutes(1))) func theRotatorRenewsWhatIsDueAtItsNextTickOnItsClock() async throws {
        let clock = ManualClock()
        let ticks = TestClock()
        let cache = SecretCache(
            issuer: TestPKI.ca(now: { clock.now }),
            configuration: .init(certificateTTL: .seconds(1000), rotation: .init(fraction: 0.5, jitter: 0)),
            logger: TestPKI.quietLogger, now: { clock.now })
        let identity = TestPKI.identity()
        let first = try await cache.workloadSecret(for: identity)
        var updates = cache.updates(for: identity).makeAsyncIterator()
        let rotator = Task { try await Rotator(cache: cache, interval: .seconds(1), clock: ticks).run() }
        defer { rotator.cancel() }

        #expect(await ticks.sleeping())
        clock.advance(501)  // due, but the rotator has not ticked yet
        #expect(try await cache.workloadSecret(for: identity) == first)
        ticks.advance(by: .seconds(1))
        #expect(await updates.next() != nil, "the renewal reaches the identity's streams")
        #expect(try await cache.workloadSecret(for: identity).serialNumberHex != first.serialNumberHex)
        rotator.cancel()
        _ = await rotator.result
    }

    @Test func identitiesNobodyWatchesAreDropped() async throws {
        let clock = ManualClock()
        let cache = SecretCache(
            issuer: TestPKI.ca(now: { clock.now }), configuration: .init(idleTTL: .seconds(60)), logger: TestPKI.quietLogger,
            now: { clock.now })
        let watched = TestPKI.identity("demo", "watched")
        let idle = TestPKI.identity("demo", "idle")
        _ = try await cache.workloadSecret(for: watched)
        _ = try await cache.workloadSecret(for: idle)
        let stream = cache.updates(for: watched)
        clock.advance(61)
        await cache.maintain()
        #expect(await cache.cachedIdentities == [watched])
        _ = stream  // the watch lasts while the stream is held
    }

    /// The gauge was 0 before any certificate was cached, so an "expiring soon" alert fired on
    /// idle nodes: it exists only while a certificate is cached.
    @Test func theExpiryGaugeExistsOnlyWhileACertificateIsCached() async throws {
        let clock = ManualClock()
        let metrics = TestMetrics()
        let cache = SecretCache(
            issuer: TestPKI.ca(now: { clock.now }), configuration: .init(certificateTTL: .seconds(1000), idleTTL: .seconds(60)),
            logger: TestPKI.quietLogger, metrics: metrics, now: { clock.now })
        await cache.maintain()
        #expect(throws: (any Error).self) { try metrics.expectMeter(SecretCache.expiryMetric) }
        _ = try await cache.workloadSecret(for: TestPKI.identity())
        await cache.maintain()
        let seconds = try metrics.expectMeter(SecretCache.expiryMetric).lastValue ?? 0
        #expect(seconds > 990 && seconds <= 1001)
        clock.advance(120)  // no stream watches it: evicted as idle, then the gauge goes
        await cache.maintain()
        await cache.maintain()
        #expect(await cache.cachedIdentities.isEmpty)
        #expect(throws: (any Error).self) { try metrics.expectMeter(SecretCache.expiryMetric) }
    }

    @Test func aFailedRenewalKeepsServingTheCurrentCertificateAndRetries() async throws {
        let clock = ManualClock()
        let issuer = FlakyIssuer(ca: TestPKI.ca(now: { clock.now }))
        let metrics = TestMetrics()
        let cache = SecretCache(
            issuer: issuer, configuration: .init(certificateTTL: .seconds(1000), rotation: .init(fraction: 0.5, jitter: 0)),
            logger: TestPKI.quietLogger, metrics: metrics, now: { clock.now })
        let identity = TestPKI.identity()
        let first = try await cache.workloadSecret(for: identity)
        let watch = cache.updates(for: identity)  // a stream is open for it, so it is not dropped as idle
        defer { _ = watch }
        issuer.failing = true
        clock.advance(600)
        await cache.maintain()
        #expect(try await cache.workloadSecret(for: identity) == first)
        await cache.maintain()  // within the 1 s backoff: no new attempt
        #expect(issuer.attempts == 2)
        issuer.failing = false
        clock.advance(1.5)
        await cache.maintain()
        #expect(try await cache.workloadSecret(for: identity) != first)

        #expect(try metrics.expectCounter(SecretCache.issuedMetric, [("kind", "new")]).totalValue == 1)
        #expect(try metrics.expectCounter(SecretCache.issuedMetric, [("kind", "renewal")]).totalValue == 1)
        #expect(try metrics.expectCounter("sds_agent_certificate_issue_failures_total").totalValue == 1)
        #expect(try metrics.expectMeter("sds_agent_cached_identities").lastValue == 1)
        #expect(try metrics.expectTimer("sds_agent_certificate_issue_seconds").values.count == 3, "two issued, one failed")
    }

    @Test func aRefusedIssuanceIsNotCached() async throws {
        struct RefusingIssuer: CertificateIssuer {
            let usesCallerCredential = false
            func issue(csr: CertificateSigningRequest, for identity: SPIFFEID, ttl: Duration, credential: CallerCredential?) async throws(IssuanceError) -> [Certificate] {
                throw IssuanceError(code: .unavailable, message: "CA offline")
            }
            func trustBundle() async -> TrustBundle { TrustBundle(trustDomain: "cluster.local", rootsPEM: "", version: "0") }
        }
        let cache = SecretCache(issuer: RefusingIssuer(), configuration: .init(), logger: TestPKI.quietLogger)
        for _ in 0..<2 {
            do {
                _ = try await cache.workloadSecret(for: TestPKI.identity())
                Issue.record("expected a failure")
            } catch {
                #expect(error.code == .unavailable)
                #expect(error.message.contains("CA offline"))
            }
        }
        #expect(await cache.issuedCertificates == 0)
    }
}

/// A taint (issue 24): the leaves it names are scheduled within the window, spread, and renewed.
@Suite struct SecretCacheTaintTests {
    @Test func affectedLeavesAreReissuedAtRandomMomentsWithinTheWindowAndNoOthers() async throws {
        let clock = ManualClock()
        let ca = TestPKI.ca(now: { clock.now })
        let cache = SecretCache(
            issuer: ca, configuration: .init(certificateTTL: .seconds(3600)), logger: TestPKI.quietLogger, now: { clock.now })
        let ids = (0..<20).map { TestPKI.identity("demo", "sa-\($0)") }
        var before: [SPIFFEID: String] = [:]
        for id in ids { before[id] = try await cache.workloadSecret(for: id).serialNumberHex }
        // Half of them "chain to a tainted certificate".
        let affected = Set(ids.prefix(10))
        let isAffected: @Sendable (WorkloadSecret) -> Bool = { affected.contains($0.spiffeID) }
        #expect(await cache.identities(where: isAffected) == affected)

        let start = clock.now
        #expect(await cache.reissue(within: .seconds(30), where: isAffected) == 10)
        let renewAt = await cache.report().filter { affected.contains($0.spiffeID) }.compactMap(\.renewAt)
        #expect(renewAt.count == 10 && renewAt.allSatisfy { $0 >= start && $0 <= start.addingTimeInterval(30) })
        #expect(Set(renewAt).count > 1, "spread, not all at once")
        let others = await cache.report().filter { !affected.contains($0.spiffeID) }.compactMap(\.renewAt)
        #expect(others.allSatisfy { $0 > start.addingTimeInterval(600) }, "untouched")

        clock.advance(31)
        await cache.maintain()
        for id in ids {
            let serial = try await cache.workloadSecret(for: id).serialNumberHex
            #expect((serial != before[id]) == affected.contains(id))
        }
    }
}
