import CertificateAuthority
import CoreMetrics
import FoundationEssentials
import Glibc
import Logging
import SDSModel
import SDSServer
import WorkloadServing
import Synchronization
import SwiftASN1
import X509

/// Other trust domains' roots (`--federated-bundle TD=FILE`), loaded at start (an unreadable file
/// fails the start, naming it) and watched: a valid change is served at once, pushed to every
/// stream; an invalid one is refused, logged and counted, and the previous roots stay.
///
/// A file is PEM certificates, or a SPIFFE trust bundle (JWKS whose keys with `"use":
/// "x509-svid"` carry the root in `x5c`), the format SPIRE's bundle endpoint serves.
package final class FederatedBundles: FederatedBundleSource {
    /// One federated trust domain and where its bundle is.
    package struct Source: Sendable, Hashable {
        package var trustDomain: String
        package var file: String

        /// Parses `TD=FILE`; nil when it is not that shape.
        package init?(_ text: String) {
            guard let equals = text.firstIndex(of: "="), equals != text.startIndex else { return nil }
            trustDomain = String(text[..<equals])
            file = String(text[text.index(after: equals)...])
            guard !file.isEmpty else { return nil }
        }

        package init(trustDomain: String, file: String) {
            self.trustDomain = trustDomain
            self.file = file
        }
    }

    private let sources: [Source]
    private let bundles: Mutex<[String: TrustBundle]>
    private let logger: Logger

    /// Loads every source; fails naming the first file that is not a bundle.
    package init(sources: [Source], logger: Logger) throws(ConfigurationError) {
        var loaded: [String: TrustBundle] = [:]
        for source in sources {
            do {
                loaded[source.trustDomain] = try Self.read(source)
            } catch {
                throw ConfigurationError(message: "--federated-bundle \(source.trustDomain)=\(source.file): \(error.message)")
            }
        }
        self.sources = sources
        self.bundles = Mutex(loaded)
        self.logger = logger
        for source in sources {
            logger.info(
                "federated trust bundle loaded",
                metadata: ["trust_domain": "\(source.trustDomain)", "file": "\(source.file)", "version": "\(loaded[source.trustDomain]?.version ?? "-")"])
        }
    }

    package func federatedBundles() -> [String: TrustBundle] { bundles.withLock { $0 } }

    /// Watches the files (``FileWatch``); calls `changed` after a bundle changed.
    package func watch(clock: some Clock<Duration> = ContinuousClock(), changed: @Sendable () -> Void) async {
        let failures = Counter(label: "sds_agent_federated_bundle_reload_failures_total")
        await FileWatch(paths: sources.map(\.file), clock: clock).run { files in
            for source in sources where files.contains(source.file) {
                do throws(ReadError) {
                    let bundle = try Self.read(source)
                    let previous = bundles.withLock { state -> TrustBundle? in
                        defer { state[source.trustDomain] = bundle }
                        return state[source.trustDomain]
                    }
                    guard previous?.version != bundle.version else { continue }
                    logger.notice(
                        "federated trust bundle changed; pushing it to every stream",
                        metadata: ["trust_domain": "\(source.trustDomain)", "file": "\(source.file)", "version": "\(bundle.version)"])
                    changed()
                } catch {
                    failures.increment()
                    logger.error(
                        "federated trust bundle changed but cannot be read; keeping the previous roots",
                        metadata: ["trust_domain": "\(source.trustDomain)", "file": "\(source.file)", "error": "\(error.message)"])
                }
            }
        }
    }

    package struct ReadError: Error {
        package var message: String
    }

    /// The roots in `source.file`: PEM, or a SPIFFE bundle (JWKS with `x5c`).
    package static func read(_ source: Source) throws(ReadError) -> TrustBundle {
        let data: Data
        do {
            data = Data(try InputFile.bytes(source.file))
        } catch {
            throw ReadError(message: "cannot read it: \(error.reason)")
        }
        let text = String(decoding: data, as: UTF8.self)
        var roots: [Certificate] = []
        if text.drop(while: { $0.isWhitespace }).hasPrefix("{") {
            struct Bundle: Decodable {
                struct Key: Decodable {
                    var use: String?
                    var x5c: [String]?
                }
                var keys: [Key]
            }
            guard let bundle = try? JSONDecoder().decode(Bundle.self, from: data)
            else { throw ReadError(message: "not a SPIFFE bundle (JSON with a \"keys\" list)") }
            for key in bundle.keys where key.use == "x509-svid" {
                guard let first = key.x5c?.first, let der = Data(base64Encoded: first),
                    let certificate = try? Certificate(derEncoded: Array(der))
                else { throw ReadError(message: "an x509-svid key without a certificate in x5c") }
                roots.append(certificate)
            }
        } else {
            guard let certificates = PEMCertificates.parse(text) else {
                throw ReadError(message: "not PEM certificates (truncated or malformed)")
            }
            roots = certificates
        }
        // Only CA certificates are roots: a leaf served as a trust anchor would let anyone holding
        // its key pass as that domain's peer in some verifiers, and means the file is not a bundle.
        let notCA = roots.filter { certificate in
            if case .isCertificateAuthority = try? certificate.extensions.basicConstraints { return false }
            return true
        }
        guard notCA.isEmpty else {
            throw ReadError(
                message: "holds \(notCA.count) certificate(s) that are not CAs (basicConstraints CA:TRUE missing), e.g. \(notCA[0].subject); only CA certificates are roots")
        }
        guard !roots.isEmpty else { throw ReadError(message: "holds no root certificate") }
        return TrustBundle(roots: roots, trustDomain: source.trustDomain)
    }
}
