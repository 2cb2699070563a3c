import Crypto
import FoundationEssentials
import Glibc
import SDSModel

/// The CA module's JWT-SVID signer (SPIFFE JWT-SVID: ES256, `sub` the SPIFFE ID, `aud` the
/// audiences asked for, `exp`, `iat`), for the SPIFFE Workload API.
///
/// Its P-256 key is kept in the state directory (`jwt-signing-key.pem`, mode 0600) so tokens
/// outlive a restart; the key ID is the key's RFC 7638 thumbprint. The JWT bundle it publishes
/// is a JWKS with that key, `use: jwt-svid`, as SPIFFE bundles carry it.
public final class JWTAuthority: Sendable {
    private let key: P256.Signing.PrivateKey
    public let trustDomain: String
    /// The key ID in every token's header and in the bundle.
    public let keyID: String

    /// The file name of the key in the state directory.
    public static let keyFileName = "jwt-signing-key.pem"

    public init(key: P256.Signing.PrivateKey, trustDomain: String) {
        self.key = key
        self.trustDomain = trustDomain
        self.keyID = Self.thumbprint(key.publicKey)
    }

    /// Loads the key from `stateDirectory`, or makes and keeps one.
    public static func loadOrCreate(stateDirectory: String, trustDomain: String) throws(CAStoreError) -> JWTAuthority {
        let path = URL(fileURLWithPath: stateDirectory).appendingPathComponent(keyFileName).path
        if let pem = try? String(contentsOfFile: path, encoding: .utf8) {
            do {
                return JWTAuthority(key: try P256.Signing.PrivateKey(pemRepresentation: pem), trustDomain: trustDomain)
            } catch {
                throw CAStoreError("\(path) is not a P-256 private key in PEM: \(error); remove it to make a new one")
            }
        }
        let key = P256.Signing.PrivateKey()
        try RootCAStore.makeDirectory(stateDirectory, mode: 0o700)
        try RootCAStore.writeAtomically(key.pemRepresentation, to: path, mode: 0o600)
        return JWTAuthority(key: key, trustDomain: trustDomain)
    }

    /// A JWT-SVID for `subject`, for `audience`, valid for `ttl` from `now`.
    public func sign(subject: SPIFFEID, audience: [String], ttl: Duration, now: Date) throws -> (token: String, expiry: Date) {
        let issuedAt = Int64(now.timeIntervalSince1970)
        let expiry = issuedAt + ttl.components.seconds
        let header = Header(alg: "ES256", kid: keyID, typ: "JWT")
        let claims = Claims(sub: subject.description, aud: audience, exp: expiry, iat: issuedAt)
        let signingInput = Base64URL.encode(try Self.json(header)) + "." + Base64URL.encode(try Self.json(claims))
        let signature = try key.signature(for: Data(signingInput.utf8))
        return (signingInput + "." + Base64URL.encode(signature.rawRepresentation), Date(timeIntervalSince1970: TimeInterval(expiry)))
    }

    /// The JWT bundle: a JWKS with the signing key.
    public func bundleJWKS() -> Data {
        let raw = key.publicKey.rawRepresentation
        let jwk = JWK(
            kty: "EC", crv: "P-256", x: Base64URL.encode(raw.prefix(32)), y: Base64URL.encode(raw.suffix(32)), kid: keyID,
            use: "jwt-svid", alg: "ES256")
        return (try? Self.json(JWKS(keys: [jwk]))) ?? Data()
    }

    /// Checks a JWT-SVID of this trust domain for `audience`: header, signature, `sub`, `aud`,
    /// `exp`. Returns the SPIFFE ID and the claims (the payload's JSON).
    public func validateSVID(_ token: String, audience: String, now: Date) throws(JWTSVIDError) -> (subject: SPIFFEID, claims: Data) {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard token.utf8.count <= 16 * 1024, parts.count == 3, let headerData = Base64URL.decode(parts[0]),
            let payload = Base64URL.decode(parts[1]), let signatureData = Base64URL.decode(parts[2])
        else { throw JWTSVIDError("not a JWS in compact serialization") }
        guard let header = try? JSONDecoder().decode(ReadHeader.self, from: Data(headerData)) else {
            throw JWTSVIDError("the header is not a JSON object with alg and kid")
        }
        guard header.alg == "ES256" else { throw JWTSVIDError("alg '\(header.alg ?? "none")' is not ES256") }
        guard header.kid == keyID else { throw JWTSVIDError("kid '\(header.kid ?? "none")' is not a key of this trust domain") }
        guard let signature = try? P256.Signing.ECDSASignature(rawRepresentation: signatureData),
            key.publicKey.isValidSignature(signature, for: Data("\(parts[0]).\(parts[1])".utf8))
        else { throw JWTSVIDError("the signature does not verify") }
        guard let claims = try? JSONDecoder().decode(ReadClaims.self, from: Data(payload)) else {
            throw JWTSVIDError("the claims are not a JSON object of JWT-SVID claims")
        }
        guard let sub = claims.sub, let subject = try? SPIFFEID(parsing: sub) else { throw JWTSVIDError("sub is not a SPIFFE ID") }
        guard subject.trustDomain == trustDomain else { throw JWTSVIDError("sub \(subject) is not of trust domain \(trustDomain)") }
        let audiences = claims.aud?.values ?? []
        guard audiences.contains(audience) else { throw JWTSVIDError("audience \(audience) is not in the token's aud \(audiences)") }
        guard let exp = claims.exp else { throw JWTSVIDError("no exp") }
        guard exp > now.timeIntervalSince1970 else { throw JWTSVIDError("expired") }
        return (subject, Data(payload))
    }

    /// RFC 7638: SHA-256 of the required members in lexicographic order, base64url.
    static func thumbprint(_ key: P256.Signing.PublicKey) -> String {
        let raw = key.rawRepresentation
        let canonical = "{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"\(Base64URL.encode(raw.prefix(32)))\",\"y\":\"\(Base64URL.encode(raw.suffix(32)))\"}"
        return Base64URL.encode(SHA256.hash(data: Data(canonical.utf8)))
    }

    static func json(_ value: some Encodable) throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return try encoder.encode(value)
    }

    private struct Header: Encodable { var alg, kid, typ: String }
    private struct Claims: Encodable {
        var sub: String
        var aud: [String]
        var exp: Int64
        var iat: Int64
    }
    private struct JWK: Encodable { var kty, crv, x, y, kid, use, alg: String }
    private struct JWKS: Encodable { var keys: [JWK] }
    private struct ReadHeader: Decodable { var alg: String?; var kid: String? }
    private struct ReadClaims: Decodable {
        var sub: String?
        var aud: Audience?
        var exp: Double?
    }
    /// `aud` is a string or an array of strings.
    private struct Audience: Decodable {
        var values: [String]
        init(from decoder: any Decoder) throws {
            let container = try decoder.singleValueContainer()
            if let list = try? container.decode([String].self) {
                values = list
            } else {
                values = [try container.decode(String.self)]
            }
        }
    }
}

/// Why a JWT-SVID did not validate, in words.
public struct JWTSVIDError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
