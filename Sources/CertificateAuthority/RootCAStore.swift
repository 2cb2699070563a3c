import FoundationEssentials
import Glibc
import Logging
import SDSModel
import TokenKeys
import SwiftASN1
import X509

/// Where the embedded CA's signing material comes from: a state directory, or PEM files.
///
/// In a state directory the root is generated at first start and reused on every restart:
/// `<dir>/ca/root-cert.pem` and `<dir>/ca/root-key.pem` (mode 0600, directory 0700).
public enum RootCAStore {
    /// Loads the root from `stateDirectory`, or creates and persists one when none exists or the
    /// persisted one has expired.
    public static func loadOrCreate(
        stateDirectory: String, trustDomain: String, ttl: Duration, now: Date, logger: Logger, keyType: KeyType = .ecP256
    ) throws(CAStoreError) -> SigningAuthority {
        let directory = URL(fileURLWithPath: stateDirectory).appendingPathComponent("ca")
        let certPath = directory.appendingPathComponent("root-cert.pem").path
        let keyPath = directory.appendingPathComponent("root-key.pem").path
        let fm = FileManager.default

        if fm.fileExists(atPath: certPath) || fm.fileExists(atPath: keyPath) {
            // Checked here, not by the loader: an expired root of our own is replaced, not refused.
            var authority = try load(certificateFile: certPath, keyFile: keyPath, bundleFile: nil, roots: nil, now: nil)
            // The file's first root signs; the others (a rotation not finished) come back through
            // `additionalRoots`, to be retired when their last leaf expires.
            authority.roots = [authority.certificate]
            authority.intermediates = []
            if authority.certificate.notValidAfter > now {
                logger.info(
                    "loaded embedded CA root",
                    metadata: [
                        "path": "\(certPath)", "serial": "\(authority.certificate.serialNumber.hexString)",
                        "not_after": "\(authority.certificate.notValidAfter.formatted(.iso8601))",
                    ])
                return authority
            }
            logger.warning(
                "persisted CA root has expired; generating a new one (workloads must fetch the new bundle)",
                metadata: ["path": "\(certPath)", "expired_at": "\(authority.certificate.notValidAfter.formatted(.iso8601))"])
        }

        let authority: SigningAuthority
        do {
            authority = try SigningAuthority.makeSelfSignedRoot(trustDomain: trustDomain, ttl: ttl, now: now, keyType: keyType)
        } catch {
            throw CAStoreError("cannot generate a root CA: \(error)")
        }
        do {
            try makeDirectory(directory.path, mode: 0o700)
            let keyPEM = try KeyFactory.pem(of: authority.privateKey)
            let certPEM = try authority.certificate.pem()
            // The key is written to a 0600 temporary file and renamed, so it is never readable by others.
            try writeAtomically(keyPEM, to: keyPath, mode: 0o600)
            try writeAtomically(certPEM, to: certPath, mode: 0o644)
        } catch let error as CAStoreError {
            throw error
        } catch {
            throw CAStoreError("cannot persist the root CA in \(directory.path): \(error)")
        }
        logger.notice(
            "generated embedded CA root",
            metadata: [
                "path": "\(certPath)", "serial": "\(authority.certificate.serialNumber.hexString)",
                "not_after": "\(authority.certificate.notValidAfter.formatted(.iso8601))",
            ])
        return authority
    }

    /// Persists the roots after a rotation step: `root-key.pem` is the active root's key;
    /// `root-cert.pem` holds the active root first, then every other root trusted now (what a
    /// client of `ca serve` takes as its trust bundle: it verifies the CA's TLS certificate
    /// before and after the new root signs); `trust-bundle.pem` holds every trusted root, so a
    /// restart signs with the active root and still trusts the others until they retire.
    public static func persist(active: SigningAuthority, roots: [Certificate], stateDirectory: String) throws(CAStoreError) {
        let directory = URL(fileURLWithPath: stateDirectory).appendingPathComponent("ca")
        do {
            let keyPEM = try KeyFactory.pem(of: active.privateKey)
            let certPEM = try ([active.certificate] + roots.filter { $0 != active.certificate }).map { try $0.pem() }.joined()
            let bundlePEM = try roots.map { try $0.pem() }.joined()
            try writeAtomically(bundlePEM, to: directory.appendingPathComponent("trust-bundle.pem").path, mode: 0o644)
            try writeAtomically(keyPEM, to: directory.appendingPathComponent("root-key.pem").path, mode: 0o600)
            try writeAtomically(certPEM, to: directory.appendingPathComponent("root-cert.pem").path, mode: 0o644)
        } catch let error as CAStoreError {
            throw error
        } catch {
            throw CAStoreError("cannot persist the rotated root in \(directory.path): \(error)")
        }
    }

    /// Roots trusted besides the active one (from an unfinished rotation), still valid at `now`.
    public static func additionalRoots(stateDirectory: String, now: Date) -> [Certificate] {
        let path = URL(fileURLWithPath: stateDirectory).appendingPathComponent("ca/trust-bundle.pem").path
        guard FileManager.default.fileExists(atPath: path), let roots = try? readCertificates(path) else { return [] }
        return roots.filter { $0.notValidAfter > now }
    }

    /// The files of Istio's `cacerts` layout (`--ca-dir`): the signing certificate (usually an
    /// intermediate), its key, the chain up to the root, and the root(s).
    public enum CACertsFile {
        public static let certificate = "ca-cert.pem"
        public static let key = "ca-key.pem"
        public static let chain = "cert-chain.pem"
        public static let root = "root-cert.pem"
        /// Revocation lists (Istio 1.27's plug-in CA name); optional, checked on its own.
        public static let revocation = "ca-crl.pem"
        /// CA certificates declared compromised (SPIRE's taint); optional, checked on its own.
        public static let tainted = "tainted-certs.pem"
        public static let all = [certificate, key, chain, root]
    }

    /// Loads and checks a CA in Istio's `cacerts` layout; every error names the file.
    /// `cert-chain.pem` may start with `ca-cert.pem` and end with the root (as Istio writes it);
    /// both are recognised and not served twice.
    public static func load(caDirectory directory: String, now: Date = Date()) throws(CAStoreError) -> SigningAuthority {
        func path(_ name: String) -> String { directory + "/" + name }
        let chain = FileManager.default.fileExists(atPath: path(CACertsFile.chain)) ? try readCertificates(path(CACertsFile.chain)) : []
        let roots = try readCertificates(path(CACertsFile.root))
        guard !roots.isEmpty else { throw CAStoreError("\(path(CACertsFile.root)) holds no certificate") }
        var authority = try load(certificateFile: path(CACertsFile.certificate), keyFile: path(CACertsFile.key), bundleFile: nil, roots: roots, now: nil)
        authority.intermediates = chain.filter { $0 != authority.certificate && !roots.contains($0) }
        try check(authority, certificateFile: path(CACertsFile.certificate), bundleFile: path(CACertsFile.root), now: now)
        return authority
    }

    /// Loads signing material from PEM files, and checks it (``check(_:certificateFile:bundleFile:now:)``).
    /// The certificate file holds the signing certificate first, then any intermediates; the last
    /// self-signed certificate in it is the root. When the file has no self-signed certificate,
    /// `bundleFile` must name the roots.
    public static func load(certificateFile: String, keyFile: String, bundleFile: String? = nil, now: Date = Date())
        throws(CAStoreError) -> SigningAuthority
    {
        try load(certificateFile: certificateFile, keyFile: keyFile, bundleFile: bundleFile, roots: nil, now: now)
    }

    /// `roots` given: they are the trust anchors; `now` nil: the caller checks the result.
    private static func load(certificateFile: String, keyFile: String, bundleFile: String?, roots givenRoots: [Certificate]?, now: Date?)
        throws(CAStoreError) -> SigningAuthority
    {
        let certificates = try readCertificates(certificateFile)
        guard let signing = certificates.first else { throw CAStoreError("\(certificateFile) holds no certificate") }
        let key = try signingKey(keyFile, for: signing, certificateFile: certificateFile)
        let selfSigned = certificates.filter { $0.issuer == $0.subject }
        let roots: [Certificate]
        if let givenRoots {
            roots = givenRoots
        } else if let bundleFile {
            roots = try readCertificates(bundleFile)
        } else {
            roots = selfSigned
        }
        guard !roots.isEmpty else {
            throw CAStoreError("\(certificateFile) has no self-signed root; name the roots with a bundle file")
        }
        let intermediates = certificates.dropFirst().filter { $0.issuer != $0.subject }
        let authority = SigningAuthority(certificate: signing, privateKey: key, intermediates: Array(intermediates), roots: roots)
        if let now { try check(authority, certificateFile: certificateFile, bundleFile: bundleFile, now: now) }
        return authority
    }

    /// The CA's signing key: a PEM file, or a key in a PKCS#11 token, named by a `pkcs11:` URI
    /// given as the key itself (`--ca-key 'pkcs11:…'`) or as a file's content (`ca-key.pem` of a
    /// `cacerts` directory, whose other files stay as they are). Either way it must match `signing`.
    private static func signingKey(_ keyFile: String, for signing: Certificate, certificateFile: String) throws(CAStoreError)
        -> Certificate.PrivateKey
    {
        if PKCS11URI.isURI(keyFile) { return try tokenKey(keyFile, for: signing) }
        var status = stat()
        if stat(keyFile, &status) == 0, status.st_mode & 0o004 != 0 {
            throw CAStoreError(
                "the CA key \(keyFile) is readable by every user (mode \(String(status.st_mode & 0o777, radix: 8))): chmod 600 it (a Kubernetes Secret: defaultMode 0400)")
        }
        let keyPEM: String
        do {
            keyPEM = try InputFile.text(keyFile)
        } catch {
            throw CAStoreError("cannot read the CA private key \(keyFile): \(error.reason)")
        }
        let uri = keyPEM.trimmed
        if PKCS11URI.isURI(uri) { return try tokenKey(uri, for: signing) }
        let key: Certificate.PrivateKey
        do {
            key = try Certificate.PrivateKey(pemEncoded: keyPEM)
        } catch {
            throw CAStoreError("\(keyFile) holds no PEM private key this CA signs with (truncated, encrypted, or another type), nor a pkcs11: URI")
        }
        guard key.publicKey == signing.publicKey else {
            throw CAStoreError("the key in \(keyFile) does not match the certificate in \(certificateFile)")
        }
        return key
    }

    /// The key `uri` names in its token, checked against `signing` (a test signature).
    private static func tokenKey(_ uri: String, for signing: Certificate) throws(CAStoreError) -> Certificate.PrivateKey {
        do {
            return Certificate.PrivateKey(try PKCS11PrivateKey.open(uri: uri, for: signing, defaultModule: PKCS11Settings.defaultModule))
        } catch {
            throw CAStoreError("the CA key \(error.message)")
        }
    }

    /// A CA is checked before it is trusted: a CA certificate (CA:TRUE, keyCertSign), valid now,
    /// whose chain verifies to the roots. Refused at start, never discovered at the first issuance.
    public static func check(_ authority: SigningAuthority, certificateFile: String, bundleFile: String?, now: Date)
        throws(CAStoreError)
    {
        let certificate = authority.certificate
        let isCA: Bool
        let canSign: Bool
        do {
            if case .isCertificateAuthority = try certificate.extensions.basicConstraints { isCA = true } else { isCA = false }
            canSign = try certificate.extensions.keyUsage?.keyCertSign ?? false
        } catch {
            throw CAStoreError("\(certificateFile): the certificate's extensions are malformed: \(error)")
        }
        guard isCA else { throw CAStoreError("\(certificateFile): the certificate is not a CA (basicConstraints CA:TRUE is missing)") }
        guard canSign else { throw CAStoreError("\(certificateFile): the certificate may not sign certificates (keyUsage keyCertSign is missing)") }
        guard now < certificate.notValidAfter else {
            throw CAStoreError("\(certificateFile): the CA certificate expired at \(certificate.notValidAfter.formatted(.iso8601))")
        }
        guard now >= certificate.notValidBefore else {
            throw CAStoreError("\(certificateFile): the CA certificate is not valid before \(certificate.notValidBefore.formatted(.iso8601))")
        }
        guard KeyType(of: certificate.publicKey) != nil else {
            throw CAStoreError("\(certificateFile): the CA's key type is not one of \(KeyType.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if authority.roots.contains(certificate) { return }
        let chainOK = checkChain(authority, now: now)
        guard chainOK else {
            throw CAStoreError(
                "\(certificateFile): the CA certificate does not chain to the root(s) in \(bundleFile ?? certificateFile) (an intermediate missing, or another root?)")
        }
    }

    private static func checkChain(_ authority: SigningAuthority, now: Date) -> Bool {
        // The synchronous form of a chain check: each certificate signed by the next, up to a root.
        var current = authority.certificate
        var pool = authority.intermediates
        for _ in 0..<8 {
            if let root = authority.roots.first(where: { $0.subject == current.issuer }),
                root.publicKey.isValidSignature(current.signature, for: current)
            {
                return now < root.notValidAfter
            }
            guard let index = pool.firstIndex(where: { $0.subject == current.issuer && $0.publicKey.isValidSignature(current.signature, for: current) })
            else { return false }
            current = pool.remove(at: index)
        }
        return false
    }

    private static func readCertificates(_ path: String) throws(CAStoreError) -> [Certificate] {
        let text: String
        do {
            text = try InputFile.text(path)
        } catch {
            throw CAStoreError("cannot read certificates from \(path): \(error.reason)")
        }
        guard let certificates = PEMCertificates.parse(text) else {
            throw CAStoreError("\(path) is not PEM certificates (truncated or malformed)")
        }
        return certificates
    }

    /// Writes through ``AtomicFile`` (a temporary file created with `mode`, synced, renamed).
    static func writeAtomically(_ text: String, to path: String, mode: mode_t) throws(CAStoreError) {
        do {
            try AtomicFile.write(text, to: path, mode: mode)
        } catch {
            throw CAStoreError("cannot write \(path): \(error.reason)")
        }
    }

    /// `mkdir -p` with `mode` for the last component; the error names the directory and the
    /// system's reason (read-only file system, no space, permission), not a Foundation dump.
    public static func makeDirectory(_ path: String, mode: mode_t) throws(CAStoreError) {
        var prefix = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            prefix += "/" + component
            if mkdir(prefix, mode) != 0, errno != EEXIST {
                throw CAStoreError("cannot create directory \(prefix): \(String(cString: strerror(errno)))")
            }
        }
        guard chmod(path, mode) == 0 else {
            throw CAStoreError("cannot set mode \(String(mode, radix: 8)) on \(path): \(String(cString: strerror(errno)))")
        }
    }
}

/// CA material that cannot be loaded or stored; the message names the path.
public struct CAStoreError: Error, Sendable, CustomStringConvertible {
    /// What went wrong, in words.
    public var message: String
    init(_ message: String) { self.message = message }
    public var description: String { message }
}
