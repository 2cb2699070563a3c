/// Text a caller controls (token header and claims, node id, resource names, type URLs,
/// metadata), made safe for one log line or a gRPC status message (CWE-117).
///
/// Escapes what could end a line, hide text or reorder it: C0 and C1 control characters
/// (`\n`, `\r`, `\t`, `\0` by name, the rest as `\u{1B}`), DEL, the Unicode line and paragraph
/// separators, bidirectional overrides and the byte-order mark; a backslash becomes `\\`, so an
/// escape in the output is always ours. Bytes that are not UTF-8 become `\xFF`. Longer text is cut
/// at `limit` characters and says how much was left out, so a 64 KiB value costs a log line
/// at most a few hundred bytes. Printable Unicode is kept as it is.
public struct CallerText: Sendable, Hashable, CustomStringConvertible {
    /// Most characters kept of one value unless a caller of ``init(_:limit:)`` says otherwise.
    public static let defaultLimit = 256

    /// The escaped, bounded text.
    public let description: String

    /// Escapes `raw` and keeps at most `limit` of its characters (unicode scalars).
    public init(_ raw: some StringProtocol, limit: Int = Self.defaultLimit) {
        var builder = Builder(limit: limit)
        for scalar in raw.unicodeScalars { builder.append(scalar) }
        description = builder.finish()
    }

    /// Decodes `bytes` as UTF-8; every byte that is not part of a valid sequence becomes `\xNN`.
    public init(bytes: some Collection<UInt8>, limit: Int = Self.defaultLimit) {
        var builder = Builder(limit: limit)
        let raw = Array(bytes)
        var index = 0
        while index < raw.count {
            var parser = Unicode.UTF8.ForwardParser()
            var input = raw[index...].makeIterator()
            switch parser.parseScalar(from: &input) {
            case .valid(let encoded):
                builder.append(Unicode.UTF8.decode(encoded))
                index += encoded.count
            case .error(let length):
                for byte in raw[index..<index + length] { builder.append(byte: byte) }
                index += length
            case .emptyInput:
                index = raw.count
            }
        }
        description = builder.finish()
    }

    /// Collects escaped text up to the limit, then counts what it leaves out.
    private struct Builder {
        let limit: Int
        var out = ""
        var kept = 0
        var droppedBytes = 0

        init(limit: Int) { self.limit = max(0, limit) }

        mutating func append(_ scalar: Unicode.Scalar) {
            guard kept < limit else { return droppedBytes += scalar.utf8.count }
            CallerText.append(scalar, to: &out)
            kept += 1
        }

        mutating func append(byte: UInt8) {
            guard kept < limit else { return droppedBytes += 1 }
            out += "\\x" + CallerText.hex(UInt32(byte), width: 2)
            kept += 1
        }

        func finish() -> String { droppedBytes == 0 ? out : out + "…(+\(droppedBytes) bytes)" }
    }

    private static func append(_ scalar: Unicode.Scalar, to out: inout String) {
        switch scalar {
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        case "\0": out += "\\0"
        default:
            if needsEscape(scalar.value) {
                out += "\\u{" + hex(scalar.value, width: scalar.value <= 0xFF ? 2 : 4) + "}"
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
    }

    private static func needsEscape(_ value: UInt32) -> Bool {
        switch value {
        case 0x00...0x1F, 0x7F...0x9F: true  // C0, DEL, C1 (NEL is 0x85)
        case 0x2028, 0x2029: true  // line and paragraph separators
        case 0x200E, 0x200F, 0x202A...0x202E, 0x2066...0x2069: true  // bidirectional controls
        case 0xFEFF, 0xFFF9...0xFFFB, 0xFFFF: true  // BOM, interlinear annotations, non-character
        default: false
        }
    }

    private static func hex(_ value: UInt32, width: Int) -> String {
        let digits = String(value, radix: 16, uppercase: true)
        return String(repeating: "0", count: max(0, width - digits.count)) + digits
    }
}

extension String {
    /// This text as a caller-controlled value: escaped and bounded (see ``CallerText``).
    public func callerText(limit: Int = CallerText.defaultLimit) -> String {
        CallerText(self, limit: limit).description
    }
}
