import SDSModel
import Testing

/// The server's first flight read as values: records built here byte by byte after RFC 8446 and
/// RFC 5246 (the real handshakes are in TLSLinksTests).
@Suite struct TLSServerFlightTests {
    static func u16(_ value: Int) -> [UInt8] { [UInt8(value >> 8 & 0xFF), UInt8(value & 0xFF)] }
    static func u24(_ value: Int) -> [UInt8] { [UInt8(value >> 16 & 0xFF)] + u16(value) }
    static func record(_ type: UInt8, _ payload: [UInt8]) -> [UInt8] { [type, 3, 3] + u16(payload.count) + payload }
    static func message(_ type: UInt8, _ body: [UInt8]) -> [UInt8] { [type] + u24(body.count) + body }
    static func ext(_ type: Int, _ data: [UInt8]) -> [UInt8] { u16(type) + u16(data.count) + data }

    static func serverHello(random: [UInt8] = Array(repeating: 7, count: 32), extensions: [[UInt8]]?) -> [UInt8] {
        var body = u16(0x0303) + random + [32] + Array(repeating: 1, count: 32) + u16(0x1301) + [0]
        if let extensions {
            let block = extensions.flatMap { $0 }
            body += u16(block.count) + block
        }
        return message(2, body)
    }

    static func tls13(group: Int) -> [UInt8] {
        serverHello(extensions: [ext(43, u16(0x0304)), ext(51, u16(group) + u16(4) + [9, 9, 9, 9])])
    }

    @Test func aTLS13ServerHelloNamesItsGroup() {
        #expect(TLSServerFlight.read(Self.record(22, Self.tls13(group: 0x11EC))[...])
            == .settled(TLSKeyExchange(version: 0x0304, group: .x25519MLKEM768)))
        #expect(TLSServerFlight.read(Self.record(22, Self.tls13(group: 0x1D))[...])
            == .settled(TLSKeyExchange(version: 0x0304, group: .x25519)))
    }

    @Test func aHelloRetryRequestNamesTheGroupItAsksFor() {
        let hello = Self.serverHello(
            random: [
                0xCF, 0x21, 0xAD, 0x74, 0xE5, 0x9A, 0x61, 0x11, 0xBE, 0x1D, 0x8C, 0x02, 0x1E, 0x65, 0xB8, 0x91,
                0xC2, 0xA2, 0x11, 0x16, 0x7A, 0xBB, 0x8C, 0x5E, 0x07, 0x9E, 0x09, 0xE2, 0xC8, 0xA8, 0x33, 0x9C,
            ],
            extensions: [Self.ext(43, Self.u16(0x0304)), Self.ext(51, Self.u16(0x17))])
        #expect(TLSServerFlight.read(Self.record(22, hello)[...])
            == .settled(TLSKeyExchange(version: 0x0304, group: .secp256r1, helloRetry: true)))
    }

    @Test func tls12IsReadFromTheServerKeyExchangeAfterTheCertificate() {
        let hello = Self.serverHello(extensions: [Self.ext(0xFF01, [0])])
        let certificate = Self.message(11, Self.u24(3000) + Array(repeating: 0x30, count: 3000))
        let keyExchange = Self.message(12, [3] + Self.u16(0x1D) + [32] + Array(repeating: 5, count: 32))
        let flight = Self.record(22, hello) + Self.record(22, certificate) + Self.record(22, keyExchange + Self.message(14, []))
        #expect(TLSServerFlight.read(flight[...]) == .settled(TLSKeyExchange(version: 0x0303, group: .x25519)))
        // Without a ServerKeyExchange (RSA key transport): no group.
        let rsa = Self.record(22, hello + certificate + Self.message(14, []))
        #expect(TLSServerFlight.read(rsa[...]) == .settled(TLSKeyExchange(version: 0x0303, group: nil)))
    }

    @Test func bytesFedOneAtATimeSettleOnlyWhenTheHelloIsWhole() {
        let bytes = Self.record(22, Self.tls13(group: 0x11EC))
        var flight = TLSServerFlight()
        for (index, byte) in bytes.enumerated() {
            let outcome = flight.feed([byte])
            #expect(outcome == (index == bytes.count - 1 ? .settled(TLSKeyExchange(version: 0x0304, group: .x25519MLKEM768)) : .needMore))
        }
    }

    @Test func anAlertFirstIsNoHandshakeAndGarbageIsSaidToBe() {
        #expect(TLSServerFlight.read(Self.record(21, [2, 40])[...]) == .notHandshake)
        guard case .malformed = TLSServerFlight.read(Array("HTTP/1.1 400 Bad Request\r\n".utf8)[...]) else {
            Issue.record("plain text read as TLS")
            return
        }
        guard case .malformed = TLSServerFlight.read(Self.record(22, Self.message(11, []))[...]) else {
            Issue.record("a flight that does not start with a ServerHello was taken")
            return
        }
        guard case .malformed = TLSServerFlight.read(Self.record(22, Self.message(2, [3, 3, 1]))[...]) else {
            Issue.record("a cut ServerHello was taken")
            return
        }
    }

    @Test func aFlightThatNeverSettlesIsGivenUpWithinTheLimit() {
        // One handshake message announcing 16 MiB, fed in records: never whole.
        var flight = TLSServerFlight()
        var outcome = flight.feed(Self.record(22, Self.serverHello(extensions: [Self.ext(0xFF01, [0])]) + [11, 0xFF, 0xFF, 0xFF]))
        var fed = 0
        while outcome == .needMore, fed < 2 * TLSServerFlight.limit {
            outcome = flight.feed(Self.record(22, Array(repeating: 0, count: 16_000)))
            fed += 16_005
        }
        guard case .malformed = outcome else {
            Issue.record("still \(outcome) after \(fed) bytes")
            return
        }
        #expect(fed <= TLSServerFlight.limit + 16_005)
    }

    @Test func thePQCPolicyTakesTheHybridGroupOverTLS13Only() {
        #expect(TLSPolicy.pqc.refusal(of: TLSKeyExchange(version: 0x0304, group: .x25519MLKEM768)) == nil)
        #expect(TLSPolicy.pqc.refusal(of: TLSKeyExchange(version: 0x0304, group: .x25519)) == "x25519 is not X25519MLKEM768")
        #expect(TLSPolicy.pqc.refusal(of: TLSKeyExchange(version: 0x0303, group: .x25519)) == "TLS 1.2 has no post-quantum key exchange")
        #expect(TLSPolicy.default.refusal(of: TLSKeyExchange(version: 0x0303, group: nil)) == nil)
        #expect(TLSGroup(rawValue: 0x1234).description == "0x1234")
    }
}
