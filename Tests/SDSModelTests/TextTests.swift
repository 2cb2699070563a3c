import Foundation
import Testing
import SDSModel

/// The text helpers every module uses instead of Foundation proper's.
@Suite struct TextTests {
    @Test func trimmedDropsWhitespaceAndNewlinesAtBothEndsOnly() {
        #expect("  a b\n".trimmed == "a b")
        #expect("\t\r\n".trimmed == "")
        #expect("".trimmed == "")
        #expect("eyJ.x.y".trimmed == "eyJ.x.y")
        #expect("\u{00A0}é token\u{2003}".trimmed == "é token")
        #expect(" inner ".dropFirst().trimmed == "inner")
    }

    @Test func base64URLRoundTripsEveryLengthWithoutPaddingAndMatchesFoundation() throws {
        for length in 0..<100 {
            let bytes = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 71 &+ 5) }
            let encoded = Base64URL.encode(bytes)
            let foundation = Data(bytes).base64EncodedString()
                .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
                .replacingOccurrences(of: "=", with: "")
            #expect(encoded == foundation)
            #expect(Base64URL.decode(encoded) == bytes)
        }
    }

    @Test func pemLinesAre64CharactersOfPaddedBase64() {
        let der = [UInt8](repeating: 0xfb, count: 100)
        let lines = PEM.encode(der, label: "X").split(separator: "\n", omittingEmptySubsequences: false)
        #expect(lines.first == "-----BEGIN X-----")
        #expect(lines.dropFirst().first?.count == 64)
        #expect(lines[2].count == 64)
        #expect(lines[3].count == 8 && lines[3].hasSuffix("=="))
        #expect(lines.suffix(2) == ["-----END X-----", ""])
        #expect(Data(base64Encoded: lines[1...3].joined()) == Data(der))
    }
}
