import Synchronization

/// Counts the streams open now against two limits, shared by every stream of one server: all
/// streams together, and the streams of one caller (its pod where the token names one, else its
/// identity), so that one caller holding its maximum leaves room for everyone else.
final class StreamSlots: Sendable {
    /// Why a slot was not given.
    enum Refusal: Equatable {
        /// Every slot of the agent is taken.
        case agentFull
        /// This caller holds its share.
        case callerFull
    }

    private struct State {
        var total = 0
        var perCaller: [String: Int] = [:]
    }

    private let limit: Int
    private let perCallerLimit: Int
    private let state = Mutex(State())

    init(limit: Int, perCallerLimit: Int) {
        self.limit = limit
        self.perCallerLimit = perCallerLimit
    }

    /// Takes a slot for `caller`; the refusal when none may be taken.
    func acquire(for caller: String) -> Refusal? {
        state.withLock { state in
            guard state.total < limit else { return .agentFull }
            let held = state.perCaller[caller, default: 0]
            guard held < perCallerLimit else { return .callerFull }
            state.total += 1
            state.perCaller[caller] = held + 1
            return nil
        }
    }

    /// Gives back a slot taken with ``acquire(for:)``.
    func release(for caller: String) {
        state.withLock { state in
            state.total -= 1
            let held = state.perCaller[caller, default: 1] - 1
            state.perCaller[caller] = held > 0 ? held : nil
        }
    }
}
