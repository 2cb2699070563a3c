import FoundationEssentials
import Glibc
import SDSModel
import X509

extension SigningAuthority {
    /// An intermediate CA for `trustDomain` signed by `root` (pathlen 0: it signs workloads
    /// only), valid from `now` for `ttl` or until the root expires, whichever is first. Its
    /// `roots` are `root`'s.
    public static func makeIntermediate(
        under root: SigningAuthority, trustDomain: String, ttl: Duration, now: Date, keyType: KeyType = .ecP256
    ) throws -> SigningAuthority {
        let key = try KeyFactory.generate(keyType)
        let name = try DistinguishedName {
            OrganizationName("sds-agent")
            CommonName("sds-agent intermediate CA for \(trustDomain)")
        }
        let extensions = try Certificate.Extensions {
            Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
            Critical(KeyUsage(digitalSignature: true, keyCertSign: true, cRLSign: true))
            SubjectKeyIdentifier(hash: key.publicKey)
            if let rootKeyID = try? root.certificate.extensions.subjectKeyIdentifier?.keyIdentifier {
                AuthorityKeyIdentifier(keyIdentifier: rootKeyID)
            }
            SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://\(trustDomain)")])
        }
        let notAfter = min(now.addingTimeInterval(ttl.timeInterval), root.certificate.notValidAfter)
        let certificate = try Certificate(
            version: .v3, serialNumber: CertificateProfile.serialNumber(), publicKey: key.publicKey,
            notValidBefore: now.addingTimeInterval(-60), notValidAfter: notAfter,
            issuer: root.certificate.subject, subject: name, extensions: extensions, issuerPrivateKey: root.privateKey)
        return SigningAuthority(certificate: certificate, privateKey: key, intermediates: root.chainAboveLeaf, roots: root.roots)
    }
}

extension RootCAStore {
    /// Throws when `directory` holds any file of the `cacerts` layout.
    static func refuseExistingCA(in directory: String) throws(CAStoreError) {
        for name in CACertsFile.all where access(directory + "/" + name, F_OK) == 0 {
            throw CAStoreError("\(directory)/\(name) exists: a CA is never overwritten; write the new one to an empty directory")
        }
    }

    /// Writes `authority` in Istio's `cacerts` layout into `directory` (made with mode 0700):
    /// `ca-cert.pem`, `ca-key.pem` (0600), `cert-chain.pem` (the signing certificate, its
    /// intermediates, then the root, as Istio writes it) and `root-cert.pem`. Refuses a directory
    /// that already holds any of them: a CA is never overwritten by accident.
    public static func writeCACerts(_ authority: SigningAuthority, to directory: String) throws(CAStoreError) {
        try refuseExistingCA(in: directory)
        try makeDirectory(directory, mode: 0o700)
        let pem: ([Certificate]) throws(CAStoreError) -> String = { certificates throws(CAStoreError) in
            do {
                return try certificates.map { try $0.pem() }.joined()
            } catch {
                throw CAStoreError("cannot encode a certificate as PEM: \(error)")
            }
        }
        let keyPEM: String
        do {
            keyPEM = try KeyFactory.pem(of: authority.privateKey)
        } catch {
            throw CAStoreError("cannot encode the CA key as PEM: \(error)")
        }
        // The key first, so a directory with a certificate never lacks its key.
        try writeAtomically(keyPEM, to: directory + "/" + CACertsFile.key, mode: 0o600)
        try writeAtomically(try pem([authority.certificate]), to: directory + "/" + CACertsFile.certificate, mode: 0o644)
        try writeAtomically(
            try pem([authority.certificate] + authority.intermediates + authority.roots.prefix(1)),
            to: directory + "/" + CACertsFile.chain, mode: 0o644)
        try writeAtomically(try pem(authority.roots), to: directory + "/" + CACertsFile.root, mode: 0o644)
    }
}

/// What `sds-agent ca init` does: an intermediate in the `cacerts` layout under a new root (its
/// key written to `newRootKeyFile`, never into the directory) or under an existing one.
public enum CACertsInit {
    public enum Root: Sendable {
        /// A new self-signed root of `ttl`; its key goes to `keyFile` (mode 0600, never overwritten).
        case new(ttl: Duration, keyFile: String)
        /// An existing root (intermediate rotation).
        case existing(certificateFile: String, keyFile: String)
    }

    /// Writes the CA into `directory`; returns the intermediate's expiry.
    public static func write(
        directory: String, trustDomain: String, root: Root, caTTL: Duration, keyType: KeyType, now: Date
    ) throws(CAStoreError) -> Date {
        try RootCAStore.refuseExistingCA(in: directory)
        let authority: SigningAuthority
        switch root {
        case .existing(let certificateFile, let keyFile):
            authority = try RootCAStore.load(certificateFile: certificateFile, keyFile: keyFile, now: now)
        case .new(let ttl, let keyFile):
            guard access(keyFile, F_OK) != 0 else { throw CAStoreError("\(keyFile) exists: a root key is never overwritten") }
            do {
                authority = try SigningAuthority.makeSelfSignedRoot(trustDomain: trustDomain, ttl: ttl, now: now, keyType: keyType)
            } catch {
                throw CAStoreError("cannot make a root: \(error)")
            }
        }
        let intermediate: SigningAuthority
        do {
            intermediate = try SigningAuthority.makeIntermediate(under: authority, trustDomain: trustDomain, ttl: caTTL, now: now, keyType: keyType)
        } catch {
            throw CAStoreError("cannot make the intermediate: \(error)")
        }
        if case .new(_, let keyFile) = root {
            let keyPEM: String
            do {
                keyPEM = try KeyFactory.pem(of: authority.privateKey)
            } catch {
                throw CAStoreError("cannot encode the root key as PEM: \(error)")
            }
            try RootCAStore.writeAtomically(keyPEM, to: keyFile, mode: 0o600)
        }
        try RootCAStore.writeCACerts(intermediate, to: directory)
        return intermediate.certificate.notValidAfter
    }
}
