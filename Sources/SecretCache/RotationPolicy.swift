import FoundationEssentials
import Glibc

/// When a certificate should be renewed: a pure function of its validity, so it is tested as a value.
///
/// Renew at `fraction` of the lifetime (default ½, like SPIRE and Istio), moved by a random
/// jitter of up to ±`jitter` × that point, so a node's certificates issued together do not all
/// renew at the same moment (spire#1240). The result is clamped to 10%..90% of the lifetime.
public struct RotationPolicy: Sendable, Equatable {
    /// Fraction of the lifetime after which to renew.
    public var fraction: Double
    /// Relative jitter around that point (0.1 = ±10%).
    public var jitter: Double

    public init(fraction: Double = 0.5, jitter: Double = 0.1) {
        self.fraction = fraction
        self.jitter = jitter
    }

    /// The renewal time for a certificate valid from `notBefore` to `notAfter`; `random` is in -1...1.
    public func renewalTime(notBefore: Date, notAfter: Date, random: Double) -> Date {
        let lifetime = notAfter.timeIntervalSince(notBefore)
        let point = fraction * (1 + jitter * max(-1, min(1, random)))
        return notBefore.addingTimeInterval(lifetime * max(0.1, min(0.9, point)))
    }

    /// The renewal time with a fresh random jitter.
    public func renewalTime(notBefore: Date, notAfter: Date) -> Date {
        renewalTime(notBefore: notBefore, notAfter: notAfter, random: Double.random(in: -1...1))
    }

    /// How long to wait after the `attempt`-th consecutive failure (1-based): 1 s doubling to 60 s.
    public static func retryDelay(afterFailure attempt: Int) -> Duration {
        .seconds(min(60, 1 << min(6, max(0, attempt - 1))))
    }
}
