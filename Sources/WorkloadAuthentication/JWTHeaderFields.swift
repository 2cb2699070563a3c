import FoundationEssentials
import Glibc
import JWTKit
import SDSModel

/// The two header fields checked before any signature work: `alg` and `kid`, read by jwt-kit's
/// parser (the payload is left undecoded here: each verifier reads its own claims).
struct JWTHeaderFields {
    var alg: String?
    var kid: String?

    /// Decodes the header of a compact JWS (three non-empty base64url parts, a JSON header), or
    /// returns nil when it is not one.
    static func decode(compactToken token: Substring) -> JWTHeaderFields? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, parts.allSatisfy({ !$0.isEmpty }),
            let header = try? DefaultJWTParser().parse(Array(token.utf8), as: UncheckedPayload.self).header
        else { return nil }
        return JWTHeaderFields(alg: header.alg, kid: header.kid)
    }
}

/// Any JSON payload, not decoded: the header is read before the claims are trusted or parsed.
private struct UncheckedPayload: JWTPayload {
    init(from decoder: any Decoder) throws {}
    func encode(to encoder: any Encoder) throws {}
    func verify(using algorithm: some JWTAlgorithm) {}
}

extension Data {
    /// Decodes unpadded base64url, as used in JWTs.
    init?(base64URLEncoded string: Substring) {
        guard !string.contains("="), let bytes = Base64URL.decode(string) else { return nil }
        self.init(bytes)
    }
}
