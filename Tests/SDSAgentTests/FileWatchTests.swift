import Foundation
import SDSAgent
import TestSupport
import Testing

/// The one poller of operator files, on a clock the test moves: no real waiting.
@Suite(.timeLimit(.minutes(1))) struct FileWatchTests {
    @Test func reportsWhatChangedAtTheNextPollAndNothingElse() async throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (a, b) = (dir + "/a.pem", dir + "/b.pem")
        try Data("1".utf8).write(to: URL(fileURLWithPath: a))
        let clock = TestClock()
        let ticks = Counter()
        let (changes, sink) = AsyncStream.makeStream(of: [String].self)
        let watch = FileWatch(paths: [a, b], clock: clock)
        let task = Task { await watch.run(tick: { ticks.increment() }) { sink.yield($0) } }
        defer { task.cancel() }
        var changed = changes.makeAsyncIterator()

        #expect(await clock.sleeping())
        try Data("2".utf8).write(to: URL(fileURLWithPath: a))
        try Data("x".utf8).write(to: URL(fileURLWithPath: b))  // a file that appears is a change
        #expect(ticks.count == 0, "nothing happens before the interval has passed")
        clock.advance(by: .seconds(2))
        #expect(await changed.next() == [a, b])
        #expect(await clock.sleeping())
        #expect(ticks.count == 1)

        clock.advance(by: .seconds(2))  // nothing changed: a tick, no report
        #expect(await clock.sleeping())
        #expect(ticks.count == 2)
        try FileManager.default.removeItem(atPath: b)  // a file that goes is a change
        clock.advance(by: .seconds(2))
        #expect(await changed.next() == [b], "the unchanged poll reported nothing")

        task.cancel()
        await task.value
    }
}
