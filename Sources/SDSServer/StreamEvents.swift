import AsyncAlgorithms
#if canImport(FoundationEssentials)
import FoundationEssentials
import Glibc
#else
import Foundation
#endif
import GRPCCore
import SDSModel

/// What a stream reacts to, in one sequence: Envoy's requests (then their end) and cache updates.
enum StreamEvent<Request: Sendable>: Sendable {
    case request(Request)
    case requestsEnded
    case updated
    case credentialExpiring
    /// The time for the stream's first request ran out (consumed by ``StreamEvents/merged``,
    /// which ends the stream when no request came; never seen by a stream).
    case firstRequestDue
}

enum StreamEvents {
    /// Merges `requests` (followed by `.requestsEnded`), `updates`, and one `.credentialExpiring`
    /// after `wait`, with back-pressure: a request is read only when the stream is ready for it.
    /// A stream whose first request has not come within `firstRequestTimeout` ends with
    /// `deadline_exceeded`: an open stream that asks for nothing may not hold the agent's resources.
    static func merged<Request: Sendable>(
        _ requests: RPCAsyncSequence<Request, any Error>, _ updates: AsyncStream<Void>, credentialExpiresIn wait: Duration,
        firstRequestTimeout: Duration
    ) -> some AsyncSequence<StreamEvent<Request>, any Error> & Sendable {
        // One merge of three: each base costs the merge a task, so both deadlines share one
        // sequence (measured: the nested merge with two timers cost ~20 KiB per open stream).
        FirstRequestDeadline(
            base: merge(
                chain(requests.map { StreamEvent.request($0) }, [StreamEvent<Request>.requestsEnded].async),
                updates.map { StreamEvent<Request>.updated },
                StreamDeadlines<Request>(firstRequest: firstRequestTimeout, credential: wait)),
            timeout: firstRequestTimeout)
    }

    /// Why a stream ended, in words, for its one closing log line.
    static func endReason(_ error: any Error) -> String {
        switch error {
        case let error as RPCError: "\(error.code): \(error.message)"
        case is CancellationError: "Envoy went away, or the agent is shutting down"
        default: "\(error)"
        }
    }

    /// The error that ends a stream whose token is about to expire: Envoy reconnects at once
    /// with the token file it re-reads for every new stream.
    static func credentialExpiring(_ expiry: Date) -> RPCError {
        RPCError(
            code: .unavailable,
            message: "the service-account token this stream was opened with expires at \(expiry.formatted(.iso8601)); reconnect with a fresh token")
    }
}

/// A stream's two deadlines in one sequence: `.firstRequestDue` after `firstRequest`, and
/// `.credentialExpiring` after `credential`, in time order; it ends (nil) when cancelled.
struct StreamDeadlines<Request: Sendable>: AsyncSequence, Sendable {
    let firstRequest: Duration
    let credential: Duration

    struct AsyncIterator: AsyncIteratorProtocol {
        var pending: [(at: ContinuousClock.Instant, event: StreamEvent<Request>)]

        mutating func next() async -> StreamEvent<Request>? {
            guard !pending.isEmpty else { return nil }
            let (at, event) = pending.removeFirst()
            do {
                try await Task.sleep(until: at, clock: .continuous)
            } catch {
                pending = []
                return nil
            }
            return event
        }
    }

    func makeAsyncIterator() -> AsyncIterator {
        let now = ContinuousClock.now
        let deadlines: [(at: ContinuousClock.Instant, event: StreamEvent<Request>)] = [
            (now + Swift.max(firstRequest, .milliseconds(1)), .firstRequestDue),
            (now + Swift.max(credential, .milliseconds(1)), .credentialExpiring),
        ]
        return AsyncIterator(pending: deadlines.sorted { $0.at < $1.at })
    }
}

/// Passes a stream's events through, ending it when `.firstRequestDue` comes before any request.
struct FirstRequestDeadline<Base: AsyncSequence & Sendable, Request: Sendable>: AsyncSequence, Sendable
where Base.Element == StreamEvent<Request> {
    let base: Base
    let timeout: Duration

    struct AsyncIterator: AsyncIteratorProtocol {
        var base: Base.AsyncIterator
        let timeout: Duration
        var sawRequest = false

        mutating func next() async throws -> StreamEvent<Request>? {
            while let event = try await base.next() {
                switch event {
                case .firstRequestDue:
                    guard sawRequest else {
                        throw RPCError(code: .deadlineExceeded, message: "no request on this stream within \(timeout) of opening it")
                    }
                case .request:
                    sawRequest = true
                    return event
                default:
                    return event
                }
            }
            return nil
        }
    }

    func makeAsyncIterator() -> AsyncIterator { AsyncIterator(base: base.makeAsyncIterator(), timeout: timeout) }
}
