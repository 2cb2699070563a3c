import GRPCCore

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
                return stripBearer(value)
            }
        }
        for value in metadata[stringValues: "authorization"] {
            let prefix = "bearer "
            if value.count > prefix.count, value.prefix(prefix.count).lowercased() == prefix {
                return String(value.dropFirst(prefix.count))
            }
        }
        return nil
    }

    private static func stripBearer(_ value: String) -> String {
        value.lowercased().hasPrefix("bearer ") ? String(value.dropFirst(7)) : value
    }
}
