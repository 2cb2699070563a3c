import Crypto
import FoundationEssentials
import Glibc
import JWTKit
import SDSModel

/// The CA module's JWT-SVID signer (SPIFFE JWT-SVID: ES256, `sub` the SPIFFE ID, `aud` the
/// audiences asked for, `exp`, `iat`), for the SPIFFE Workload API.
///
/// Its P-256 key is kept in the state directory (`jwt-signing-key.pem`, mode 0600) so tokens
/// outlive a restart; the key ID is the key's RFC 7638 thumbprint. The JWT bundle it publishes
/// is a JWKS with that key, `use: jwt-svid`, as SPIFFE bundles carry it.
public final class JWTAuthority: Sendable {
    private let key: P256.Signing.PrivateKey
    /// jwt-kit's signer and verifier for that one key, by its ID.
    private let keys: JWTKeyCollection
    public let trustDomain: String
    /// The key ID in every token's header and in the bundle.
    public let keyID: String

    /// The file name of the key in the state directory.
    public static let keyFileName = "jwt-signing-key.pem"

    public init(key: P256.Signing.PrivateKey, trustDomain: String) async throws(CAStoreError) {
        self.key = key
        self.trustDomain = trustDomain
        let keyID = Self.thumbprint(key.publicKey)
        self.keyID = keyID
        // jwt-kit copies the key through its raw form; a P-256 key from swift-crypto always passes.
        let signer: ES256PrivateKey
        do {
            signer = try ES256PrivateKey(backing: key)
        } catch {
            throw CAStoreError("the JWT-SVID key is not one jwt-kit can sign with: \(error)")
        }
        self.keys = await JWTKeyCollection().add(ecdsa: signer, kid: JWKIdentifier(string: keyID))
    }

    /// Loads the key from `stateDirectory`, or makes and keeps one.
    public static func loadOrCreate(stateDirectory: String, trustDomain: String) async throws(CAStoreError) -> JWTAuthority {
        let path = URL(fileURLWithPath: stateDirectory).appendingPathComponent(keyFileName).path
        if let pem = try? String(contentsOfFile: path, encoding: .utf8) {
            let key: P256.Signing.PrivateKey
            do {
                key = try P256.Signing.PrivateKey(pemRepresentation: pem)
            } catch {
                throw CAStoreError("\(path) is not a P-256 private key in PEM: \(error); remove it to make a new one")
            }
            return try await JWTAuthority(key: key, trustDomain: trustDomain)
        }
        let key = P256.Signing.PrivateKey()
        try RootCAStore.makeDirectory(stateDirectory, mode: 0o700)
        try RootCAStore.writeAtomically(key.pemRepresentation, to: path, mode: 0o600)
        return try await JWTAuthority(key: key, trustDomain: trustDomain)
    }

    /// A JWT-SVID for `subject`, for `audience`, valid for `ttl` from `now`, signed by jwt-kit.
    public func sign(subject: SPIFFEID, audience: [String], ttl: Duration, now: Date) async throws -> (token: String, expiry: Date) {
        let issuedAt = Int64(now.timeIntervalSince1970)
        let expiry = issuedAt + ttl.components.seconds
        let claims = Claims(sub: subject.description, aud: audience, exp: expiry, iat: issuedAt)
        let token = try await keys.sign(claims, kid: JWKIdentifier(string: keyID), header: ["typ": "JWT"])
        return (token, Date(timeIntervalSince1970: TimeInterval(expiry)))
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
    /// `exp`. Returns the SPIFFE ID and the claims (the payload's JSON). jwt-kit parses and checks
    /// the signature; the header is checked first, so nothing is verified with an algorithm or a
    /// key the token chose.
    public func validateSVID(_ token: String, audience: String, now: Date) async throws(JWTSVIDError) -> (subject: SPIFFEID, claims: Data) {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard token.utf8.count <= 16 * 1024, parts.count == 3, let payload = Base64URL.decode(parts[1]),
            let header = try? DefaultJWTParser().parse(Array(token.utf8), as: ReadClaims.self).header
        else { throw JWTSVIDError("not a JWS in compact serialization") }
        guard header.alg == "ES256" else { throw JWTSVIDError("alg '\(header.alg ?? "none")' is not ES256") }
        guard header.kid == keyID else { throw JWTSVIDError("kid '\(header.kid ?? "none")' is not a key of this trust domain") }
        let claims: ReadClaims
        do {
            claims = try await keys.verify(token, as: ReadClaims.self)
        } catch let error as JWTError where error.errorType == .signatureVerificationFailed {
            throw JWTSVIDError("the signature does not verify")
        } catch {
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

    /// The claims signed: checked by the Workload API before signing, so nothing to verify here.
    private struct Claims: JWTPayload {
        var sub: String
        var aud: [String]
        var exp: Int64
        var iat: Int64
        func verify(using algorithm: some JWTAlgorithm) {}
    }
    private struct JWK: Encodable { var kty, crv, x, y, kid, use, alg: String }
    private struct JWKS: Encodable { var keys: [JWK] }
    /// The claims read back, each checked by `validateSVID` with its own reason.
    private struct ReadClaims: JWTPayload {
        var sub: String?
        var aud: Audience?
        var exp: Double?
        func verify(using algorithm: some JWTAlgorithm) {}
    }
    /// `aud` is a string or an array of strings.
    private struct Audience: Codable {
        var values: [String]
        func encode(to encoder: any Encoder) throws {
            var container = encoder.singleValueContainer()
            try container.encode(values)
        }
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
