import Foundation
import SecretCache
import Testing

@Suite struct RotationPolicyTests {
    let start = Date(timeIntervalSince1970: 1_800_000_000)

    @Test(arguments: [(-1.0, 0.45), (0.0, 0.5), (1.0, 0.55), (5.0, 0.55)])
    func renewsAtHalfLifeWithinTheJitter(random: Double, expectedFraction: Double) {
        let policy = RotationPolicy(fraction: 0.5, jitter: 0.1)
        let at = policy.renewalTime(notBefore: start, notAfter: start.addingTimeInterval(1000), random: random)
        #expect(abs(at.timeIntervalSince(start) - 1000 * expectedFraction) < 0.001)
    }

    @Test func randomJitterSpreadsRenewalsButStaysInBounds() {
        let policy = RotationPolicy()
        let times = (0..<200).map { _ in policy.renewalTime(notBefore: start, notAfter: start.addingTimeInterval(1000)).timeIntervalSince(start) }
        #expect(times.allSatisfy { (450...550).contains($0) })
        #expect(Set(times.map { Int($0) }).count > 20, "renewals of certificates issued together must not coincide")
    }

    @Test func isClampedToTenToNinetyPercent() {
        let late = RotationPolicy(fraction: 0.95, jitter: 0).renewalTime(notBefore: start, notAfter: start.addingTimeInterval(100), random: 0)
        let early = RotationPolicy(fraction: 0.01, jitter: 0).renewalTime(notBefore: start, notAfter: start.addingTimeInterval(100), random: 0)
        #expect(late == start.addingTimeInterval(90) && early == start.addingTimeInterval(10))
    }

    @Test func retryBackoffDoublesUpToAMinute() {
        #expect((1...8).map { RotationPolicy.retryDelay(afterFailure: $0) } == [1, 2, 4, 8, 16, 32, 60, 60].map { .seconds($0) })
    }
}
