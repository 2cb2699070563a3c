import FoundationEssentials
import Glibc
import Logging
import SDSModel
import Synchronization

/// One JSON object per line on standard error: `time`, `level`, `message`, `label`, `source`,
/// then every metadata key (`--log-format json`). Strings are JSON-escaped, so a line is always one
/// line and parses; run it inside ``EscapingLogHandler`` (as the agent does) and caller text is
/// also escaped and bounded before it gets here, exactly as in text logs.
package struct JSONLogHandler: LogHandler {
    package var logLevel: Logger.Level = .info
    package var metadata: Logger.Metadata = [:]
    private let label: String
    private let write: @Sendable (String) -> Void

    /// Logs to standard error; `write` replaces that in tests.
    package init(label: String, write: @escaping @Sendable (String) -> Void = JSONLogHandler.standardError) {
        self.label = label
        self.write = write
    }

    package subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    package func log(event: LogEvent) {
        var merged = metadata
        if let own = event.metadata { merged.merge(own) { $1 } }
        var line = "{"
        func field(_ key: String, _ value: String) {
            if line.count > 1 { line += "," }
            line += Self.quoted(key) + ":" + Self.quoted(value)
        }
        field("time", Date().formatted(.iso8601.year().month().day().time(includingFractionalSeconds: true).timeZone(separator: .omitted)))
        field("level", event.level.rawValue)
        field("message", event.message.description)
        field("label", label)
        field("source", event.source)
        for (key, value) in merged.sorted(by: { $0.key < $1.key }) where !["time", "level", "message", "label", "source"].contains(key) {
            if line.count > 1 { line += "," }
            line += Self.quoted(key) + ":" + Self.json(value)
        }
        write(line + "}\n")
    }

    static func json(_ value: Logger.Metadata.Value) -> String {
        switch value {
        case .string(let text): quoted(text)
        case .stringConvertible(let convertible): value.plainScalar ?? quoted(convertible.description)
        case .array(let values): "[" + values.map(json).joined(separator: ",") + "]"
        case .dictionary(let values):
            "{" + values.sorted(by: { $0.key < $1.key }).map { quoted($0.key) + ":" + json($0.value) }.joined(separator: ",") + "}"
        }
    }

    /// A JSON string literal (RFC 8259: quote, backslash and controls escaped).
    static func quoted(_ text: String) -> String {
        var out = "\""
        out.reserveCapacity(text.utf8.count + 2)
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20 || scalar.value == 0x7F || scalar.value == 0x2028 || scalar.value == 0x2029:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }

    /// Writes `line` to standard error in one call (lines from concurrent tasks do not interleave).
    package static let standardError: @Sendable (String) -> Void = { line in
        let bytes = Array(line.utf8)
        bytes.withUnsafeBytes { _ = Glibc.write(2, $0.baseAddress, $0.count) }
    }
}

/// The log level every handler of the process reads, so a reload (SIGHUP) changes it at once.
package final class SharedLogLevel: Sendable {
    private let raw: Atomic<Int>
    private static let levels = Logger.Level.allCases

    package init(_ level: Logger.Level) { raw = Atomic(Self.levels.firstIndex(of: level) ?? 2) }

    package var level: Logger.Level {
        get { Self.levels[raw.load(ordering: .relaxed)] }
        set { raw.store(Self.levels.firstIndex(of: newValue) ?? 2, ordering: .relaxed) }
    }

    /// A level from its name, case-insensitively (`debug`, `DEBUG`); nil for anything else.
    package static func parse(_ text: String) -> Logger.Level? {
        Logger.Level(rawValue: text.lowercased())
    }
}
