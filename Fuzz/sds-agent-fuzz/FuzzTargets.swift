import CertificateAuthority
import Crypto
import EnvoyAPI
import Foundation
import SDSAgent
import SDSModel
import SDSServer
import SwiftASN1
import SwiftProtobuf
import TestSupport
import WorkloadAuthentication
import X509

/// The fuzz targets: each takes arbitrary bytes and must never trap, and checks the invariants
/// that must hold whatever the input. One binary serves them all; `SDS_FUZZ_TARGET` picks one.
enum FuzzTarget: String, CaseIterable {
    /// Token parsing and verification: a JWT from bytes through the verifier with a fixed key.
    case token
    /// The SotW state machine fed a DiscoveryRequest decoded from the bytes, then arbitrary steps.
    case sotw
    /// The Delta state machine, the same way.
    case delta
    /// CSR, certificate, CRL and PEM parsing in the CA, and the CSR policy.
    case csr
    /// Duration and configuration-value parsing, and the escaping of caller text.
    case config
    /// A TLS server's first flight as a peer sends it (`--tls-policy`), whole and in pieces.
    case tls

    func run(_ data: Data) {
        switch self {
        case .token: Self.token(data)
        case .sotw: Self.sotw(data)
        case .delta: Self.delta(data)
        case .csr: Self.csr(data)
        case .config: Self.config(data)
        case .tls: Self.tls(data)
        }
    }

    // MARK: token

    /// A fixed key, so a seed token signed with it reaches the claim checks.
    static let tokens = TokenFactory(
        kid: "fuzz-key", key: try! P256.Signing.PrivateKey(rawRepresentation: Data(repeating: 7, count: 32)))
    /// A fixed clock inside the seed token's lifetime.
    static let now = Date(timeIntervalSince1970: 1_800_000_000)
    static let verifier: KubernetesTokenVerifier = {
        let keys = blocking { try! await VerificationKeySet(jwksJSON: tokens.jwksJSON()) }
        return KubernetesTokenVerifier(
            configuration: .init(trustDomain: "cluster.local", issuers: [TokenFactory.issuer], audiences: [TokenFactory.audience]),
            keys: keys, now: { now })
    }()

    static func token(_ data: Data) {
        let text = String(decoding: data, as: UTF8.self)
        let result = blocking { () -> Result<AuthenticatedCaller, AuthenticationError> in
            do throws(AuthenticationError) {
                return .success(try await verifier.authenticate(token: text))
            } catch {
                return .failure(error)
            }
        }
        switch result {
        case .success(let caller):
            // Only a token really signed by the key gets through, and then names a valid identity.
            precondition(caller.spiffeID.description.hasPrefix("spiffe://cluster.local/ns/"))
        case .failure(let error):
            precondition(!error.message.isEmpty)
        }
    }

    // MARK: state machines

    static func sotw(_ data: Data) {
        var reader = ByteReader(data)
        var machine = StreamStateMachine()
        var lastNonce: UInt64 = 0
        var requests = 0
        var errors = 0
        if let decoded = try? Envoy_Service_Discovery_V3_DiscoveryRequest(serializedBytes: data) {
            requests += 1
            if decoded.hasErrorDetail { errors += 1 }
            check(machine.receive(.init(
                versionInfo: decoded.versionInfo, resourceNames: decoded.resourceNames, responseNonce: decoded.responseNonce,
                errorMessage: decoded.hasErrorDetail ? decoded.errorDetail.message : nil)))
        }
        while let step = reader.byte() {
            if step % 5 == 0 {
                if let action = machine.push() { check(action) }
                continue
            }
            let error = step % 3 == 0 ? reader.string() : nil
            requests += 1
            if error != nil { errors += 1 }
            let nonce = step % 2 == 0 ? String(lastNonce) : reader.string()
            check(machine.receive(.init(versionInfo: reader.string(), resourceNames: reader.names(), responseNonce: nonce, errorMessage: error)))
        }
        precondition(machine.rejections <= errors && errors <= requests)

        func check(_ action: StreamStateMachine.Action) {
            if case .respond(let names, let nonce) = action {
                let value = UInt64(nonce)!
                precondition(value == lastNonce + 1, "nonces increase one by one")
                precondition(names == machine.subscribed)
                lastNonce = value
            }
        }
    }

    static func delta(_ data: Data) {
        var reader = ByteReader(data)
        var machine = DeltaStreamStateMachine(wildcardNames: ["default", "ROOTCA"])
        if let decoded = try? Envoy_Service_Discovery_V3_DeltaDiscoveryRequest(serializedBytes: data) {
            _ = machine.receive(.init(
                subscribe: decoded.resourceNamesSubscribe, unsubscribe: decoded.resourceNamesUnsubscribe,
                initialVersions: decoded.initialResourceVersions, responseNonce: decoded.responseNonce,
                errorMessage: decoded.hasErrorDetail ? decoded.errorDetail.message : nil))
        }
        var sent: [String: String] = [:]
        while let step = reader.byte() {
            switch step % 4 {
            case 0:
                let action = machine.push()
                if case .evaluate(let names) = action { precondition(Set(names).isSubset(of: machine.subscribed)) }
            case 1:
                let versions = Dictionary(reader.names().map { ($0, reader.string()) }, uniquingKeysWith: { $1 })
                let changed = machine.changed(versions)
                precondition(Set(changed).isSubset(of: Set(versions.keys)))
                let nonce = machine.didSend(versions.filter { changed.contains($0.key) })
                sent[nonce] = nonce
            default:
                _ = machine.receive(.init(
                    subscribe: reader.names(), unsubscribe: reader.names(), initialVersions: [reader.string(): reader.string()],
                    responseNonce: step % 3 == 0 ? (sent.keys.first ?? "") : reader.string(),
                    errorMessage: step % 5 == 0 ? reader.string() : nil))
            }
        }
    }

    // MARK: CA parsing

    static let identity = try! SPIFFEID(parsing: "spiffe://cluster.local/ns/demo/sa/fuzz")

    static func csr(_ data: Data) {
        let bytes = Array(data)
        if let request = try? CertificateSigningRequest(derEncoded: bytes) {
            _ = CSRPolicy.evaluate(request, for: identity)
        }
        if let certificate = try? Certificate(derEncoded: bytes) {
            _ = try? certificate.extensions.subjectAlternativeNames
            _ = try? certificate.extensions.basicConstraints
        }
        let text = String(decoding: data, as: UTF8.self)
        if let request = try? CertificateSigningRequest(pemEncoded: text) {
            _ = CSRPolicy.evaluate(request, for: identity)
        }
        _ = try? Certificate(pemEncoded: text)
        _ = try? PEMDocument.parseMultiple(pemString: text)
        // Revocation lists come from an operator's file (`ca-crl.pem`), checked before use.
        let lists = ((try? RevocationList(derEncoded: bytes)).map { [$0] } ?? []) + ((try? RevocationList.parseAll(pem: text)) ?? [])
        for list in lists {
            _ = list.isSigned(by: crlIssuer.certificate)
            precondition(list.revokedSerials.allSatisfy { !$0.isEmpty })
            _ = try? RevocationLists.accept([list], for: crlIssuer, current: nil, now: now)
        }
    }

    /// A CA for the CRL checks (they fail for fuzzed lists; the point is that they do not trap).
    static let crlIssuer = TestPKI.authority()

    // MARK: configuration values

    static func config(_ data: Data) {
        let text = String(decoding: data, as: UTF8.self)
        if let duration = DurationText.parse(text) {
            precondition(duration >= .zero && duration <= DurationText.maximum)
        }
        _ = try? SPIFFEID(parsing: text)
        _ = SPIFFEID.isValidTrustDomain(text)
        _ = PeerCredentials(metadataValue: text)
        _ = MetricsEndpoint.address(text)
        if let address = HostPort(text) { precondition((1...65535).contains(address.port) && !address.host.isEmpty) }
        _ = BearerToken.token(in: text)
        let escaped = CallerText(bytes: data, limit: 64).description
        precondition(!escaped.unicodeScalars.contains { $0.value < 0x20 || (0x7F...0x9F).contains($0.value) })
        // At most `\u{XXXX}` (8) per kept character, and the note of what was cut.
        precondition(escaped.unicodeScalars.count <= 64 * 8 + 32)
    }
}

extension FuzzTarget {
    // MARK: TLS server flight

    /// The first byte sets the piece size; the flight read whole and fed in pieces must agree
    /// once either settles (the reading only ever looks at a prefix), and never trap.
    static func tls(_ data: Data) {
        guard let first = data.first else { return }
        let bytes = Array(data.dropFirst())
        let whole = TLSServerFlight.read(bytes[...])
        var flight = TLSServerFlight()
        var outcome = TLSServerFlight.Outcome.needMore
        let piece = Int(first % 64) + 1
        var offset = 0
        while offset < bytes.count, outcome == .needMore {
            outcome = flight.feed(bytes[offset..<min(offset + piece, bytes.count)])
            offset += piece
        }
        if case .settled = whole, bytes.count < TLSServerFlight.limit { precondition(outcome == whole, "\(outcome) != \(whole)") }
        if case .settled(let exchange) = outcome { _ = TLSPolicy.pqc.refusal(of: exchange) }
    }
}

/// Reads small values from fuzz input: bytes, short strings, short name lists.
struct ByteReader {
    var bytes: Data.SubSequence
    init(_ data: Data) { bytes = data[...] }

    mutating func byte() -> UInt8? {
        guard let first = bytes.first else { return nil }
        bytes = bytes.dropFirst()
        return first
    }

    mutating func string() -> String {
        let count = Int(byte() ?? 0) % 16
        let taken = bytes.prefix(count)
        bytes = bytes.dropFirst(count)
        return String(decoding: taken, as: UTF8.self)
    }

    mutating func names() -> [String] {
        (0..<Int(byte() ?? 0) % 4).map { _ in ["default", "ROOTCA", "*", string()][Int(byte() ?? 0) % 4] }
    }
}

/// Runs async work to completion from the fuzzer's synchronous entry point.
func blocking<T: Sendable>(_ work: @escaping @Sendable () async -> T) -> T {
    let box = ResultBox<T>()
    let done = DispatchSemaphore(value: 0)
    Task {
        box.value = await work()
        done.signal()
    }
    done.wait()
    return box.value!
}

final class ResultBox<T>: @unchecked Sendable {
    // Written once by the task before the semaphore is signalled, read after the wait.
    var value: T?
}
