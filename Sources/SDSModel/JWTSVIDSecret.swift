import FoundationEssentials

/// A JWT-SVID served over SDS as a `generic_secret` (Envoy's credential injector puts it in the
/// `Authorization` header of upstream requests).
public struct JWTSVIDSecret: Sendable, Hashable {
    /// The identity in its `sub`.
    public var spiffeID: SPIFFEID
    /// The audiences in its `aud`.
    public var audiences: [String]
    /// The compact JWS.
    public var token: String
    /// When it was signed, and its `exp`.
    public var issuedAt: Date
    public var expiry: Date

    public init(spiffeID: SPIFFEID, audiences: [String], token: String, issuedAt: Date, expiry: Date) {
        self.spiffeID = spiffeID
        self.audiences = audiences
        self.token = token
        self.issuedAt = issuedAt
        self.expiry = expiry
    }

    /// The secret's value: exactly the header value Envoy injects.
    public var headerValue: String { "Bearer " + token }

    /// The resource version: changes with every token (its signature's last characters, which
    /// two tokens do not share but by chance, after the time it was signed).
    public var version: String { "jwt-\(Int64(issuedAt.timeIntervalSince1970 * 1000))-" + token.suffix(12) }
}

/// The SDS resource name of a JWT-SVID: `jwt-svid:AUDIENCE`, or several audiences separated by
/// commas. Each audience is 1–256 bytes of printable ASCII (no space, no comma), at most 16.
public enum JWTSVIDName {
    public static let prefix = "jwt-svid:"
    public static let maximumAudiences = 16
    public static let maximumAudienceBytes = 256

    /// Whether `name` names a JWT-SVID at all (then ``audiences(in:)`` says if it is a good one).
    public static func isJWTSVID(_ name: String) -> Bool { name.hasPrefix(prefix) }

    /// The audiences `name` asks for; a reason when it is not a usable name.
    public static func audiences(in name: String) -> Result<[String], NameError> {
        guard isJWTSVID(name) else { return .failure(NameError("not a \(prefix)AUDIENCE name")) }
        let audiences = name.dropFirst(prefix.count).split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard audiences.count <= maximumAudiences else {
            return .failure(NameError("\(audiences.count) audiences; at most \(maximumAudiences)"))
        }
        for audience in audiences {
            guard !audience.isEmpty else { return .failure(NameError("an empty audience (\(prefix)AUDIENCE[,AUDIENCE...])")) }
            guard audience.utf8.count <= maximumAudienceBytes else {
                return .failure(NameError("an audience of \(audience.utf8.count) bytes; at most \(maximumAudienceBytes)"))
            }
            guard audience.utf8.allSatisfy({ (0x21...0x7E).contains($0) }) else {
                return .failure(NameError("an audience with a space, a control character or non-ASCII bytes"))
            }
        }
        return .success(audiences)
    }

    /// Why a name is not a usable JWT-SVID name.
    public struct NameError: Error, Sendable, CustomStringConvertible {
        public var message: String
        public init(_ message: String) { self.message = message }
        public var description: String { message }
    }
}
