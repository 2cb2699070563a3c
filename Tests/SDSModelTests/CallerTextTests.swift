import SDSModel
import Testing

@Suite struct CallerTextTests {
    static let forged = "2026-11-30T03:00:00+0000 critical sds-agent: forged"

    @Test(arguments: [
        ("x\n\(forged)", "x\\n\(forged)"),
        ("x\r\(forged)", "x\\r\(forged)"),
        ("a\0b", "a\\0b"),
        ("tab\there", "tab\\there"),
        ("esc\u{1B}[2J bell\u{07} del\u{7F} nel\u{85}", "esc\\u{1B}[2J bell\\u{07} del\\u{7F} nel\\u{85}"),
        ("ls\u{2028}ps\u{2029}rlo\u{202E}bom\u{FEFF}", "ls\\u{2028}ps\\u{2029}rlo\\u{202E}bom\\u{FEFF}"),
        ("back\\slash\\n", "back\\\\slash\\\\n"),
        ("spiffe://cluster.local/ns/demo/sa/frontend", "spiffe://cluster.local/ns/demo/sa/frontend"),
        ("ünïcødé 名前 ✓", "ünïcødé 名前 ✓"),
    ])
    func escapesWhatCouldBreakALine(_ raw: String, _ expected: String) {
        let text = CallerText(raw).description
        #expect(text == expected)
        #expect(!text.unicodeScalars.contains { $0.value < 0x20 || (0x7F...0x9F).contains($0.value) })
    }

    @Test func boundsA64KiBValueAndSaysHowMuchWasLeftOut() {
        let text = CallerText(String(repeating: "A", count: 65536), limit: 100).description
        #expect(text == String(repeating: "A", count: 100) + "…(+65436 bytes)")
    }

    @Test func escapesInvalidUTF8ByteByByte() {
        let text = CallerText(bytes: [0x78, 0xFF, 0xFE, 0xC3, 0x28, 0xED, 0xA0, 0x80, 0x0A, 0x79] as [UInt8]).description
        #expect(text == "x\\xFF\\xFE\\xC3(\\xED\\xA0\\x80\\ny")
        #expect(CallerText(bytes: Array("héllo".utf8)).description == "héllo")
    }

    /// Whatever the input, the output is one printable line within its bound, and never traps.
    @Test func randomBytesAlwaysGiveOneBoundedLine() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let count = Int.random(in: 0...300, using: &generator)
            let bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let text = CallerText(bytes: bytes, limit: 64).description
            #expect(!text.contains("\n") && !text.contains("\r") && !text.contains("\0"))
            #expect(text.unicodeScalars.count <= 64 * 8 + 32, "at most 8 per kept character (\\u{XXXX}) and the cut note")
        }
    }
}

@Suite struct LogThrottleTests {
    @Test func letsOneLineASecondThroughPerKeyAndCountsTheRest() {
        let throttle = LogThrottle(interval: .seconds(1))
        let start = ContinuousClock.now
        #expect(throttle.admit("a", now: start) == 0)
        #expect(throttle.admit("a", now: start + .milliseconds(10)) == nil)
        #expect(throttle.admit("a", now: start + .milliseconds(20)) == nil)
        #expect(throttle.admit("b", now: start + .milliseconds(20)) == 0)
        #expect(throttle.admit("a", now: start + .milliseconds(1100)) == 2)
    }
}
