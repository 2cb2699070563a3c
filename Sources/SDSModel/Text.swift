// Small text helpers, so no module needs Foundation proper (and its ICU data) for them.

extension StringProtocol {
    /// Without leading and trailing whitespace and newlines. (Sliced, not rebuilt scalar by
    /// scalar: every token is trimmed on every call.)
    public var trimmed: String {
        let scalars = unicodeScalars
        guard let first = scalars.firstIndex(where: { !$0.properties.isWhitespace }) else { return "" }
        let last = scalars.lastIndex(where: { !$0.properties.isWhitespace })!
        return String(self[first...last])
    }
}

extension Sequence<UInt8> {
    /// Lowercase hexadecimal, two digits a byte.
    public var hexString: String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(underestimatedCount * 2)
        for byte in self {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0x0f)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// Base64url without padding (RFC 4648 §5), as JWTs use it.
public enum Base64URL {
    public static func encode(_ bytes: some Sequence<UInt8>) -> String {
        var out: [UInt8] = []
        Base64Encoding.append(Array(bytes), alphabet: Base64Encoding.url, padded: false, lineLength: nil, to: &out)
        return String(decoding: out, as: UTF8.self)
    }

    /// The bytes, or nil for anything that is not unpadded (or padded) base64url.
    public static func decode(_ text: some StringProtocol) -> [UInt8]? {
        var values: [UInt8] = []
        values.reserveCapacity(text.utf8.count)
        for character in text.utf8 {
            switch character {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): values.append(character - UInt8(ascii: "A"))
            case UInt8(ascii: "a")...UInt8(ascii: "z"): values.append(character - UInt8(ascii: "a") + 26)
            case UInt8(ascii: "0")...UInt8(ascii: "9"): values.append(character - UInt8(ascii: "0") + 52)
            case UInt8(ascii: "-"): values.append(62)
            case UInt8(ascii: "_"): values.append(63)
            case UInt8(ascii: "="): continue
            default: return nil
            }
        }
        guard values.count % 4 != 1 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(values.count * 3 / 4)
        var index = 0
        while index < values.count {
            let chunk = values[index..<min(index + 4, values.count)]
            var value: UInt32 = 0
            for (offset, sextet) in chunk.enumerated() { value |= UInt32(sextet) << (18 - 6 * offset) }
            out.append(UInt8(value >> 16 & 0xff))
            if chunk.count > 2 { out.append(UInt8(value >> 8 & 0xff)) }
            if chunk.count > 3 { out.append(UInt8(value & 0xff)) }
            index += 4
        }
        return out
    }
}

/// PEM (RFC 7468): what Envoy reads certificates and keys from. Written here rather than through
/// SwiftASN1's `PEMDocument.pemString`, which splits its base64 into lines with String index
/// arithmetic and cost more than a P-256 signature per issued identity.
public enum PEM {
    /// `-----BEGIN label-----`, the base64 of `der` in lines of 64, `-----END label-----`, each
    /// line ending in a newline.
    public static func encode(_ der: some Collection<UInt8>, label: String) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(der.count * 4 / 3 + der.count / 48 + 2 * label.utf8.count + 40)
        out.append(contentsOf: "-----BEGIN \(label)-----\n".utf8)
        Base64Encoding.append(Array(der), alphabet: Base64Encoding.standard, padded: true, lineLength: 64, to: &out)
        out.append(contentsOf: "-----END \(label)-----\n".utf8)
        return String(decoding: out, as: UTF8.self)
    }
}

enum Base64Encoding {
    static let standard = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    static let url = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)

    /// Appends the base64 of `input` to `out`; with `lineLength`, a newline after every that many
    /// characters and after the last (a multiple of 4).
    static func append(_ input: [UInt8], alphabet: [UInt8], padded: Bool, lineLength: Int?, to out: inout [UInt8]) {
        out.reserveCapacity(out.count + (input.count + 2) / 3 * 4 + (lineLength.map { input.count / ($0 / 4 * 3) + 1 } ?? 0))
        let quadsPerLine = lineLength.map { $0 / 4 } ?? .max
        var quads = 0
        input.withUnsafeBufferPointer { bytes in
            alphabet.withUnsafeBufferPointer { table in
                var index = 0
                while index < bytes.count {
                    let remaining = bytes.count - index
                    let b0 = UInt32(bytes[index])
                    let b1 = remaining > 1 ? UInt32(bytes[index + 1]) : 0
                    let b2 = remaining > 2 ? UInt32(bytes[index + 2]) : 0
                    let value = b0 << 16 | b1 << 8 | b2
                    out.append(table[Int(value >> 18 & 63)])
                    out.append(table[Int(value >> 12 & 63)])
                    if remaining > 1 { out.append(table[Int(value >> 6 & 63)]) } else if padded { out.append(UInt8(ascii: "=")) }
                    if remaining > 2 { out.append(table[Int(value & 63)]) } else if padded { out.append(UInt8(ascii: "=")) }
                    index += 3
                    quads += 1
                    if quads == quadsPerLine {
                        out.append(UInt8(ascii: "\n"))
                        quads = 0
                    }
                }
            }
        }
        if lineLength != nil, quads > 0 { out.append(UInt8(ascii: "\n")) }
    }
}

/// URLs as they may be logged.
public enum URLText {
    /// `https://user:secret@host/path` → `https://REDACTED@host/path`: credentials in a URL never
    /// reach a log line or an error message; anything else is returned as it is.
    public static func redactingUserinfo(_ value: String) -> String {
        guard let scheme = value.firstRange(of: "://"), let at = value[scheme.upperBound...].firstIndex(of: "@"),
            !value[scheme.upperBound..<at].contains("/")
        else { return value }
        return value[..<scheme.upperBound] + "REDACTED" + value[at...]
    }
}
