import FoundationEssentials
import Glibc
import Logging
import ServiceLifecycle
import Synchronization
import X509
import SDSModel

/// Drives root rotation of the ``EmbeddedCA``: on a schedule, or when asked (`SIGUSR1`).
///
/// Schedule (SPIRE's): prepare the next root once the active one has lived `prepareAt` of its
/// life (½), activate it once only `activateAt` of the life remains (⅙). A manual rotation
/// prepares at once and activates after `activationDelay`, the time for the new bundle to reach
/// every stream (pushes are immediate; the delay covers Envoys that are reconnecting).
///
/// It looks every `interval` of `clock` (tests move a clock of their own); the schedule itself
/// is in wall time (`now`), the time certificates carry.
public struct CARotator<C: Clock<Duration>>: Service {
    /// When to rotate.
    public struct Schedule: Sendable {
        /// Fraction of the active root's life after which the next root is prepared.
        public var prepareAt: Double = 0.5
        /// Fraction of the active root's life that remains when the prepared root is activated.
        public var activateAt: Double = 1.0 / 6.0
        /// After a manual rotation, how long old + new roots are published before the switch.
        public var activationDelay: Duration = Defaults.Certificates.caActivationDelay
        /// Lifetime of new roots.
        public var rootTTL: Duration

        public init(rootTTL: Duration, activationDelay: Duration = Defaults.Certificates.caActivationDelay) {
            self.rootTTL = rootTTL
            self.activationDelay = activationDelay
        }
    }

    private let ca: EmbeddedCA
    private let schedule: Schedule
    private let triggers: AsyncStream<Void>
    private let logger: Logger
    private let now: @Sendable () -> Date
    private let interval: Duration
    private let clock: C

    /// `triggers` yields once per manual rotation request.
    public init(
        ca: EmbeddedCA, schedule: Schedule, triggers: AsyncStream<Void>, logger: Logger, interval: Duration = .seconds(1),
        clock: C, now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.ca = ca
        self.schedule = schedule
        self.triggers = triggers
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.now = now
    }

    public func run() async throws {
        try await cancelWhenGracefulShutdown {
            try await withThrowingDiscardingTaskGroup { group in
                let manual = ManualActivation()
                group.addTask {
                    for await _ in triggers {
                        do {
                            try ca.prepareRotation(ttl: schedule.rootTTL)
                            manual.set(now().addingTimeInterval(schedule.activationDelay.timeInterval))
                        } catch {
                            logger.error("CA rotation: cannot make the next root", metadata: ["error": "\(error)"])
                        }
                    }
                }
                group.addTask {
                    // Cancellation (graceful shutdown) ends the loop normally: it is not an error.
                    while (try? await clock.sleep(for: interval)) != nil {
                        tick(manualActivation: manual)
                    }
                }
            }
        }
    }

    /// One scheduling step; public so tests can drive it with their own clock.
    package func tick(manualActivation: ManualActivation) {
        let now = self.now()
        let active = ca.activeCertificate
        let life = active.notValidAfter.timeIntervalSince(active.notValidBefore)
        if ca.preparedCertificate == nil, now >= active.notValidBefore.addingTimeInterval(life * schedule.prepareAt) {
            do {
                try ca.prepareRotation(ttl: schedule.rootTTL)
            } catch {
                logger.error("CA rotation: cannot make the next root", metadata: ["error": "\(error)"])
            }
        }
        if ca.preparedCertificate != nil {
            let scheduled = now >= active.notValidAfter.addingTimeInterval(-life * schedule.activateAt)
            if scheduled || manualActivation.isDue(now) {
                ca.activatePrepared()
                manualActivation.set(nil)
            }
        }
        ca.retireExpiredRoots()
    }
}

extension CARotator where C == ContinuousClock {
    /// On the real clock.
    public init(
        ca: EmbeddedCA, schedule: Schedule, triggers: AsyncStream<Void>, logger: Logger, interval: Duration = .seconds(1),
        now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.init(ca: ca, schedule: schedule, triggers: triggers, logger: logger, interval: interval, clock: ContinuousClock(), now: now)
    }
}

/// When a manually prepared root is to be activated.
public final class ManualActivation: Sendable {
    private let at = Mutex<Date?>(nil)
    public init() {}
    func set(_ date: Date?) { at.withLock { $0 = date } }
    func isDue(_ now: Date) -> Bool { at.withLock { $0.map { now >= $0 } ?? false } }
}
