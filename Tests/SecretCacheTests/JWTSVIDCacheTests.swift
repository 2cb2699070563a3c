import Foundation
import SDSModel
import SecretCache
import Synchronization
import TestSupport
import Testing

/// Signs stand-in tokens ("n.<subject>.<audiences>.<exp>"), counting them.
final class CountingJWTSigner: JWTSVIDSigning {
    let count = Mutex(0)
    /// Signs tokens that expired already (a signer whose clock is behind ours).
    let expired: Bool
    init(expired: Bool = false) { self.expired = expired }
    func sign(subject: SPIFFEID, audience: [String], ttl: Duration, now: Date) async throws -> (token: String, expiry: Date) {
        let n = count.withLock { $0 += 1; return $0 }
        let expiry = expired ? now.addingTimeInterval(-1) : now.addingTimeInterval(ttl.timeInterval)
        return ("\(n).\(subject).\(audience.joined(separator: ",")).\(Int(expiry.timeIntervalSince1970))", expiry)
    }
}

/// JWT-SVIDs over SDS (`jwt-svid:AUDIENCE`) in the cache, on a manual clock.
@Suite struct JWTSVIDCacheTests {
    let identity = TestPKI.identity("demo", "frontend")

    func cache(_ clock: ManualClock, signer: CountingJWTSigner?) -> SecretCache {
        var configuration = SecretCache.Configuration()
        configuration.jwtSVIDTTL = .seconds(100)
        return SecretCache(
            issuer: TestPKI.ca(), configuration: configuration, logger: TestPKI.quietLogger,
            now: { clock.now }, jwt: signer)
    }

    @Test func oneTokenPerIdentityAndAudiencesRefreshedAtHalfItsLifeAndSignalled() async throws {
        let clock = ManualClock(Date(timeIntervalSince1970: 1_800_000_000))
        let signer = CountingJWTSigner()
        let cache = cache(clock, signer: signer)
        let first = try await cache.jwtSVID(for: identity, audiences: ["api"])
        #expect(try await cache.jwtSVID(for: identity, audiences: ["api"]) == first, "held, not signed again")
        #expect(try await cache.jwtSVID(for: identity, audiences: ["api", "db"]) != first, "another audience set: its own token")
        #expect(signer.count.withLock { $0 } == 2)
        #expect(first.headerValue == "Bearer " + first.token)
        #expect(first.expiry == first.issuedAt.addingTimeInterval(100))

        let signalled = Mutex(0)
        let watch = cache.watch(identity) { signalled.withLock { $0 += 1 } }
        defer { watch.cancel() }
        // Before 40% of its life nothing is due; by half of it, it is signed again and the
        // identity's streams hear of it.
        clock.advance(39)
        await cache.maintain()
        #expect(signalled.withLock { $0 } == 0)
        clock.advance(11.5)
        await cache.maintain()
        let second = try await cache.jwtSVID(for: identity, audiences: ["api"])
        #expect(second.token != first.token && second.version != first.version)
        #expect(signalled.withLock { $0 } >= 1)
    }

    @Test func aTokenNoStreamAsksForIsNotRefreshedAndGoesOnceExpired() async throws {
        let clock = ManualClock(Date(timeIntervalSince1970: 1_800_000_000))
        let signer = CountingJWTSigner()
        let cache = cache(clock, signer: signer)
        _ = try await cache.jwtSVID(for: identity, audiences: ["api"])
        // Not asked for again: past its lifetime it is not signed again, and is dropped.
        for _ in 0..<20 {
            clock.advance(10)
            await cache.maintain()
        }
        #expect(await cache.jwtSVIDCount == 0)
        #expect(signer.count.withLock { $0 } <= 2, "at most one refresh while it might still be asked for")
    }

    @Test func anIdentityHoldsAtMost32AudienceSetsAndTheLeastRecentlyAskedMakesRoom() async throws {
        let clock = ManualClock(Date(timeIntervalSince1970: 1_800_000_000))
        let signer = CountingJWTSigner()
        let cache = cache(clock, signer: signer)
        for index in 0..<33 {
            clock.advance(0.01)
            _ = try await cache.jwtSVID(for: identity, audiences: ["api-\(index)"])
        }
        #expect(await cache.jwtSVIDCount == 32)
        // api-0 went: asking for it signs again; api-32 is held.
        let before = signer.count.withLock { $0 }
        _ = try await cache.jwtSVID(for: identity, audiences: ["api-32"])
        #expect(signer.count.withLock { $0 } == before)
        _ = try await cache.jwtSVID(for: identity, audiences: ["api-0"])
        #expect(signer.count.withLock { $0 } == before + 1)
        // Another identity has room of its own.
        _ = try await cache.jwtSVID(for: TestPKI.identity("demo", "other"), audiences: ["api-0"])
        #expect(await cache.jwtSVIDCount == 33)
    }

    @Test func aTokenThatExpiredWhenSignedIsNoTrap() async throws {
        let clock = ManualClock(Date(timeIntervalSince1970: 1_800_000_000))
        let cache = cache(clock, signer: CountingJWTSigner(expired: true))
        _ = try await cache.jwtSVID(for: identity, audiences: ["api"])
        clock.advance(1)
        await cache.maintain()
        #expect(await cache.jwtSVIDCount <= 1)
    }

    @Test func withoutAJWTKeyTheAnswerIsUnsupported() async throws {
        let cache = cache(ManualClock(), signer: nil)
        await #expect(throws: SecretError.self) { try await cache.jwtSVID(for: identity, audiences: ["api"]) }
        do {
            _ = try await cache.jwtSVID(for: identity, audiences: ["api"])
        } catch let error as SecretError {
            #expect(error.code == .unsupported)
        }
    }

    @Test func namesAreCheckedAudienceByAudience() throws {
        #expect(try JWTSVIDName.audiences(in: "jwt-svid:api").get() == ["api"])
        #expect(try JWTSVIDName.audiences(in: "jwt-svid:a,b").get() == ["a", "b"])
        for bad in ["jwt-svid:", "jwt-svid:a,", "jwt-svid:a b", "jwt-svid:a\u{7}", "jwt-svid:" + String(repeating: "x", count: 257),
                    "jwt-svid:" + (0..<17).map { "a\($0)" }.joined(separator: ","), "jwt-svid:é", "default"] {
            #expect((try? JWTSVIDName.audiences(in: bad).get()) == nil, "\(bad)")
        }
    }
}
