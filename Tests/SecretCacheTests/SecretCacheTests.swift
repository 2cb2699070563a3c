import CertificateAuthority
import Foundation
import SDSModel
import SecretCache
import Synchronization
import TestSupport
import Testing
import X509

@Suite struct SecretCacheTests {
    final class ManualNow: Sendable {
        private let value: Mutex<Date>
        init(_ date: Date) { value = Mutex(date) }
        func advance(_ seconds: TimeInterval) { value.withLock { $0 += seconds } }
        var now: Date { value.withLock { $0 } }
    }

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

    @Test func reissuesOnceHalfTheLifetimeHasPassed() async throws {
        let clock = ManualNow(Date())
        let ca = TestPKI.ca(now: { clock.now })
        let cache = SecretCache(
            issuer: ca, configuration: .init(certificateTTL: .seconds(1000)), logger: TestPKI.quietLogger, now: { clock.now })
        let identity = TestPKI.identity()
        let first = try await cache.workloadSecret(for: identity)
        clock.advance(300)
        #expect(try await cache.workloadSecret(for: identity) == first)
        clock.advance(300)  // past 50% of (1000 s + 60 s backdating)
        let second = try await cache.workloadSecret(for: identity)
        #expect(second.serialNumberHex != first.serialNumberHex)
    }

    @Test func aRefusedIssuanceIsNotCached() async throws {
        struct RefusingIssuer: CertificateIssuer {
            func issue(csr: CertificateSigningRequest, for identity: SPIFFEID, ttl: Duration) async throws(IssuanceError) -> [Certificate] {
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
                #expect(error.isTransient)
                #expect(error.message.contains("CA offline"))
            }
        }
        #expect(await cache.issuedCertificates == 0)
    }
}
