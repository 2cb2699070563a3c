import CertificateAuthority
import CoreMetrics
import FoundationEssentials
import GRPCCore
import Logging
import SDSModel
import Synchronization
import SwiftASN1
import X509

/// What the upstream CA says about trust, beside the certificates it signs: the roots (from
/// every answer, and from `ca serve`'s announcement in its probe answers), the taint, and the
/// revocation lists `ca serve` announces. Replicas that see different CA directories for a
/// moment (a Secret reaching pods one by one) must not make any of it flap: the roots are the
/// union of the replicas' last answers, and each issuer's list the newest any replica sent.
extension UpstreamCA {
    /// The roots from the CA's last answer. Before the first answer (and with none kept from a
    /// previous run) it waits up to `issueDeadline` for one, then returns an empty bundle.
    public func trustBundle() async -> TrustBundle {
        if state.withLock({ $0.roots.isEmpty }) {
            await waitForRoots(upTo: configuration.issueDeadline)
        }
        return TrustBundle(roots: servedRoots, trustDomain: configuration.trustDomain, revocation: servedRevocation)
    }

    /// The CA's roots less the tainted ones dropped (``dropTaintedRoots()``).
    var servedRoots: [Certificate] {
        state.withLock { state in state.roots.filter { !state.dropped.contains(TaintedCertificates.fingerprint($0)) } }
    }

    /// The roots the CA sent last (tainted ones included), for the taint check of a chain.
    public var roots: [Certificate] { state.withLock { $0.roots } }

    /// The certificates the CA said are tainted in its last answer.
    public var tainted: TaintedCertificates { state.withLock { $0.tainted } }

    /// Leaves tainted roots out of the bundle while a clean one is there; returns whether that
    /// changed it. Called once no leaf served chains to them.
    @discardableResult
    public func dropTaintedRoots() -> Bool {
        let changed = state.withLock { state -> Bool in
            let tainted = state.roots.filter(state.tainted.contains).map(TaintedCertificates.fingerprint)
            guard !tainted.isEmpty, state.roots.contains(where: { !state.tainted.contains($0) }) else { return false }
            let before = state.dropped
            state.dropped.formUnion(tainted)
            return state.dropped != before
        }
        if changed {
            logger.notice("upstream CA taint: tainted root(s) left out of the trust bundle; no leaf served chains to them")
            onChange(.bundleChanged)
        }
        return changed
    }

    /// Takes the roots a replica announced in a probe's answer (`ca serve` sends them with every
    /// answer; istiod does not), as its CSR answers would bring them: a new root reaches the
    /// bundle within the probe interval, not at the next CSR of a quiet agent.
    func learnRoots(from metadata: Metadata, of replica: UpstreamReplicas.Replica) {
        var roots: [Certificate] = []
        for value in metadata[binaryValues: CAAnnouncement.rootsKey].prefix(CAAnnouncement.maximumRoots) {
            guard let root = try? Certificate(derEncoded: value), root.issuer == root.subject else { return }
            roots.append(root)
        }
        guard !roots.isEmpty else { return }
        adopt(roots: roots, from: replica.endpoint)
    }

    /// Takes the taint the CA announced in an answer's metadata. `answered`: the CA itself
    /// answered (so no key means no taint); otherwise only a value present counts.
    func learnTaint(from metadata: Metadata, answered: Bool) {
        let value = metadata[stringValues: TaintedCertificates.metadataKey].first(where: { _ in true })
        guard value != nil || answered else { return }
        guard let announced = value.map({ TaintedCertificates(metadataValue: $0) }) ?? TaintedCertificates.none else {
            logger.debug("upstream CA: ignored a malformed taint announcement")
            return
        }
        let changed = state.withLock { state -> Bool in
            guard state.tainted != announced else { return false }
            state.tainted = announced
            state.dropped = state.dropped.intersection(announced.fingerprints)
            return true
        }
        guard changed else { return }
        logger.notice(
            announced.isEmpty ? "upstream CA taint cleared" : "upstream CA taint: the CA declared certificates compromised; leaves under them are re-issued",
            metadata: ["fingerprints": .list(announced.fingerprints.sorted())])
        onChange(.taintChanged)
    }

    /// A replica's answer older than this no longer holds a root in the bundle.
    static let answerMemory: TimeInterval = 600

    /// Takes the roots of `endpoint`'s answer. The bundle is the union of the last answers of the
    /// replicas that answer (each within ``answerMemory``), this one's first: a root leaves once no replica
    /// sends it any more, not when one replica that has not seen the update yet answers.
    func adopt(roots answered: [Certificate], from endpoint: String) {
        // A replica that does not answer now holds nothing in the bundle.
        let current = Set(replicas.all.filter { $0.reachable != false }.map(\.endpoint))
        let now = self.now()
        let (changed, waiters, roots) = state.withLock { state -> (Bool, [CheckedContinuation<Void, Never>], [Certificate]) in
            let waiters = Array(state.waiters.values)
            state.waiters = [:]
            state.rootsByReplica[endpoint] = (answered, now)
            state.rootsByReplica = state.rootsByReplica.filter {
                current.contains($0.key) && now.timeIntervalSince($0.value.at) < Self.answerMemory
            }
            var union = answered
            for (_, entry) in state.rootsByReplica.sorted(by: { $0.key < $1.key }) {
                for root in entry.roots where !union.contains(root) { union.append(root) }
            }
            guard Set(union) != Set(state.roots) else { return (false, waiters, union) }
            state.roots = union
            return (true, waiters, union)
        }
        for waiter in waiters { waiter.resume() }
        guard changed else { return }
        replicas.trust(answered: roots)
        logger.notice(
            "upstream CA: trust bundle changed; pushing it to every stream",
            metadata: [
                "roots": .number(roots.count), "serials": .list(roots.map { $0.serialNumber.hexString }),
            ])
        if let file = configuration.bundleCacheFile {
            let pem = TrustBundle(roots: roots, trustDomain: configuration.trustDomain).rootsPEM
            do {
                try AtomicFile.write(pem, to: file, mode: 0o644)
            } catch {
                logger.warning("upstream CA: cannot keep the trust bundle for a restart", metadata: ["path": "\(file)", "error": "\(error)"])
            }
        }
        onChange(.bundleChanged)
    }


    func waitForRoots(upTo limit: Duration) async {
        let id = state.withLock { state -> Int in
            state.nextWaiter += 1
            return state.nextWaiter
        }
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                await withCheckedContinuation { continuation in
                    let resumeNow = self.state.withLock { state -> Bool in
                        if !state.roots.isEmpty || state.expiredWaiters.remove(id) != nil { return true }
                        state.waiters[id] = continuation
                        return false
                    }
                    if resumeNow { continuation.resume() }
                }
            }
            group.addTask { try? await Task.sleep(for: limit) }
            await group.next()
            group.cancelAll()
            // Time is up (or roots came): release this waiter, or mark it so it never suspends.
            let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
                if let waiter = state.waiters.removeValue(forKey: id) { return waiter }
                state.expiredWaiters.insert(id)
                return nil
            }
            waiter?.resume()
        }
        state.withLock { _ = $0.expiredWaiters.remove(id) }
    }

    // MARK: - Revocation lists

    /// The lists served now: for each issuer the newest of the replicas' last announcements, as
    /// served for the chain of the last certificate issued (nil before one: which CA signs
    /// leaves, and so which list Envoy needs, is not known yet).
    var servedRevocation: RevocationLists? {
        state.withLock { state in
            guard let issuer = state.leafIssuer else { return nil }
            return RevocationLists.served(Self.newestPerIssuer(state), leafIssuer: issuer, chainAboveLeaf: state.chainAboveLeaf)
        }
    }

    private static func newestPerIssuer(_ state: State) -> [RevocationList] {
        var newest: [DistinguishedName: RevocationList] = [:]
        var order: [DistinguishedName] = []
        for (_, entry) in state.revocationByReplica.sorted(by: { $0.key < $1.key }) {
            for list in entry.lists {
                if let held = newest[list.issuer] {
                    if list.thisUpdate > held.thisUpdate { newest[list.issuer] = list }
                } else {
                    newest[list.issuer] = list
                    order.append(list.issuer)
                }
            }
        }
        return order.compactMap { newest[$0] }
    }

    /// Notes the chain of a certificate just issued: which CA signs leaves and what is above it
    /// decide which list the validation context needs (``RevocationLists/served(_:leafIssuer:chainAboveLeaf:)``).
    func noteIssued(chain: [Certificate]) {
        guard let leaf = chain.first else { return }
        let above = Array(chain.dropFirst())
        let changed = state.withLock { state -> Bool in
            guard state.leafIssuer != leaf.issuer || state.chainAboveLeaf != above else { return false }
            state.leafIssuer = leaf.issuer
            state.chainAboveLeaf = above
            return !state.revocationByReplica.values.allSatisfy(\.lists.isEmpty)
        }
        if changed { onChange(.bundleChanged) }
    }

    /// Takes the revocation lists a replica announced in an answer (`ca serve` sends the lists it
    /// serves; istiod none). Each must parse, be signed by a CA of the hierarchy (the roots and
    /// the CAs of the last chain issued) and not be past its `nextUpdate`; a refused announcement
    /// is logged and counted once and the lists in force stay.
    func learnRevocation(from metadata: Metadata, of endpoint: String) {
        let announced = metadata[binaryValues: CAAnnouncement.revocationKey].prefix(CAAnnouncement.maximumRevocationLists).map { Array($0) }
        let now = self.now()
        let (known, refused, hierarchy, verifiable) = state.withLock { state in
            (state.revocationByReplica[endpoint]?.lists.map(\.der), state.refusedRevocation, state.roots + state.chainAboveLeaf, state.leafIssuer != nil)
        }
        if known == announced {
            state.withLock { $0.revocationByReplica[endpoint]?.at = now }
            return
        }
        guard announced != refused else { return }
        let lists: [RevocationList]
        do {
            lists = try Self.check(announced, hierarchy: hierarchy, now: now)
        } catch {
            // Before the first certificate the intermediates are not known: not a refusal yet.
            guard verifiable else { return }
            state.withLock { $0.refusedRevocation = announced }
            Counter(label: "sds_agent_crl_refused_total").increment()
            logger.error("upstream CA: CRL REFUSED; the one in force stays", metadata: ["endpoint": "\(endpoint)", "error": "\(error)"])
            return
        }
        let current = Set(replicas.all.filter { $0.reachable != false }.map(\.endpoint)).union([endpoint])
        let (before, after) = state.withLock { state in
            let before = Self.newestPerIssuer(state)
            state.refusedRevocation = nil
            state.revocationByReplica[endpoint] = (lists, now)
            state.revocationByReplica = state.revocationByReplica.filter {
                current.contains($0.key) && now.timeIntervalSince($0.value.at) < Self.answerMemory
            }
            return (before, Self.newestPerIssuer(state))
        }
        guard before != after else { return }
        Counter(label: "sds_agent_crl_reloads_total").increment()
        logger.notice(
            after.isEmpty ? "upstream CA: no CRL announced any more; validation contexts carry none" : "upstream CA: CRL in force; pushed to every validation context",
            metadata: [
                "endpoint": "\(endpoint)", "issuers": .list(after.map { "\($0.issuer)" }),
                "revoked": .number(after.reduce(0) { $0 + $1.revokedSerials.count }),
            ])
        onChange(.bundleChanged)
    }

    private static func check(_ announced: [[UInt8]], hierarchy: [Certificate], now: Date) throws(RevocationListError) -> [RevocationList] {
        var lists: [RevocationList] = []
        for der in announced {
            let list = try RevocationList(derEncoded: der)
            guard hierarchy.contains(where: { list.isSigned(by: $0) }) else {
                throw RevocationListError("the CRL of \(list.issuer) is not signed by a CA of the hierarchy this agent knows")
            }
            if let nextUpdate = list.nextUpdate, nextUpdate < now {
                throw RevocationListError("the CRL of \(list.issuer) expired at \(nextUpdate.formatted(.iso8601)) (nextUpdate)")
            }
            lists.append(list)
        }
        return lists
    }
}
