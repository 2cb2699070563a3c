import CertificateAuthority
import CoreMetrics
import FoundationEssentials
import Glibc
import Logging

/// Watches a CA in Istio's `cacerts` layout (`--ca-dir`) and feeds a complete, valid change into
/// the embedded CA's rotation path: a new signing certificate under the same root(s) signs at once
/// (every leaf re-issued and pushed); a new root is published next to the old one first and signs
/// after `activationDelay`. A half-written or invalid set is refused, logged and counted, and the
/// current CA keeps signing. A Kubernetes Secret update (an atomic symlink swap) is one change.
struct CADirectoryWatcher: Sendable {
    let directory: String
    let ca: EmbeddedCA
    let activationDelay: Duration
    let logger: Logger
    let now: @Sendable () -> Date

    func run(clock: some Clock<Duration> = ContinuousClock()) async {
        let reloads = Counter(label: "sds_agent_ca_reloads_total")
        let failures = Counter(label: "sds_agent_ca_reload_failures_total")
        let watch = FileWatch(paths: RootCAStore.CACertsFile.all.map { directory + "/" + $0 }, clock: clock)
        // An old root goes once the last leaf it signed has expired (as after a rotation).
        await watch.run(tick: { ca.retireExpiredRoots() }) { _ in
            let fresh: SigningAuthority
            do {
                fresh = try RootCAStore.load(caDirectory: directory, now: now())
            } catch {
                failures.increment()
                logger.error(
                    "CA FILES CHANGED BUT ARE NOT A USABLE CA; the current CA keeps signing",
                    metadata: ["ca_dir": "\(directory)", "error": "\(error)"])
                return
            }
            await apply(fresh)
            reloads.increment()
        }
    }

    func apply(_ fresh: SigningAuthority) async {
        let active = ca.activeAuthority
        guard fresh.certificate != active.certificate || fresh.intermediates != active.intermediates || fresh.roots != active.roots
        else { return }
        if Set(fresh.roots).isSubset(of: Set(ca.roots)) {
            ca.replaceSigner(with: fresh)
            return
        }
        ca.prepare(fresh)
        try? await Task.sleep(for: activationDelay)
        ca.activatePrepared()
    }
}
