import SDSModel
import SwiftASN1
import X509

/// What a CSR may ask for: istiod's and istio-csr's rules.
///
/// The certificate's identity comes from the authenticated caller, never from the CSR. A CSR is
/// refused when its signature does not verify with its own key, when it names a subject, or when
/// it requests any SAN other than the caller's URI, or an extension other than key usage,
/// extended key usage and SAN.
public enum CSRPolicy {
    /// Nil when the CSR's key is one of ``KeyType``'s (P-256, P-384, RSA 2048/3072/4096).
    public static func keyTypeRefusal(_ csr: CertificateSigningRequest) -> String? {
        KeyType(of: csr.publicKey) == nil
            ? "the CSR's key is not one this CA signs (\(KeyType.allCases.map(\.rawValue).joined(separator: ", ")))" : nil
    }

    /// Returns nil when `csr` is acceptable for `identity`, or the reason it is not.
    public static func evaluate(_ csr: CertificateSigningRequest, for identity: SPIFFEID) -> String? {
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else {
            return "the CSR's signature does not verify with its own public key"
        }
        if let reason = keyTypeRefusal(csr) { return reason }
        guard csr.subject.isEmpty else {
            return "the CSR names a subject (\(csr.subject)); identities come from the caller only"
        }
        let allowed: Set<ASN1ObjectIdentifier> = [
            .X509ExtensionID.keyUsage, .X509ExtensionID.extendedKeyUsage, .X509ExtensionID.subjectAlternativeName,
        ]
        for attribute in csr.attributes {
            guard let request = try? ExtensionRequest(attribute) else {
                return "the CSR carries an attribute other than an extension request"
            }
            for ext in request.extensions {
                guard allowed.contains(ext.oid) else {
                    return "the CSR requests extension \(ext.oid), which this CA does not grant"
                }
                if ext.oid == .X509ExtensionID.subjectAlternativeName {
                    guard let sans = try? SubjectAlternativeNames(ext) else { return "the CSR's SAN extension is malformed" }
                    for san in sans {
                        guard case .uniformResourceIdentifier(let uri) = san, uri == identity.description else {
                            return "the CSR asks for SAN \(san); only \(identity) may be requested"
                        }
                    }
                }
            }
        }
        return nil
    }
}
