import FoundationEssentials
import Glibc
import GRPCCore
import SDSModel

/// What a stream reacts to, in one sequence: Envoy's requests (then their end) and cache updates.
package enum StreamEvent<Request: Sendable>: Sendable {
    case request(Request)
    case requestsEnded
    case updated
    case credentialExpiring
    /// The time for the stream's first request ran out (consumed by ``FirstRequestDeadline``,
    /// which ends the stream when no request came; never seen by a stream).
    case firstRequestDue
}

enum StreamEvents {
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

/// Passes a stream's events through, ending it when `.firstRequestDue` comes before any request.
package struct FirstRequestDeadline<Base: AsyncSequence & Sendable, Request: Sendable>: AsyncSequence, Sendable
where Base.Element == StreamEvent<Request> {
    package let base: Base
    package let timeout: Duration

    package init(base: Base, timeout: Duration) {
        self.base = base
        self.timeout = timeout
    }

    package struct AsyncIterator: AsyncIteratorProtocol {
        var base: Base.AsyncIterator
        let timeout: Duration
        var sawRequest = false

        package mutating func next() async throws -> StreamEvent<Request>? {
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

    package func makeAsyncIterator() -> AsyncIterator { AsyncIterator(base: base.makeAsyncIterator(), timeout: timeout) }
}
