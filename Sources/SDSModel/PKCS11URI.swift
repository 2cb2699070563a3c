import FoundationEssentials

/// A PKCS#11 URI (RFC 7512) naming a private key in a token: `pkcs11:token=…;object=…` with
/// optional `id`, `slot-id` and `type` in the path, and `module-path`, `pin-source` (a file whose
/// first line is the PIN) or `pin-value` in the query. Only what finding and signing with one key
/// needs; other attributes are refused, so a typo is not silently ignored.
///
/// ``description`` never shows the PIN: `pin-value` is written `REDACTED`.
public struct PKCS11URI: Sendable, Hashable, CustomStringConvertible {
    /// The token's label (`token=`).
    public var token: String?
    /// The key's label (`object=`) and id (`id=`, raw bytes): at least one.
    public var object: String?
    public var id: [UInt8]?
    /// A slot number (`slot-id=`), when the token label is not enough.
    public var slotID: UInt?
    /// The module to load (`module-path=`); nil: `--pkcs11-module`.
    public var modulePath: String?
    /// Where the PIN is: a file, or the value itself.
    public var pinSource: String?
    public var pinValue: String?

    public static let scheme = "pkcs11:"

    /// Whether `text` is a PKCS#11 URI at all (then ``init(parsing:)`` says whether a good one).
    public static func isURI(_ text: String) -> Bool { text.hasPrefix(scheme) }

    public init(parsing text: String) throws(PKCS11URIError) {
        guard Self.isURI(text) else { throw PKCS11URIError("not a pkcs11: URI") }
        let body = text.dropFirst(Self.scheme.count)
        let (path, query) = body.firstIndex(of: "?").map { (body[..<$0], body[body.index(after: $0)...]) } ?? (body, "")
        for attribute in path.split(separator: ";", omittingEmptySubsequences: true) {
            let (name, value) = try Self.pair(attribute)
            switch name {
            case "token": token = try Self.text(value, name)
            case "object": object = try Self.text(value, name)
            case "id": id = try Self.bytes(value, name)
            case "slot-id":
                guard let slot = UInt(try Self.text(value, name)) else { throw PKCS11URIError("slot-id is not a number") }
                slotID = slot
            case "type":
                guard try Self.text(value, name) == "private" else { throw PKCS11URIError("type must be 'private' (the CA's signing key)") }
            default: throw PKCS11URIError("unknown path attribute '\(CallerText(String(name), limit: 64))'")
            }
        }
        for attribute in query.split(separator: "&", omittingEmptySubsequences: true) {
            let (name, value) = try Self.pair(attribute)
            switch name {
            case "module-path": modulePath = try Self.text(value, name)
            case "pin-source": pinSource = try Self.text(value, name)
            case "pin-value": pinValue = try Self.text(value, name)
            default: throw PKCS11URIError("unknown query attribute '\(CallerText(String(name), limit: 64))'")
            }
        }
        guard object != nil || id != nil else { throw PKCS11URIError("names no key: give object= (its label) or id=") }
        guard pinSource == nil || pinValue == nil else { throw PKCS11URIError("pin-source and pin-value both given: one of them") }
    }

    /// The URI with the PIN's value left out.
    public var description: String {
        var path: [String] = []
        if let token { path.append("token=" + Self.escape(token)) }
        if let object { path.append("object=" + Self.escape(object)) }
        if let id { path.append("id=" + id.map { "%" + String($0, radix: 16, uppercase: true).leftPadded(to: 2) }.joined()) }
        if let slotID { path.append("slot-id=\(slotID)") }
        var query: [String] = []
        if let modulePath { query.append("module-path=" + Self.escape(modulePath)) }
        if let pinSource { query.append("pin-source=" + Self.escape(pinSource)) }
        if pinValue != nil { query.append("pin-value=REDACTED") }
        return Self.scheme + path.joined(separator: ";") + (query.isEmpty ? "" : "?" + query.joined(separator: "&"))
    }

    /// `text` with a `pin-value=` in it redacted, whatever else it holds (for logs of raw settings).
    public static func redactingPIN(_ text: String) -> String {
        guard isURI(text), let range = text.firstRange(of: "pin-value=") else { return text }
        let end = text[range.upperBound...].firstIndex(of: "&") ?? text.endIndex
        return text[..<range.upperBound] + "REDACTED" + text[end...]
    }

    private static func pair(_ attribute: Substring) throws(PKCS11URIError) -> (Substring, Substring) {
        guard let equals = attribute.firstIndex(of: "=") else {
            throw PKCS11URIError("'\(CallerText(String(attribute.prefix(32)), limit: 64))' is not name=value")
        }
        return (attribute[..<equals], attribute[attribute.index(after: equals)...])
    }

    private static func text(_ value: Substring, _ name: Substring) throws(PKCS11URIError) -> String {
        let bytes = try Self.bytes(value, name)
        guard let text = String(validating: bytes, as: UTF8.self), !text.isEmpty else {
            throw PKCS11URIError("\(name) is empty or not UTF-8")
        }
        return text
    }

    /// Percent-decoding (RFC 3986).
    private static func bytes(_ value: Substring, _ name: Substring) throws(PKCS11URIError) -> [UInt8] {
        var out: [UInt8] = []
        var utf8 = value.utf8[...]
        while let byte = utf8.popFirst() {
            guard byte == UInt8(ascii: "%") else {
                out.append(byte)
                continue
            }
            guard utf8.count >= 2, let decoded = UInt8(String(decoding: utf8.prefix(2), as: UTF8.self), radix: 16) else {
                throw PKCS11URIError("\(name) has a malformed %-escape")
            }
            out.append(decoded)
            utf8 = utf8.dropFirst(2)
        }
        return out
    }

    private static func escape(_ text: String) -> String {
        var out = ""
        for byte in text.utf8 {
            let c = Character(Unicode.Scalar(byte))
            if byte < 0x80, c.isLetter || c.isNumber || "-._~/".contains(c) {
                out.append(c)
            } else {
                out += "%" + String(byte, radix: 16, uppercase: true).leftPadded(to: 2)
            }
        }
        return out
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String { String(repeating: "0", count: Swift.max(0, width - count)) + self }
}

/// Why a PKCS#11 URI was refused, in words (never holding the PIN).
public struct PKCS11URIError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
