/// Runs `work` and waits for it at most `limit`; past that, returns while `work` goes on.
///
/// A task group cannot do this: it waits for every child, and a child awaiting work that ignores
/// cancellation (an HTTP client's shutdown, a shared fetch) holds it. Here the work runs in its
/// own task and signals a stream, and iterating a stream stops when its task is cancelled.
/// Returns whether `work` finished in time.
@discardableResult
public func waitAtMost(_ limit: Duration, for work: @escaping @Sendable () async -> Void) async -> Bool {
    let (done, finished) = AsyncStream.makeStream(of: Void.self)
    Task {
        await work()
        finished.yield()
        finished.finish()
    }
    return await withTaskGroup(of: Bool.self) { group in
        group.addTask {
            for await _ in done { return true }
            return false
        }
        group.addTask {
            try? await Task.sleep(for: limit)
            return false
        }
        let first = await group.next() ?? false
        group.cancelAll()
        return first
    }
}
