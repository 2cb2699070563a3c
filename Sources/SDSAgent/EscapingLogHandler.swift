import Logging
import SDSModel

/// Makes every log line one line, whatever reaches it: escapes and bounds the message and every
/// metadata value (``CallerText``) before the wrapped handler formats them.
///
/// Callers control much of what the agent logs (token `kid`, `sub` and `iss`, node id, resource
/// names, Envoy's NACK text), so a newline in any of them would let a caller forge a log line
/// (CWE-117). Escaping here, at the one place every line passes, holds for every log statement
/// and every format, including ones written later. The handler's own metadata (set with
/// `logger[metadataKey:]`) is kept here, not in the wrapped handler, so it is escaped too.
package struct EscapingLogHandler<Wrapped: LogHandler>: LogHandler {
    /// The handler that formats and writes the line.
    package var wrapped: Wrapped
    /// Most characters kept of the message.
    package var messageLimit: Int
    /// Most characters kept of one metadata value.
    package var valueLimit: Int

    package var metadata: Logger.Metadata = [:]
    package var metadataProvider: Logger.MetadataProvider?
    /// When set, the level every handler reads (changed at once by a reload).
    package var sharedLevel: SharedLogLevel?

    package var logLevel: Logger.Level {
        get { sharedLevel?.level ?? wrapped.logLevel }
        set {
            wrapped.logLevel = newValue
            sharedLevel?.level = newValue
        }
    }

    package init(wrapping wrapped: Wrapped, messageLimit: Int = 2048, valueLimit: Int = 512) {
        self.wrapped = wrapped
        self.messageLimit = messageLimit
        self.valueLimit = valueLimit
    }

    package subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    package func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get() { merged.merge(provided) { $1 } }
        if let own = event.metadata { merged.merge(own) { $1 } }
        var escaped = event
        escaped.message = "\(CallerText(event.message.description, limit: messageLimit))"
        escaped.metadata = merged.isEmpty ? nil : Self.escape(merged, limit: valueLimit)
        wrapped.log(event: escaped)
    }

    /// Escapes keys and values, recursively.
    static func escape(_ metadata: Logger.Metadata, limit: Int) -> Logger.Metadata {
        var out: Logger.Metadata = [:]
        for (key, value) in metadata {
            out[CallerText(key, limit: 64).description] = escape(value, limit: limit)
        }
        return out
    }

    private static func escape(_ value: Logger.Metadata.Value, limit: Int) -> Logger.Metadata.Value {
        switch value {
        case .string(let text): .string(CallerText(text, limit: limit).description)
        case .stringConvertible(let convertible):
            // A number stays one (a JSON number in JSON logs); anything else is escaped text.
            value.plainScalar != nil ? value : .string(CallerText(convertible.description, limit: limit).description)
        case .array(let values): .array(values.prefix(64).map { escape($0, limit: limit) })
        case .dictionary(let values): .dictionary(escape(values, limit: limit))
        }
    }
}
