import AsyncAlgorithms
import Foundation
import GRPCCore
import SDSModel

/// What a stream reacts to, in one sequence: Envoy's requests (then their end) and cache updates.
enum StreamEvent<Request: Sendable>: Sendable {
    case request(Request)
    case requestsEnded
    case updated
    case credentialExpiring
}

enum StreamEvents {
    /// Merges `requests` (followed by `.requestsEnded`), `updates`, and one `.credentialExpiring`
    /// after `wait`, with back-pressure: a request is read only when the stream is ready for it.
    static func merged<Request: Sendable>(
        _ requests: RPCAsyncSequence<Request, any Error>, _ updates: AsyncStream<Void>, credentialExpiresIn wait: Duration
    ) -> some AsyncSequence<StreamEvent<Request>, any Error> & Sendable {
        merge(
            chain(requests.map { StreamEvent.request($0) }, [StreamEvent<Request>.requestsEnded].async),
            updates.map { StreamEvent<Request>.updated },
            AsyncTimerSequence(interval: max(wait, Duration.milliseconds(1)), clock: .continuous).prefix(1)
                .map { _ in StreamEvent<Request>.credentialExpiring })
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
