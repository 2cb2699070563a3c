import CoreMetrics
import CPKCS11
import Crypto
import FoundationEssentials
import Logging
import SDSModel
import Synchronization
import SwiftASN1
import X509

/// A CA's signing key that stays in a PKCS#11 token (an HSM, a cloud KMS's PKCS#11 library,
/// SoftHSM): swift-certificates signs certificates with it as with any key
/// (`Certificate.PrivateKey(customKey)`), and every signature is the token's `C_Sign`. The
/// private key is never read. ECDSA P-256/P-384 (the digest hashed here, `CKM_ECDSA`, as SoftHSM
/// needs) and RSA PKCS#1 v1.5 with SHA-256 (`CKM_RSA_PKCS` over the DigestInfo).
///
/// A token that goes away (removed, its session closed, a module error) fails the signature with
/// ``TokenError/Kind/unavailable``: counted, logged, and the next signature first re-initialises
/// the module (`C_Finalize` + `C_Initialize`; SoftHSM needs it), opens a session and logs in
/// again, so issuance recovers by itself once the token is back.
public struct PKCS11PrivateKey: CustomPrivateKey {
    let session: TokenSession
    public let publicKey: Certificate.PublicKey
    public let defaultSignatureAlgorithm: Certificate.SignatureAlgorithm
    public var supportedSignatureAlgorithms: [Certificate.SignatureAlgorithm] { [defaultSignatureAlgorithm] }

    /// The URI, without its PIN.
    public var uri: String { session.uri.description }

    /// Opens `uri`'s key for the CA certificate `certificate` and checks them: a key type this
    /// CA signs with, and a test signature that `certificate`'s key verifies. `defaultModule`
    /// is `--pkcs11-module`, for a URI with no `module-path`. Each failure is one sentence that
    /// names the URI without the PIN.
    public static func open(uri text: String, for certificate: Certificate, defaultModule: String?) throws(TokenError) -> PKCS11PrivateKey {
        let uri: PKCS11URI
        do {
            uri = try PKCS11URI(parsing: text)
        } catch {
            throw TokenError(.configuration, "\(PKCS11URI.redactingPIN(text)): \(error.message)")
        }
        func fail(_ error: TokenError) -> TokenError { TokenError(error.kind, "\(uri): \(error.message)", code: error.code.map { CK_RV($0) }) }
        guard let modulePath = uri.modulePath ?? defaultModule else {
            throw TokenError(.configuration, "\(uri): no module: give module-path= in the URI or --pkcs11-module")
        }
        let session: TokenSession
        do {
            session = try TokenSession(uri: uri, library: PKCS11Library.load(modulePath))
        } catch {
            throw fail(error)
        }
        let algorithm: Certificate.SignatureAlgorithm
        switch (session.keyType, certificate.publicKey) {
        case (CK_KEY_TYPE(CKK_EC), let key) where P256.Signing.PublicKey(key) != nil: algorithm = .ecdsaWithSHA256
        case (CK_KEY_TYPE(CKK_EC), let key) where P384.Signing.PublicKey(key) != nil: algorithm = .ecdsaWithSHA384
        case (CK_KEY_TYPE(CKK_RSA), _): algorithm = .sha256WithRSAEncryption
        default:
            throw TokenError(.configuration, "\(uri): a key type this CA does not sign with (EC P-256, EC P-384 and RSA are)")
        }
        let key = PKCS11PrivateKey(session: session, publicKey: certificate.publicKey, defaultSignatureAlgorithm: algorithm)
        let probe = Array("sds-agent: does the token's key match the CA certificate?".utf8)
        let signature: [UInt8]
        do {
            signature = try key.rawSignature(of: probe, algorithm: algorithm)
        } catch {
            throw fail(error)
        }
        guard certificate.publicKey.isValidSignature(signature, for: probe, signatureAlgorithm: algorithm) else {
            throw TokenError(.configuration, "\(uri): the token's key does not match the CA certificate (a test signature does not verify)")
        }
        return key
    }

    public func signSynchronously(bytes: some DataProtocol, signatureAlgorithm: Certificate.SignatureAlgorithm) throws -> Certificate.Signature {
        let raw = try rawSignature(of: bytes, algorithm: signatureAlgorithm)
        return try Certificate.Signature(signatureAlgorithm: signatureAlgorithm, signatureBytes: ASN1BitString(bytes: raw[...]))
    }

    /// The signature as X.509 carries it: an ECDSA one DER-encoded (the token returns r || s).
    func rawSignature(of bytes: some DataProtocol, algorithm: Certificate.SignatureAlgorithm) throws(TokenError) -> [UInt8] {
        do {
            switch algorithm {
            case .ecdsaWithSHA256:
                let signed = try session.sign(Array(SHA256.hash(data: bytes)), mechanism: CK_MECHANISM_TYPE(CKM_ECDSA))
                return try Array(P256.Signing.ECDSASignature(rawRepresentation: signed).derRepresentation)
            case .ecdsaWithSHA384:
                let signed = try session.sign(Array(SHA384.hash(data: bytes)), mechanism: CK_MECHANISM_TYPE(CKM_ECDSA))
                return try Array(P384.Signing.ECDSASignature(rawRepresentation: signed).derRepresentation)
            case .sha256WithRSAEncryption:
                return try session.sign(Self.sha256DigestInfo + Array(SHA256.hash(data: bytes)), mechanism: CK_MECHANISM_TYPE(CKM_RSA_PKCS))
            default:
                throw TokenError(.configuration, "\(session.uri): cannot sign with \(algorithm)")
            }
        } catch let error as TokenError {
            throw error
        } catch {
            throw TokenError(.unavailable, "\(session.uri): the token's signature is malformed: \(error)")
        }
    }

    /// DigestInfo ::= SEQUENCE { AlgorithmIdentifier sha256 NULL, OCTET STRING (32) }, before the hash.
    static let sha256DigestInfo: [UInt8] = [0x30, 0x31, 0x30, 0x0D, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20]

    // Never exported: the key does not leave the token.
    public static let defaultPEMDiscriminator = "PRIVATE KEY"
    public func serialize(into coder: inout DER.Serializer) throws {
        throw TokenError(.configuration, "\(session.uri): a key in a PKCS#11 token is not exported")
    }

    public static func == (lhs: PKCS11PrivateKey, rhs: PKCS11PrivateKey) -> Bool { lhs.session === rhs.session }
    public func hash(into hasher: inout Hasher) { hasher.combine(ObjectIdentifier(session)) }
}

/// One key's session in its token, opened again (after re-initialising the module when no other
/// key did since) whenever a call fails.
final class TokenSession: Sendable {
    let uri: PKCS11URI
    let library: PKCS11Library
    let keyType: CK_KEY_TYPE
    private struct Open {
        var session: CK_SESSION_HANDLE
        var key: CK_OBJECT_HANDLE
        /// The module's initialisation it was opened under.
        var generation: Int
        /// False after a failure: the next call opens it again.
        var healthy = true
    }
    /// Guarded by the library's lock.
    private let state: Mutex<Open>
    private static let errors = Counter(label: "sds_agent_pkcs11_errors_total")
    private static let recoveries = Counter(label: "sds_agent_pkcs11_recoveries_total")
    private static let logger = Logger(label: "sds-agent.pkcs11")

    init(uri: PKCS11URI, library: PKCS11Library) throws(TokenError) {
        self.uri = uri
        self.library = library
        let (open, keyType) = try library.lock.withLock { (generation: inout Int) throws(TokenError) in
            let (session, key, keyType) = try Self.open(uri, library)
            return (Open(session: session, key: key, generation: generation), keyType)
        }
        self.keyType = keyType
        self.state = Mutex(open)
    }

    deinit {
        let open = state.withLock { $0 }
        library.lock.withLock { generation in
            if open.healthy, open.generation == generation { library.closeSession(open.session) }
        }
    }

    /// Slot, session, login, key: what a session needs. The PIN is read here (a PIN file may change).
    private static func open(_ uri: PKCS11URI, _ library: PKCS11Library) throws(TokenError) -> (CK_SESSION_HANDLE, CK_OBJECT_HANDLE, CK_KEY_TYPE) {
        let pin = try Self.pin(uri)
        let slot = try library.slot(token: uri.token, slotID: uri.slotID)
        let session = try library.openSession(slot: slot, pin: pin)
        do {
            let (key, type) = try library.privateKey(in: session, label: uri.object, id: uri.id)
            return (session, key, type)
        } catch {
            library.closeSession(session)
            throw error
        }
    }

    private static func pin(_ uri: PKCS11URI) throws(TokenError) -> [UInt8] {
        if let value = uri.pinValue { return Array(value.utf8) }
        guard let source = uri.pinSource else { return [] }
        do {
            let text = try InputFile.text(source)
            return Array((text.split(separator: "\n", omittingEmptySubsequences: false).first ?? "").utf8)
        } catch {
            throw TokenError(.configuration, "cannot read pin-source \(source): \(error.reason)")
        }
    }

    func sign(_ data: [UInt8], mechanism: CK_MECHANISM_TYPE) throws(TokenError) -> [UInt8] {
        try library.lock.withLock { (generation: inout Int) throws(TokenError) -> [UInt8] in
            var open = state.withLock { $0 }
            if !open.healthy || open.generation != generation {
                open = try reopen(&generation, after: open)
            }
            do throws(TokenError) {
                return try library.sign(data, mechanism: mechanism, key: open.key, session: open.session)
            } catch {
                state.withLock { $0.healthy = false }
                Self.errors.increment()
                Self.logger.error(
                    "PKCS#11 TOKEN FAILED A SIGNATURE; the next one re-opens it (issuance answers unavailable meanwhile)",
                    metadata: ["uri": "\(uri)", "error": "\(error.message)"])
                throw TokenError(.unavailable, "\(uri): \(error.message)", code: error.code.map { CK_RV($0) })
            }
        }
    }

    /// Opens the session again; when the module has not been re-initialised since this session
    /// failed (its generation is the current one), re-initialises it first.
    private func reopen(_ generation: inout Int, after failed: Open) throws(TokenError) -> Open {
        if !failed.healthy, failed.generation == generation {
            do {
                try library.reinitialize()
            } catch {
                Self.errors.increment()
                throw TokenError(.unavailable, "\(uri): \(error.message)")
            }
            generation += 1
        }
        do {
            let (session, key, _) = try Self.open(uri, library)
            let open = Open(session: session, key: key, generation: generation)
            state.withLock { $0 = open }
            Self.recoveries.increment()
            Self.logger.notice("PKCS#11 token answers again; signing with it", metadata: ["uri": "\(uri)"])
            return open
        } catch {
            // Not open under this initialisation either: the next call re-initialises again, since
            // SoftHSM sees a token that came back only at C_Initialize (a reopen alone never does).
            state.withLock { $0.generation = generation; $0.healthy = false }
            Self.errors.increment()
            throw TokenError(.unavailable, "\(uri): \(error.message)")
        }
    }
}

/// Process-wide PKCS#11 settings: `--pkcs11-module`, the module for URIs without `module-path`.
public enum PKCS11Settings {
    private static let module = Mutex<String?>(nil)
    public static var defaultModule: String? {
        get { module.withLock { $0 } }
        set { module.withLock { $0 = newValue } }
    }
}
