/// A TLS named group (RFC 8446 §4.2.7, IANA's "TLS Supported Groups"), by its code point.
public struct TLSGroup: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let secp256r1 = TLSGroup(rawValue: 0x0017)
    public static let secp384r1 = TLSGroup(rawValue: 0x0018)
    public static let secp521r1 = TLSGroup(rawValue: 0x0019)
    public static let x25519 = TLSGroup(rawValue: 0x001D)
    public static let x448 = TLSGroup(rawValue: 0x001E)
    /// The hybrid post-quantum group Envoy 1.40's BoringSSL and swift-nio-ssl offer first.
    public static let x25519MLKEM768 = TLSGroup(rawValue: 0x11EC)

    private static let names: [UInt16: String] = [
        0x0017: "secp256r1", 0x0018: "secp384r1", 0x0019: "secp521r1", 0x001D: "x25519", 0x001E: "x448",
        0x0100: "ffdhe2048", 0x0101: "ffdhe3072", 0x11EB: "SecP256r1MLKEM768", 0x11EC: "X25519MLKEM768",
        0x11ED: "SecP384r1MLKEM1024", 0x6399: "X25519Kyber768Draft00",
    ]

    /// IANA's name (`X25519MLKEM768`, `x25519`), or the code point in hex for one we do not name.
    public var description: String {
        if let name = Self.names[rawValue] { return name }
        let hex = String(rawValue, radix: 16)
        return "0x" + String(repeating: "0", count: max(0, 4 - hex.count)) + hex
    }
}

/// What a TLS handshake settled on, as read from the server's first flight.
public struct TLSKeyExchange: Hashable, Sendable, CustomStringConvertible {
    /// 0x0304 for TLS 1.3 (from `supported_versions`), else the ServerHello's version.
    public var version: UInt16
    /// The ECDHE (or hybrid) group; nil when the handshake used none (TLS 1.2 with RSA key
    /// transport or finite-field DH, or a resumption).
    public var group: TLSGroup?
    /// Whether it was read from a HelloRetryRequest (the group the server asked the client for).
    public var helloRetry: Bool

    public init(version: UInt16, group: TLSGroup?, helloRetry: Bool = false) {
        self.version = version
        self.group = group
        self.helloRetry = helloRetry
    }

    /// `TLS 1.3`, `TLS 1.2`, or the code point.
    public var versionName: String {
        switch version {
        case 0x0304: "TLS 1.3"
        case 0x0303: "TLS 1.2"
        case 0x0302: "TLS 1.1"
        case 0x0301: "TLS 1.0"
        default: "0x" + String(version, radix: 16)
        }
    }

    public var description: String { "\(group?.description ?? "no group") over \(versionName)" }
}

/// Which key exchanges the agent's own TLS links take (`--tls-policy`): `default` takes what both
/// ends agree on (swift-nio-ssl offers X25519MLKEM768 first, then classical groups); `pqc`, named
/// after Istio's compliance policy, only X25519MLKEM768 over TLS 1.3, and refuses a peer that
/// settles on anything else before a byte of the call is sent.
public enum TLSPolicy: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case `default`
    case pqc

    /// The groups to offer and accept; nil for the TLS library's own list.
    public var groups: [TLSGroup]? {
        switch self {
        case .default: nil
        case .pqc: [.x25519MLKEM768]
        }
    }

    /// Why `exchange` is refused under this policy; nil when it is allowed.
    public func refusal(of exchange: TLSKeyExchange) -> String? {
        guard self == .pqc else { return nil }
        guard exchange.version == 0x0304 else { return "\(exchange.versionName) has no post-quantum key exchange" }
        guard exchange.group == .x25519MLKEM768 else { return "\(exchange.group?.description ?? "no group") is not X25519MLKEM768" }
        return nil
    }

    public var description: String { rawValue }
}

/// Reads the key exchange from the bytes a TLS server sends first (its plaintext records: the
/// ServerHello, and in TLS 1.2 the ServerKeyExchange after the certificate), fed as they come.
/// Pure and bounded: whatever a peer sends, it answers within ``limit`` bytes.
public struct TLSServerFlight: Sendable {
    public enum Outcome: Hashable, Sendable {
        /// Not enough bytes yet.
        case needMore
        /// The handshake's key exchange.
        case settled(TLSKeyExchange)
        /// The first record is no handshake (an alert: the server refused the client).
        case notHandshake
        /// Not a server's first flight, in words.
        case malformed(String)
    }

    /// Bytes looked at before giving up: a TLS 1.2 certificate chain fits well within it.
    public static let limit = 65_536
    /// SHA-256 of "HelloRetryRequest": the ServerHello random that marks one (RFC 8446 §4.1.3).
    static let helloRetryRandom: [UInt8] = [
        0xCF, 0x21, 0xAD, 0x74, 0xE5, 0x9A, 0x61, 0x11, 0xBE, 0x1D, 0x8C, 0x02, 0x1E, 0x65, 0xB8, 0x91,
        0xC2, 0xA2, 0x11, 0x16, 0x7A, 0xBB, 0x8C, 0x5E, 0x07, 0x9E, 0x09, 0xE2, 0xC8, 0xA8, 0x33, 0x9C,
    ]

    private var bytes: [UInt8] = []

    public init() {}

    /// Adds `chunk` to what arrived so far and reads it again.
    public mutating func feed(_ chunk: some Sequence<UInt8>) -> Outcome {
        bytes.append(contentsOf: chunk)
        let outcome = Self.read(bytes[...])
        if outcome == .needMore, bytes.count >= Self.limit {
            return .malformed("no key exchange within the first \(Self.limit) bytes")
        }
        return outcome
    }

    /// The outcome for a server's first bytes, `bytes`.
    public static func read(_ bytes: ArraySlice<UInt8>) -> Outcome {
        var handshake: [UInt8] = []
        var reader = ByteReader(bytes)
        var first = true
        while let type = reader.uint8() {
            guard let _ = reader.uint16(), let length = reader.uint16() else { return .needMore }
            guard Int(length) <= 16_384 + 2_048 else { return .malformed("a record of \(length) bytes") }
            guard let payload = reader.bytes(Int(length)) else { return .needMore }
            switch type {
            case 22:
                handshake.append(contentsOf: payload)
                if case let .some(outcome) = readHandshake(handshake[...]) { return outcome }
            case 21 where first:
                return .notHandshake
            case 20:
                // ChangeCipherSpec before a key exchange: a TLS 1.2 resumption, no group.
                return readHandshake(handshake[...], ended: true) ?? .needMore
            default:
                return .malformed(first ? "not a TLS handshake (record type \(type))" : "record type \(type) before the key exchange")
            }
            first = false
        }
        return .needMore
    }

    /// The outcome of the handshake messages so far; nil when they are not enough. `ended`: no
    /// more plaintext handshake follows (TLS 1.2 without a ServerKeyExchange).
    static func readHandshake(_ messages: ArraySlice<UInt8>, ended: Bool = false) -> Outcome? {
        var reader = ByteReader(messages)
        var hello: TLSKeyExchange?
        while let type = reader.uint8() {
            guard let length = reader.uint24(), let body = reader.bytes(length) else { return ended ? .malformed("a cut handshake message") : nil }
            if hello == nil {
                guard type == 2 else { return .malformed("the first handshake message is of type \(type), not a ServerHello") }
                switch serverHello(body) {
                case .failure(let unreadable): return .malformed(unreadable.reason)
                case .success(let exchange):
                    if exchange.version == 0x0304 || exchange.helloRetry { return .settled(exchange) }
                    hello = exchange
                }
                continue
            }
            switch type {
            case 12:
                // ServerKeyExchange: ECParameters (named_curve = 3, then the group) for ECDHE.
                let group = body.count >= 3 && body[body.startIndex] == 3
                    ? TLSGroup(rawValue: UInt16(body[body.startIndex + 1]) << 8 | UInt16(body[body.startIndex + 2])) : nil
                return .settled(TLSKeyExchange(version: hello!.version, group: group))
            case 14:
                return .settled(hello!)  // ServerHelloDone with no ServerKeyExchange: RSA key transport
            default:
                continue  // Certificate, CertificateStatus, CertificateRequest
            }
        }
        return ended ? hello.map { .settled($0) } ?? .malformed("no ServerHello") : nil
    }

    /// The version and group a ServerHello (or HelloRetryRequest) body names.
    static func serverHello(_ body: ArraySlice<UInt8>) -> Result<TLSKeyExchange, Unreadable> {
        var reader = ByteReader(body)
        guard let legacyVersion = reader.uint16(), let random = reader.bytes(32), let sessionLength = reader.uint8(),
            reader.bytes(Int(sessionLength)) != nil, reader.uint16() != nil, reader.uint8() != nil
        else { return .failure(Unreadable("a cut ServerHello")) }
        var exchange = TLSKeyExchange(version: legacyVersion, group: nil, helloRetry: Array(random) == helloRetryRandom)
        guard let extensionsLength = reader.uint16() else { return .success(exchange) }
        guard let extensions = reader.bytes(Int(extensionsLength)) else { return .failure(Unreadable("a cut ServerHello extension block")) }
        var list = ByteReader(extensions)
        while let type = list.uint16() {
            guard let length = list.uint16(), let data = list.bytes(Int(length)) else { return .failure(Unreadable("a cut ServerHello extension")) }
            var value = ByteReader(data)
            switch type {
            case 43:  // supported_versions: the selected version
                guard let version = value.uint16() else { return .failure(Unreadable("an empty supported_versions")) }
                exchange.version = version
            case 51:  // key_share: the server's share, or the group a HelloRetryRequest asks for
                guard let group = value.uint16() else { return .failure(Unreadable("an empty key_share")) }
                exchange.group = TLSGroup(rawValue: group)
            default:
                continue
            }
        }
        return .success(exchange)
    }
}

/// Why a ServerHello could not be read, in words.
struct Unreadable: Error {
    let reason: String
    init(_ reason: String) { self.reason = reason }
}

/// Big-endian reads over a slice that answer nil instead of reading past its end.
private struct ByteReader {
    private var rest: ArraySlice<UInt8>
    init(_ bytes: ArraySlice<UInt8>) { rest = bytes }

    mutating func bytes(_ count: Int) -> ArraySlice<UInt8>? {
        guard count >= 0, rest.count >= count else { return nil }
        defer { rest = rest.dropFirst(count) }
        return rest.prefix(count)
    }
    mutating func uint8() -> UInt8? { bytes(1).map { $0[$0.startIndex] } }
    mutating func uint16() -> UInt16? { bytes(2).map { UInt16($0[$0.startIndex]) << 8 | UInt16($0[$0.startIndex + 1]) } }
    mutating func uint24() -> Int? {
        bytes(3).map { Int($0[$0.startIndex]) << 16 | Int($0[$0.startIndex + 1]) << 8 | Int($0[$0.startIndex + 2]) }
    }
}
