import Crypto
import SDSModel
import X509
import _CryptoExtras
import SwiftASN1

/// The key types the agent generates and its CAs accept (`--workload-key-type`, `--ca-key-type`).
public enum KeyType: String, Sendable, CaseIterable, CustomStringConvertible {
    case ecP256 = "ec-p256"
    case ecP384 = "ec-p384"
    case rsa2048 = "rsa-2048"
    case rsa3072 = "rsa-3072"
    case rsa4096 = "rsa-4096"

    public var description: String { rawValue }

    /// The type of `publicKey`; nil for a type this agent neither generates nor accepts (an RSA
    /// key shorter than 2048 bits, P-521, Ed25519).
    public init?(of publicKey: Certificate.PublicKey) {
        if P256.Signing.PublicKey(publicKey) != nil {
            self = .ecP256
        } else if P384.Signing.PublicKey(publicKey) != nil {
            self = .ecP384
        } else if let rsa = _RSA.Signing.PublicKey(publicKey) {
            switch rsa.keySizeInBits {
            case 2048: self = .rsa2048
            case 3072: self = .rsa3072
            case 4096: self = .rsa4096
            default: return nil
            }
        } else {
            return nil
        }
    }
}

/// Every key the agent makes and the CSR that proves it: one place, driven by a ``KeyType``
/// (the key type was written in four places before). The signature algorithm of what a key signs
/// follows the key (swift-certificates picks ECDSA with SHA-256/384 or RSA PKCS#1 v1.5 with SHA-256).
public enum KeyFactory {
    /// A fresh key of `type`, in memory only.
    public static func generate(_ type: KeyType) throws -> Certificate.PrivateKey {
        switch type {
        case .ecP256: Certificate.PrivateKey(p256())
        case .ecP384: Certificate.PrivateKey(P384.Signing.PrivateKey())
        case .rsa2048: Certificate.PrivateKey(try _RSA.Signing.PrivateKey(keySize: .bits2048))
        case .rsa3072: Certificate.PrivateKey(try _RSA.Signing.PrivateKey(keySize: .bits3072))
        case .rsa4096: Certificate.PrivateKey(try _RSA.Signing.PrivateKey(keySize: .bits4096))
        }
    }

    /// A P-256 key from 32 bytes of BoringSSL's CSPRNG, its public point one base-point
    /// multiplication. `P256.Signing.PrivateKey()` makes a FIPS key: after generating, BoringSSL's
    /// `EC_KEY_check_fips` recomputes the public point and runs a pairwise-consistency test (one
    /// ECDSA signature and one verification), which tripled the cost of every workload key for a
    /// check that FIPS mode asks for and this agent does not claim (Go's `ecdsa.GenerateKey`, which
    /// istio-agent uses, does neither outside FIPS mode). A scalar of 0 or not below the group
    /// order (a chance of about 2^-32) is refused by BoringSSL and drawn again; should BoringSSL
    /// keep refusing (never seen), its own generator is the fallback rather than a loop without end.
    public static func p256() -> P256.Signing.PrivateKey {
        for _ in 0..<8 {
            let scalar = SymmetricKey(size: .bits256)
            if let key = scalar.withUnsafeBytes({ try? P256.Signing.PrivateKey(rawRepresentation: $0) }) {
                return key
            }
        }
        return P256.Signing.PrivateKey()
    }

    /// The key as PEM for Envoy (PKCS#8 for EC keys, PKCS#1 for RSA keys; BoringSSL reads both).
    public static func pem(of key: Certificate.PrivateKey) throws -> String {
        try key.serializeAsPEM().pemString + "\n"
    }

    /// A fresh key of `type` and its PEM for Envoy, as ``pem(of:)`` writes it. A P-256 key's
    /// PKCS#8 is encoded once, directly (the path every workload key takes).
    public static func generateWithPEM(_ type: KeyType) throws -> (key: Certificate.PrivateKey, pem: String) {
        guard type == .ecP256 else {
            let key = try generate(type)
            return (key, try pem(of: key))
        }
        let key = p256()
        return (Certificate.PrivateKey(key), PEM.encode(key.derRepresentation, label: "PRIVATE KEY"))
    }

    /// A CSR with an empty subject and a URI SAN extension request for `identity`, signed by `key`.
    public static func makeCSR(for identity: SPIFFEID, key: Certificate.PrivateKey) throws -> CertificateSigningRequest {
        let extensions = try Certificate.Extensions {
            SubjectAlternativeNames([.uniformResourceIdentifier(identity.description)])
        }
        let attributes = try CertificateSigningRequest.Attributes([
            .init(ExtensionRequest(extensions: extensions))
        ])
        return try CertificateSigningRequest(
            version: .v1, subject: DistinguishedName(), privateKey: key, attributes: attributes)
    }
}

extension Certificate {
    /// The certificate as newline-terminated PEM (``SDSModel/PEM``), as Envoy and istiod's
    /// clients read it.
    public func pem() throws -> String {
        var serializer = DER.Serializer()
        try serializer.serialize(self)
        return PEM.encode(serializer.serializedBytes, label: "CERTIFICATE")
    }
}

extension CertificateSigningRequest {
    /// The CSR as newline-terminated PEM, as istiod's `CreateCertificate` takes it.
    public func pem() throws -> String {
        var serializer = DER.Serializer()
        try serializer.serialize(self)
        return PEM.encode(serializer.serializedBytes, label: "CERTIFICATE REQUEST")
    }
}

/// The one reader of PEM certificate files and answers (CA files, bundles, an upstream CA's chain).
public enum PEMCertificates {
    /// The certificates in `text`, in order; nil when a block is not a certificate or the PEM is
    /// truncated or malformed (an error from SwiftASN1 prints a dump of its input, not a reason).
    public static func parse(_ text: String) -> [Certificate]? {
        guard let documents = try? PEMDocument.parseMultiple(pemString: text) else { return nil }
        var certificates: [Certificate] = []
        for document in documents {
            guard let certificate = try? Certificate(pemDocument: document) else { return nil }
            certificates.append(certificate)
        }
        return certificates
    }
}
