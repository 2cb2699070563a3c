import CertificateAuthority
import CoreMetrics
import Logging
import SDSModel
import SecretCache

/// Follows the CA's taint (its own `tainted-certs.pem`, or what the upstream CA announces):
/// every cached leaf under a tainted certificate is re-issued at a random moment within `window`
/// and pushed; `sds_agent_tainted_leaves` counts those still served; once none is, and `grace`
/// has passed since the taint (other nodes re-issue theirs meanwhile), tainted roots leave the
/// bundle if a clean root is there. Looks every `interval` of `clock`.
struct TaintFollower<C: Clock<Duration>>: Sendable {
    let issuance: Issuance
    let cache: SecretCache
    let window: Duration
    var grace: Duration = Defaults.Certificates.taintRootGrace
    var interval: Duration = .seconds(1)
    let clock: C
    let logger: Logger

    func run() async {
        let leaves = Gauge(label: "sds_agent_tainted_leaves")
        let signer = Gauge(label: "sds_agent_ca_signer_tainted")
        var seen = TaintedCertificates.none
        var since: C.Instant?
        var settled = true
        while (try? await clock.sleep(for: interval)) != nil {
            signer.record(issuance.signerIsTainted ? 1 : 0)
            let tainted = issuance.tainted
            if tainted != seen {
                seen = tainted
                since = tainted.isEmpty ? nil : clock.now
                settled = tainted.isEmpty
                if !tainted.isEmpty {
                    let scheduled = await cache.reissue(within: window) { issuance.isTainted($0) }
                    logger.notice(
                        "taint: re-issuing the leaves under the tainted certificates",
                        metadata: ["leaves": .number(scheduled), "window": "\(DurationText.format(window))"])
                }
            }
            guard !settled, let since else {
                leaves.record(0)
                continue
            }
            let affected = await cache.identities { issuance.isTainted($0) }.count
            leaves.record(affected)
            if affected == 0, since.duration(to: clock.now) >= grace {
                _ = issuance.dropTaintedRoots()
                settled = true
                logger.notice("taint: no leaf served chains to a tainted certificate")
            }
        }
    }
}
