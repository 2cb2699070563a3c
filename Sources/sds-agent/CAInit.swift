import ArgumentParser
import CertificateAuthority
import FoundationEssentials
import Glibc
import SDSModel

/// `sds-agent ca init DIR --trust-domain TD`: a CA in Istio's `cacerts` layout, for
/// `ca serve --ca-dir` replicas (or `serve --ca-dir`), ready for
/// `kubectl create secret generic cacerts --from-file=DIR`.
struct CAInit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Write a new CA in Istio's cacerts layout (an intermediate under a new or given root) for ca serve --ca-dir.",
        discussion: """
            DIR gets ca-cert.pem, ca-key.pem (mode 0600), cert-chain.pem and root-cert.pem, and
            nothing else, so `kubectl create secret generic cacerts -n NS --from-file=DIR` takes
            exactly the CA. A new root's key is written beside DIR (--root-key-out): keep it
            offline; it signs the next intermediate (`ca init NEWDIR --root-cert ... --root-key ...`).
            A directory that already holds a CA is refused.
            """)

    @Argument(help: "Directory to write the CA into (created with mode 0700; must not hold a CA already).")
    var directory: String

    @Option(help: "SPIFFE trust domain the CA issues for (its certificates carry spiffe://TD).")
    var trustDomain: String

    @Option(help: "Sign the intermediate with this root certificate instead of making a new root (intermediate rotation).")
    var rootCert: String?

    @Option(help: "The key of --root-cert.")
    var rootKey: String?

    @Option(help: "Where a new root's key is written (mode 0600; default DIR-root-key.pem, beside DIR and outside the Secret).")
    var rootKeyOut: String?

    @Option(help: ArgumentHelp("Lifetime of a new root, e.g. 87600h.", valueName: "duration"))
    var rootTtl: Duration = .seconds(10 * 365 * 24 * 3600)

    @Option(help: ArgumentHelp("Lifetime of the intermediate (at most the root's), e.g. 8760h.", valueName: "duration"))
    var caTtl: Duration = Defaults.Certificates.caTTL

    @Option(help: "Key type of the new keys.")
    var keyType: KeyType = .ecP256

    func validate() throws {
        guard (rootCert == nil) == (rootKey == nil) else { throw ValidationError("--root-cert and --root-key go together") }
        guard rootCert == nil || rootKeyOut == nil else { throw ValidationError("--root-key-out is for a new root; --root-cert names an existing one") }
        guard (try? SPIFFEID(parsing: "spiffe://\(trustDomain)")) != nil else {
            throw ValidationError("--trust-domain '\(trustDomain.callerText(limit: 128))' is not a SPIFFE trust domain")
        }
        guard caTtl >= .seconds(3600), rootTtl >= caTtl || rootCert != nil else {
            throw ValidationError("--ca-ttl must be at least 1h, and --root-ttl at least --ca-ttl")
        }
    }

    func run() async throws {
        let root: CACertsInit.Root
        var newRootKey: String?
        if let rootCert, let rootKey {
            root = .existing(certificateFile: rootCert, keyFile: rootKey)
        } else {
            let path = rootKeyOut ?? (directory.hasSuffix("/") ? String(directory.dropLast()) : directory) + "-root-key.pem"
            root = .new(ttl: rootTtl, keyFile: path)
            newRootKey = path
        }
        do {
            let notAfter = try CACertsInit.write(
                directory: directory, trustDomain: trustDomain, root: root, caTTL: caTtl, keyType: keyType, now: Date())
            print("wrote \(directory)/{ca-cert.pem,ca-key.pem,cert-chain.pem,root-cert.pem}: intermediate valid until \(notAfter.formatted(.iso8601))")
            if let newRootKey {
                print("wrote the new root's key to \(newRootKey): keep it offline; it signs the next intermediate")
            }
            print("next: kubectl create secret generic cacerts -n sds-agent --from-file=\(directory)")
        } catch {
            printToStandardError("sds-agent ca init: \(error)")
            throw ExitCode.failure
        }
    }
}
