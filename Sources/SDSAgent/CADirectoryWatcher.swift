import CertificateAuthority
import CoreMetrics
import FoundationEssentials
import Glibc
import Logging
import SDSModel

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
    func run<C: Clock<Duration>>(clock: C = ContinuousClock()) async {
        let reloads = Counter(label: "sds_agent_ca_reloads_total")
        let failures = Counter(label: "sds_agent_ca_reload_failures_total")
        let crlPath = directory + "/" + RootCAStore.CACertsFile.revocation
        let taintPath = directory + "/" + RootCAStore.CACertsFile.tainted
        let caFiles = RootCAStore.CACertsFile.all.map { directory + "/" + $0 }
        let watch = FileWatch(paths: caFiles + [crlPath, taintPath], clock: clock)
        await reloadRevocation()
        reloadTaint()
        // A new root signs once its activation delay has passed, counted on `clock`; the watch
        // goes on meanwhile (a taint may come before it, and activates it at once).
        var activation: C.Instant?
        let tick = {
            // An old root goes once the last leaf it signed has expired (as after a rotation).
            ca.retireExpiredRoots()
            if let due = activation, clock.now >= due {
                activation = nil
                ca.activatePrepared()
            }
        }
        await watch.run(tick: tick) { changed in
            if changed.contains(where: caFiles.contains) {
                do {
                    let fresh = try RootCAStore.load(caDirectory: directory, now: now())
                    if apply(fresh) { activation = clock.now.advanced(by: activationDelay) }
                    reloads.increment()
                } catch {
                    failures.increment()
                    logger.error(
                        "CA FILES CHANGED BUT ARE NOT A USABLE CA; the current CA keeps signing",
                        metadata: ["ca_dir": "\(directory)", "error": "\(error)"])
                }
            }
            // Checked against the CA now in force, whichever file changed.
            await reloadRevocation()
            reloadTaint()
        }
    }

    /// Reads `tainted-certs.pem`: its certificates are declared compromised
    /// (``EmbeddedCA/taint(_:)``). A file naming a certificate outside this CA's hierarchy, or
    /// not PEM, is refused (logged, counted) and the taint in force stays; a removed file clears it.
    func reloadTaint() {
        let path = directory + "/" + RootCAStore.CACertsFile.tainted
        guard let data = FileManager.default.contents(atPath: path) else {
            if !ca.tainted.isEmpty { ca.taint([]) }
            return
        }
        let authority = ca.activeAuthority
        let text = String(decoding: data, as: UTF8.self)
        if text.allSatisfy(\.isWhitespace) {
            // An empty file is no taint (a Secret key kept with no certificate in it).
            if !ca.tainted.isEmpty { ca.taint([]) }
            return
        }
        do {
            let certificates = try TaintedCertificates.load(
                pem: text, roots: ca.roots,
                intermediates: [authority.certificate] + authority.intermediates)
            ca.taint(certificates)
        } catch {
            Counter(label: "sds_agent_taint_refused_total").increment()
            logger.error(
                "TAINT FILE REFUSED; the taint in force stays",
                metadata: ["path": "\(path)", "error": "\(error)", "in_force": .number(ca.tainted.fingerprints.count)])
        }
    }

    /// Reads `ca-crl.pem` (Istio's name) and serves its lists in every validation context once
    /// they are checked (``RevocationLists/accept(_:for:current:now:)``); a list that is refused
    /// leaves the one in force, logged and counted. A removed file withdraws the lists.
    func reloadRevocation() async {
        let path = directory + "/" + RootCAStore.CACertsFile.revocation
        let current = ca.revocationLists
        guard let data = FileManager.default.contents(atPath: path) else {
            if !current.isEmpty {
                ca.setRevocationLists([])
                logger.notice("CRL file removed: validation contexts carry no CRL now", metadata: ["path": "\(path)"])
            }
            return
        }
        do {
            let candidates = try RevocationList.parseAll(pem: String(decoding: data, as: UTF8.self))
            guard candidates != current else { return }
            let inForce = RevocationLists.served(current, for: ca.activeAuthority)
            let accepted = try RevocationLists.accept(candidates, for: ca.activeAuthority, current: inForce, now: now())
            ca.setRevocationLists(accepted.lists)
            Counter(label: "sds_agent_crl_reloads_total").increment()
            logger.notice(
                "CRL in force; pushed to every validation context",
                metadata: [
                    "path": "\(path)", "issuers": .list(accepted.lists.map { "\($0.issuer)" }),
                    "revoked": .number(accepted.lists.reduce(0) { $0 + $1.revokedSerials.count }),
                    "only_verify_leaf_cert_crl": "\(accepted.onlyLeaf)",
                ])
            if accepted.lists.reduce(0, { $0 + $1.der.count }) > CAAnnouncement.maximumRevocationBytes {
                logger.warning(
                    "CRL larger than ca serve announces to agents in upstream mode (they serve none): split it or shorten it",
                    metadata: ["path": "\(path)", "limit_bytes": .number(CAAnnouncement.maximumRevocationBytes)])
            }
        } catch {
            Counter(label: "sds_agent_crl_refused_total").increment()
            logger.error(
                "CRL REFUSED; the one in force stays", metadata: ["path": "\(path)", "error": "\(error)", "in_force": .number(current.count)])
        }
    }

    /// Takes a new set of CA files: under the roots trusted now it signs at once; under a new
    /// root it is prepared (published beside the old). Returns true in that case: the caller
    /// activates it after the delay.
    func apply(_ fresh: SigningAuthority) -> Bool {
        let active = ca.activeAuthority
        guard fresh.certificate != active.certificate || fresh.intermediates != active.intermediates || fresh.roots != active.roots
        else { return false }
        if Set(fresh.roots).isSubset(of: Set(ca.roots)) {
            ca.replaceSigner(with: fresh)
            return false
        }
        ca.prepare(fresh)
        return true
    }
}
