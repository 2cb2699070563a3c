import CertificateAuthority
import Foundation
import Logging
import SDSModel
import X509

/// Issuance through the CA with its key in a PKCS#11 token against the same CA with the key in
/// process memory (issue 26): `EmbeddedCA.issue` with new CSRs, the CA loaded by the agent's own
/// `RootCAStore.load` from `--ca-cert` and `--ca-key` (a PEM file, or a `pkcs11:` URI), one at a
/// time and with `concurrency` in flight. scripts/bench.sh --pkcs11 makes a SoftHSM token, a key
/// inside it and the certificates.
struct CAKeyBench {
    let count: Int
    let concurrency: Int

    func run(fileCA: (cert: String, key: String), tokenCA: (cert: String, uri: String), report: inout Report) async throws {
        let identity = try SPIFFEID(parsing: "spiffe://cluster.local/ns/bench/sa/token")
        let csrs = try (0..<min(count, 500)).map { _ in try KeyFactory.makeCSR(for: identity, key: KeyFactory.generate(.ecP256)) }
        print("CA key in a PKCS#11 token (SoftHSM 2) against the key in memory: EmbeddedCA.issue, \(count) certificates")
        for (name, cert, key) in [("file", fileCA.cert, fileCA.key), ("token", tokenCA.cert, tokenCA.uri)] {
            let authority = try RootCAStore.load(certificateFile: cert, keyFile: key)
            let ca = EmbeddedCA(authority: authority, trustDomain: "cluster.local", logger: Logger(label: "bench"))
            for inFlight in [1, concurrency] {
                let started = ContinuousClock.now
                try await withThrowingTaskGroup(of: Void.self) { group in
                    var next = 0
                    func add() {
                        let csr = csrs[next % csrs.count]
                        next += 1
                        group.addTask { _ = try await ca.issue(csr: csr, for: identity, ttl: .seconds(3600), csrRules: .keyOnly) }
                    }
                    for _ in 0..<min(inFlight, count) { add() }
                    while try await group.next() != nil { if next < count { add() } }
                }
                let seconds = started.duration(to: .now).timeInterval
                let perSecond = Double(count) / seconds
                print(String(format: "  %@ key, %d in flight: %.0f certificates/s (%.3f ms each)", name, inFlight, perSecond, seconds / Double(count) * 1000))
                report["issue_\(name)_key_\(inFlight)_per_second"] = perSecond
            }
        }
    }
}
