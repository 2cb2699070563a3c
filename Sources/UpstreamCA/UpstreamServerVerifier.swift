import FoundationEssentials
import CertificateAuthority
import NIOCore
import NIOSSL
import SDSModel
import Synchronization
import SwiftASN1
import X509

/// Verifies the upstream CA's TLS certificate in place of BoringSSL's check, for two reasons:
///
/// - **One reference identity (RFC 6125).** swift-nio-ssl accepts a server certificate when *any*
///   SAN matches, the dialled IP address included, so `--upstream-ca-server-name wrong.example`
///   still connected to a CA whose certificate had the address as an IP SAN. Here the configured
///   name is the only identity checked (an IP SAN only when the name is itself an address).
/// - **Reasons in words.** A failed handshake reached the log as "closed the connection before
///   completing the HTTP/2 connection preface"; the last failure is kept here so the agent can
///   say "certificate not trusted" or "name does not match" with the names involved.
final class UpstreamServerVerifier: Sendable {
    /// Roots from `--upstream-ca-bundle`.
    let roots: [Certificate]
    /// Roots the CA sent in its last answer (over a connection this verifier passed): a root
    /// rotation at the CA moves its TLS certificate to the new root, and the agents, which
    /// learnt that root from the answers before it signs, keep connecting with no restart and no
    /// new bundle file.
    private let learned = Mutex<[Certificate]>([])
    /// The only identity the CA's certificate must carry.
    let referenceName: String
    private let now: @Sendable () -> Date
    private let lastFailure = Mutex<String?>(nil)

    init(roots: [Certificate], referenceName: String, now: @escaping @Sendable () -> Date) {
        self.roots = roots
        self.referenceName = referenceName
        self.now = now
    }

    /// Why the last TLS verification failed; nil once one succeeds. Calls on a channel in
    /// transient failure make no new handshake, so the reason is kept until one passes.
    var failure: String? { lastFailure.withLock { $0 } }

    /// Trusts `roots` (the CA's last answer) beside the bundle's.
    func trust(answered roots: [Certificate]) { learned.withLock { $0 = roots } }

    /// NIOSSL's custom verification callback.
    @Sendable func callback(_ presented: [NIOSSLCertificate], _ promise: EventLoopPromise<NIOSSLVerificationResultWithMetadata>) {
        // The callback runs on the event loop and the verifier is async: the handshake waits on
        // the promise, which this task completes.
        promise.completeWithTask {
            let certificates = presented.compactMap { try? Certificate(derEncoded: $0.toDERBytes()) }
            guard certificates.count == presented.count, !certificates.isEmpty else {
                self.record("the CA's TLS certificate cannot be parsed")
                return .failed
            }
            switch await self.verify(certificates) {
            case .success(let chain):
                let validated = chain.compactMap { certificate -> NIOSSLCertificate? in
                    var serializer = DER.Serializer()
                    guard (try? serializer.serialize(certificate)) != nil else { return nil }
                    return try? NIOSSLCertificate(bytes: serializer.serializedBytes, format: .der)
                }
                guard validated.count == chain.count, !validated.isEmpty else { return .failed }
                self.lastFailure.withLock { $0 = nil }
                return .certificateVerified(VerificationMetadata(ValidatedCertificateChain(validated)))
            case .failure(let reason):
                self.record(reason.message)
                return .failed
            }
        }
    }

    struct Refusal: Error {
        var message: String
    }

    /// The chain from `presented` (leaf first) to a root, valid now and naming ``referenceName``.
    func verify(_ presented: [Certificate]) async -> Result<[Certificate], Refusal> {
        let leaf = presented[0]
        let time = now()
        let intermediates = CertificateStore(presented.dropFirst())
        let isAddress = SigningAuthority.addressBytes(referenceName) != nil
        let identity = ServerIdentityPolicy(serverHostname: isAddress ? nil : referenceName, serverIP: isAddress ? referenceName : nil)
        let roots = self.roots + learned.withLock { $0 }
        var verifier = Verifier(rootCertificates: CertificateStore(roots)) {
            RFC5280Policy(fixedValidationTime: time)
            identity
        }
        if case .validCertificate(let chain) = await verifier.validate(leaf: leaf, intermediates: intermediates) {
            return .success(Array(chain))
        }
        // Which of the two failed, for the log line.
        var trust = Verifier(rootCertificates: CertificateStore(roots)) { RFC5280Policy(fixedValidationTime: time) }
        guard case .validCertificate = await trust.validate(leaf: leaf, intermediates: intermediates) else {
            return .failure(Refusal(message: "certificate not trusted: the CA's TLS certificate (\(leaf.subject)) does not verify to --upstream-ca-bundle (nor to a root the CA sent)"))
        }
        let names = (try? leaf.extensions.subjectAlternativeNames).map { Array($0).map { "\($0)" } } ?? []
        return .failure(Refusal(message: "name does not match: the CA's TLS certificate names \(names), not \(referenceName)"))
    }

    private func record(_ reason: String) { lastFailure.withLock { $0 = reason } }
}

