import Foundation
import SDSModel
import Synchronization
import TestSupport
import Testing
import WorkloadAuthentication

/// A repeated token costs no signature check, and the cache never makes a token pass that
/// would now fail.
@Suite struct VerifiedTokenCacheTests {
    let signer = TokenFactory(kid: "k1")
    let start = Date(timeIntervalSince1970: 1_800_000_000)

    final class Clock: Sendable {
        let time: Mutex<Date>
        init(_ time: Date) { self.time = Mutex(time) }
        var now: Date { time.withLock { $0 } }
        func advance(_ seconds: TimeInterval) { time.withLock { $0 = $0.addingTimeInterval(seconds) } }
    }

    func verifier(keys: any VerificationKeySource, clock: Clock) -> KubernetesTokenVerifier {
        KubernetesTokenVerifier(
            configuration: .init(trustDomain: "cluster.local", issuers: [TokenFactory.issuer], audiences: [TokenFactory.audience]),
            keys: keys, now: { clock.now })
    }

    @Test func aRepeatedTokenIsVerifiedOnceAndStillExpires() async throws {
        let clock = Clock(start)
        let verifier = verifier(keys: try await VerificationKeySet(jwksJSON: signer.jwksJSON()), clock: clock)
        let token = signer.token(now: start, ttl: 600)
        let first = try await verifier.authenticate(token: token)
        let second = try await verifier.authenticate(token: token)
        #expect(first == second && verifier.cachedTokens == 1)
        clock.advance(600 + 31)  // past exp and the 30 s skew
        do {
            _ = try await verifier.authenticate(token: token)
            Issue.record("a cached token outlived its exp")
        } catch {
            #expect(error.code == .expired)
        }
    }

    @Test func aFailureIsNeverCached() async throws {
        let clock = Clock(start)
        let verifier = verifier(keys: try await VerificationKeySet(jwksJSON: signer.jwksJSON()), clock: clock)
        let forged = TokenFactory(kid: "k1").token(now: start)
        for _ in 0..<2 {
            await #expect(throws: AuthenticationError.self) { try await verifier.authenticate(token: forged) }
        }
        #expect(verifier.cachedTokens == 0)
    }

    @Test func aKeyRemovedFromTheSetStopsItsCachedTokens() async throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/jwks.json"
        try signer.jwksJSON().write(to: URL(fileURLWithPath: path))
        let keys = try await JWKSFileKeySource(path: path)
        let clock = Clock(start)
        let verifier = verifier(keys: keys, clock: clock)
        let token = signer.token(now: start)
        _ = try await verifier.authenticate(token: token)
        #expect(verifier.cachedTokens == 1)
        try TokenFactory(kid: "k2").jwksJSON().write(to: URL(fileURLWithPath: path))
        await keys.reload(logger: TestPKI.quietLogger)
        do {
            _ = try await verifier.authenticate(token: token)
            Issue.record("a token of a removed key was accepted from the cache")
        } catch {
            #expect(error.code == .unknownKey)
        }
    }
}
