import FoundationEssentials
import Glibc
import SDSModel

/// The two header fields checked before any signature work: `alg` and `kid`. Only the header
/// is decoded here: jwt-kit's parser would decode the claims as well, and measured on `ca serve`
/// that doubled the JSON work of every call (the verifier decodes the claims once, after).
struct JWTHeaderFields: Decodable {
    var alg: String?
    var kid: String?

    /// Decodes the header of a compact JWS (three non-empty base64url parts, a JSON header), or
    /// returns nil when it is not one.
    static func decode(compactToken token: Substring) -> JWTHeaderFields? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, parts.allSatisfy({ !$0.isEmpty }),
            let headerData = Data(base64URLEncoded: parts[0])
        else { return nil }
        return try? JSONDecoder().decode(JWTHeaderFields.self, from: headerData)
    }
}

extension Data {
    /// Decodes unpadded base64url, as used in JWTs.
    init?(base64URLEncoded string: Substring) {
        guard !string.contains("="), let bytes = Base64URL.decode(string) else { return nil }
        self.init(bytes)
    }
}
