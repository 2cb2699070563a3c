import GRPCCore
import SDSModel

/// Finds the caller's token in a call's metadata.
public enum CallerToken {
    /// Metadata key that marks a liveness probe (`sds-agent check`): when the call carries no
    /// token, its expected rejection is logged at debug level and not counted as a refusal.
    public static let probeHeader = "x-sds-agent-probe"

    /// The token under `headerKey` (a `-bin` key holds the raw token file bytes), else from
    /// `authorization: Bearer <token>`; nil when there is none.
    static func extract(from metadata: Metadata, headerKey: String) -> String? {
        if headerKey.hasSuffix("-bin") {
            for bytes in metadata[binaryValues: headerKey] {
                if let token = String(validating: bytes, as: UTF8.self), !token.isEmpty { return token }
            }
        } else {
            for value in metadata[stringValues: headerKey] where !value.isEmpty {
                return BearerToken.token(in: value) ?? value
            }
        }
        for value in metadata[stringValues: "authorization"] {
            if let token = BearerToken.token(in: value) { return token }
        }
        return nil
    }
}
