import Crypto
import FoundationEssentials
import Glibc
import SwiftASN1
import X509
import SDSModel

extension SigningAuthority {
    /// A TLS server certificate for `names` (DNS names, or IPv4/IPv6 addresses as IP SANs) signed
    /// by this authority, with a fresh P-256 key: what `sds-agent ca serve` presents.
    ///
    /// - Returns: the chain to send (the leaf, then ``chainAboveLeaf``) and the leaf's key.
    public func issueServingCertificate(names: [String], ttl: Duration, now: Date) throws
        -> (chain: [Certificate], key: Certificate.PrivateKey)
    {
        let key = try KeyFactory.generate(.ecP256)
        let sans: [GeneralName] = names.map { name in
            if let bytes = Self.addressBytes(name) { return .ipAddress(ASN1OctetString(contentBytes: ArraySlice(bytes))) }
            return .dnsName(name)
        }
        let extensions = try Certificate.Extensions {
            Critical(BasicConstraints.notCertificateAuthority)
            Critical(CertificateProfile.leafKeyUsage(for: key.publicKey))
            try ExtendedKeyUsage([.serverAuth])
            SubjectAlternativeNames(sans)
            SubjectKeyIdentifier(hash: key.publicKey)
            if let ski = try certificate.extensions.subjectKeyIdentifier {
                AuthorityKeyIdentifier(keyIdentifier: ski.keyIdentifier)
            }
        }
        let subject = try DistinguishedName { CommonName(names.first ?? "sds-agent-ca") }
        let leaf = try Certificate(
            version: .v3, serialNumber: CertificateProfile.serialNumber(), publicKey: key.publicKey,
            notValidBefore: now.addingTimeInterval(-60),
            notValidAfter: min(now.addingTimeInterval(ttl.timeInterval), CertificateProfile.latestNotAfter(under: self)),
            issuer: certificate.subject, subject: subject, extensions: extensions, issuerPrivateKey: privateKey)
        return ([leaf] + chainAboveLeaf, key)
    }

    /// The bytes of an IPv4 or IPv6 address literal; nil for a name.
    public static func addressBytes(_ text: String) -> [UInt8]? {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 { return withUnsafeBytes(of: &v4) { Array($0) } }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 { return withUnsafeBytes(of: &v6) { Array($0) } }
        return nil
    }
}
