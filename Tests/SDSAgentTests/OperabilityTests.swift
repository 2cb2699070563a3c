import Foundation
import Logging
import SDSAgent
import Synchronization
import Testing

@Suite struct OperabilityTests {
    final class Lines: Sendable {
        let lines = Mutex<[String]>([])
    }

    @Test func jsonLogLinesParseAndKeepEveryCallerCharacterInsideTheirString() throws {
        let sink = Lines()
        var logger = Logger(label: "t") { label in
            var handler = EscapingLogHandler(wrapping: JSONLogHandler(label: label) { line in sink.lines.withLock { $0.append(line) } })
            handler.logLevel = .debug
            return handler
        }
        logger[metadataKey: "pod"] = "demo/a\"b"
        let forged = "x\n{\"level\":\"critical\"}\u{2028}\\\u{0}\u{1B}[31m"
        logger.warning("refused \(forged)", metadata: ["sub": "\(forged)", "names": .array([.string(forged)]), "n": .dictionary(["k": "v"])])
        let lines = sink.lines.withLock { $0 }
        #expect(lines.count == 1)
        let line = try #require(lines.first)
        #expect(line.hasSuffix("}\n") && line.dropLast().contains("\n") == false)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(object["level"] as? String == "warning")
        #expect(object["pod"] as? String == "demo/a\"b")
        #expect((object["message"] as? String)?.hasPrefix("refused x\\n{") == true, "escaped as in text logs, then JSON-quoted")
        #expect(object["names"] is [Any] && object["n"] is [String: Any])
        #expect(object["time"] is String && object["source"] is String)
    }

    @Test func aSharedLevelChangesEveryHandlerAtOnce() {
        let sink = Lines()
        let level = SharedLogLevel(.info)
        let logger = Logger(label: "t") { label in
            var handler = EscapingLogHandler(wrapping: JSONLogHandler(label: label) { line in sink.lines.withLock { $0.append(line) } })
            handler.sharedLevel = level
            return handler
        }
        logger.debug("hidden")
        level.level = .debug
        logger.debug("shown")
        #expect(sink.lines.withLock { $0.count } == 1)
        #expect(SharedLogLevel.parse("DEBUG") == .debug && SharedLogLevel.parse("verbose") == nil)
    }

    @Test(arguments: ["24h", "1h30m", "1m30s", "500ms", "0s", "876000h", "1h1m1s1ms", "30s"])
    func durationsPrintAsTheyParse(_ text: String) throws {
        let duration = try #require(DurationText.parse(text))
        #expect(DurationText.format(duration) == text)
    }

    @Test func readinessNamesTheFirstUnmetCondition() {
        let readiness = AgentReadiness()
        let keys = Mutex(false)
        readiness.add { keys.withLock { $0 } ? nil : "no keys" }
        readiness.add { nil }
        #expect(readiness.notReadyReason == "the SDS socket is not listening yet")
        readiness.markListening()
        #expect(readiness.notReadyReason == "no keys")
        keys.withLock { $0 = true }
        #expect(readiness.notReadyReason == nil)
    }

    @Test func everyTypeLineGetsItsHelpLine() {
        let exposition = "# TYPE sds_agent_open_streams gauge\nsds_agent_open_streams{api=\"sotw\"} 1\n# TYPE other_metric counter\nother_metric 2\n"
        let annotated = String(decoding: MetricsHelp.annotate(Array(exposition.utf8)), as: UTF8.self)
        #expect(annotated.hasPrefix("# HELP sds_agent_open_streams "))
        #expect(annotated.contains("# TYPE sds_agent_open_streams gauge\nsds_agent_open_streams{api=\"sotw\"} 1\n# TYPE other_metric"))
        #expect(annotated.hasSuffix("other_metric 2\n"))
    }
}
