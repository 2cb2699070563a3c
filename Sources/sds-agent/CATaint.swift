import ArgumentParser
import CertificateAuthority
import FoundationEssentials
import Glibc
import SDSModel
import X509

/// `sds-agent ca taint DIR CERT`: declares a CA certificate compromised by adding it to
/// `DIR/tainted-certs.pem` (SPIRE's taint), checked against the CA in DIR first.
struct CATaint: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "taint",
        abstract: "Declare a CA certificate (an intermediate or a root of the CA in DIR) compromised: add it to DIR/tainted-certs.pem.",
        discussion: """
            Every replica of `ca serve --ca-dir` and every agent with `serve --ca-dir` reading DIR
            then refuses to sign under it, and every agent re-issues each leaf under it within
            --taint-reissue-window (upstream agents learn it from the CA's answers). Put a
            replacement in DIR first (a new intermediate, or a new root already in the bundle),
            or the CA refuses every CSR until there is one. For a Kubernetes Secret, run this on
            a copy of its files and update the Secret from it.
            """)

    @Argument(help: "The CA directory (Istio's cacerts layout).")
    var directory: String

    @Argument(help: "PEM file of the CA certificate to taint.")
    var certificate: String

    func run() async throws {
        do {
            try taint()
        } catch {
            printToStandardError("sds-agent ca taint: \(error)")
            throw ExitCode.failure
        }
    }

    private func taint() throws {
        let authority = try RootCAStore.load(caDirectory: directory)
        let path = directory + "/" + RootCAStore.CACertsFile.tainted
        let existing = (try? InputFile.text(path)) ?? ""
        let added: String
        do throws(InputFileError) {
            added = try InputFile.text(certificate)
        } catch {
            throw TaintError("cannot read \(certificate): \(error.reason)")
        }
        guard let new = PEMCertificates.parse(added), new.count == 1 else {
            throw TaintError("\(certificate) is not one PEM certificate")
        }
        let all = try TaintedCertificates.load(
            pem: existing + added, roots: authority.roots, intermediates: [authority.certificate] + authority.intermediates)
        var unique: [String] = []
        for pem in all.compactMap({ try? $0.pem() }) where !unique.contains(pem) { unique.append(pem) }
        try AtomicFile.write(unique.joined(), to: path, mode: 0o644)
        let fingerprint = TaintedCertificates.fingerprint(new[0])
        print("tainted \(new[0].subject) (sha256 \(fingerprint)): \(path) now lists \(unique.count) certificate(s)")
        if TaintedCertificates(all).affects(authority) {
            print("warning: the CA in \(directory) signs under it: it refuses every CSR until a replacement is there")
        }
    }
}
