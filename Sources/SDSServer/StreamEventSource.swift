import Dispatch
import GRPCCore
import SDSModel
import WorkloadServing
import Synchronization

/// What one stream reacts to, in one sequence, for the cost of one task: Envoy's requests (read
/// by that task, one at a time, only once the stream has taken the previous one: back-pressure),
/// the cache's change signal (a callback that records and wakes), and the two deadlines (Dispatch
/// timers). An `AsyncAlgorithms.merge` of the same sources ran a task per source and one more.
///
/// Events come in this order when several are ready: a request, then a change, then a deadline,
/// then the end of the requests. ``finish()`` (the stream's end) stops the reader, the watch and
/// the timers.
package final class StreamEventSource<Request: Sendable>: AsyncSequence, Sendable {
    package typealias Element = StreamEvent<Request>

    private struct State {
        var request: Request?
        var requestsEnded = false
        var endReported = false
        var failure: (any Error)?
        var updated = false
        var firstRequestDue = false
        var credentialExpiring = false
        var cancelled = false
        /// The stream waiting for an event.
        var waiter: CheckedContinuation<Void, Never>?
        /// The reader waiting for the stream to take the request it holds.
        var reader: CheckedContinuation<Void, Never>?

        /// Whether ``next()`` has something to return (an event, a failure, or the end).
        /// What ``StreamEventSource/next()`` does now, in a fixed order: a request, an update, the
        /// token deadline, the first-request deadline, a failure, the end of the requests; else wait.
        mutating func take() -> Step {
            // Finished: nothing more is delivered, whatever was pending.
            if cancelled { return .end }
            if let pending = request {
                request = nil
                defer { reader = nil }
                return .event(.request(pending), wake: reader)
            }
            if updated {
                updated = false
                return .event(.updated, wake: nil)
            }
            if credentialExpiring {
                credentialExpiring = false
                return .event(.credentialExpiring, wake: nil)
            }
            if firstRequestDue {
                firstRequestDue = false
                return .event(.firstRequestDue, wake: nil)
            }
            if let pending = failure {
                failure = nil
                endReported = true
                return .fail(pending)
            }
            if requestsEnded && !endReported {
                endReported = true
                return .event(.requestsEnded, wake: nil)
            }
            return .wait
        }

        var isReady: Bool {
            cancelled || request != nil || updated || credentialExpiring || firstRequestDue || failure != nil
                || (requestsEnded && !endReported)
        }
    }

    private let state = Mutex(State())
    private let resources = Mutex<(task: Task<Void, Never>?, watch: SecretWatch?, timers: [DeadlineTimer])>((nil, nil, []))

    /// Starts reading `requests`, watching `identity` in `secrets`, and both deadlines on `deadlines`.
    package init(
        requests: RPCAsyncSequence<Request, any Error>, secrets: any SecretSource, identity: SPIFFEID,
        firstRequestTimeout: Duration, credentialExpiresIn: Duration, deadlines: any DeadlineScheduler = DispatchDeadlines()
    ) {
        let watch = secrets.watch(identity) { [weak self] in self?.deliver { $0.updated = true } }
        let timers = [
            deadlines.schedule(after: firstRequestTimeout) { [weak self] in self?.deliver { $0.firstRequestDue = true } },
            deadlines.schedule(after: credentialExpiresIn) { [weak self] in self?.deliver { $0.credentialExpiring = true } },
        ]
        let task = Task { [weak self] in
            var iterator = requests.makeAsyncIterator()
            do {
                while let request = try await iterator.next() {
                    guard let self else { return }
                    await self.hand(request)
                    if Task.isCancelled { return }
                }
                self?.deliver { $0.requestsEnded = true }
            } catch {
                self?.deliver { $0.failure = error }
            }
        }
        resources.withLock { $0 = (task, watch, timers) }
    }

    /// Stops the reader, the watch and the timers; a waiting stream gets nil.
    package func finish() {
        let (task, watch, timers) = resources.withLock { resources in
            defer { resources = (nil, nil, []) }
            return resources
        }
        task?.cancel()
        watch?.cancel()
        for timer in timers { timer.cancel() }
        let (waiter, reader) = state.withLock { state in
            state.cancelled = true
            defer { (state.waiter, state.reader) = (nil, nil) }
            return (state.waiter, state.reader)
        }
        waiter?.resume()
        reader?.resume()
    }

    deinit { finish() }

    /// Records what happened and wakes the stream if it waits.
    private func deliver(_ mark: (inout State) -> Void) {
        let waiter = state.withLock { state in
            mark(&state)
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume()
    }

    /// The reader's side: hands `request` over and waits until the stream has taken it.
    private func hand(_ request: Request) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
                if state.cancelled {
                    continuation.resume()
                    return nil
                }
                state.request = request
                state.reader = continuation
                defer { state.waiter = nil }
                return state.waiter
            }
            waiter?.resume()
        }
    }

    private enum Step {
        case event(StreamEvent<Request>, wake: CheckedContinuation<Void, Never>?)
        case fail(any Error)
        case end
        case wait
    }

    /// The next event, or nil once finished; throws what the request sequence threw, or
    /// `CancellationError` when the stream's task is cancelled.
    private func next() async throws -> StreamEvent<Request>? {
        while true {
            try Task.checkCancellation()
            let step = state.withLock { $0.take() }
            switch step {
            case .event(let event, let wake):
                wake?.resume()
                return event
            case .fail(let error):
                throw error
            case .end:
                return nil
            case .wait:
                await waitUntilReady()
            }
        }
    }

    /// Suspends until an event is pending or the task is cancelled.
    private func waitUntilReady() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let ready = state.withLock { state -> Bool in
                    let ready = Task.isCancelled || state.isReady
                    if !ready { state.waiter = continuation }
                    return ready
                }
                if ready { continuation.resume() }
            }
        } onCancel: {
            let waiter = state.withLock { state in
                defer { state.waiter = nil }
                return state.waiter
            }
            waiter?.resume()
        }
    }

    package struct AsyncIterator: AsyncIteratorProtocol {
        let source: StreamEventSource
        package mutating func next() async throws -> StreamEvent<Request>? { try await source.next() }
    }

    package func makeAsyncIterator() -> AsyncIterator { AsyncIterator(source: self) }
}

/// A scheduled deadline, cancelled from any thread.
package struct DeadlineTimer: Sendable {
    package let cancel: @Sendable () -> Void
    package init(cancel: @escaping @Sendable () -> Void) { self.cancel = cancel }
}

/// Where a stream's deadlines are scheduled: Dispatch in the agent, a manual clock in tests.
package protocol DeadlineScheduler: Sendable {
    /// Calls `fire` once `delay` has passed, unless the returned timer is cancelled first.
    func schedule(after delay: Duration, _ fire: @escaping @Sendable () -> Void) -> DeadlineTimer
}

/// Deadlines as Dispatch work items: no task per deadline.
package struct DispatchDeadlines: DeadlineScheduler {
    package init() {}

    /// `DispatchWorkItem.cancel()` may be called from any thread.
    private struct Item: @unchecked Sendable {
        let item: DispatchWorkItem
    }

    package func schedule(after delay: Duration, _ fire: @escaping @Sendable () -> Void) -> DeadlineTimer {
        let parts = Swift.max(delay, .milliseconds(1)).components
        let milliseconds = Swift.min(parts.seconds, 400 * 86400) * 1000 + parts.attoseconds / 1_000_000_000_000_000
        let item = Item(item: DispatchWorkItem(block: fire))
        DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(Int(milliseconds)), execute: item.item)
        return DeadlineTimer { item.item.cancel() }
    }
}
