import Logging
import SDSAgent
import Synchronization
import Testing

/// Collects what reaches the wrapped handler.
struct RecordingLogHandler: LogHandler {
    let box: EscapingLogHandlerTests.Box
    var logLevel: Logger.Level = .trace
    var metadata: Logger.Metadata = [:]
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        let fields = (event.metadata ?? [:]).sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        box.lines.withLock { $0.append("\(event.level) \(fields) \(event.message)") }
    }
}

@Suite struct EscapingLogHandlerTests {
    @Test func aCallersNewlineNeverStartsALineAnywhereInTheEvent() {
        let box = Box()
        var logger = Logger(label: "t") { _ in EscapingLogHandler(wrapping: RecordingLogHandler(box: box)) }
        let forged = "x\n2026-11-30T03:00:00+0000 critical sds-agent: forged\r\0"
        logger[metadataKey: "pod"] = "\(forged)"  // handler metadata (set once per stream)
        logger.warning(
            "rejected \(forged)",
            metadata: ["kid": "\(forged)", "names": .array([.string(forged)]), "nested": .dictionary(["k\n": .string(forged)])])
        let lines = box.lines.withLock { $0 }
        #expect(lines.count == 1)
        let line = lines[0]
        #expect(!line.contains("\n") && !line.contains("\r") && !line.contains("\0"))
        #expect(line.contains("pod=x\\n2026-11-30T03:00:00+0000 critical sds-agent: forged\\r\\0"))
        #expect(line.contains("kid=x\\n2026") && line.contains("rejected x\\n2026"))
    }

    @Test func boundsEveryValueAndTheMessage() {
        let box = Box()
        let logger = Logger(label: "t") { _ in
            EscapingLogHandler(wrapping: RecordingLogHandler(box: box), messageLimit: 50, valueLimit: 20)
        }
        logger.info("\(String(repeating: "m", count: 65536))", metadata: ["v": "\(String(repeating: "v", count: 65536))"])
        let line = box.lines.withLock { $0[0] }
        #expect(line.count < 200)
        #expect(line.contains("(+65516 bytes)") && line.contains("(+65486 bytes)"))
    }

    final class Box: Sendable {
        let lines = Mutex<[String]>([])
    }
}
