import SDSModel
import Synchronization

/// Who holds a stream open now: per identity, the pods (from their bound tokens) and how many
/// streams each has. What `sds-agent inspect` shows next to each certificate.
public final class OpenStreams: Sendable {
    /// One identity's open streams.
    public struct Entry: Sendable, Hashable {
        /// Streams open for the identity.
        public var streams: Int
        /// Streams per pod (`namespace/name`; `-` for tokens bound to no pod).
        public var pods: [String: Int]
    }

    private let entries = Mutex<[SPIFFEID: Entry]>([:])

    public init() {}

    func opened(by caller: AuthenticatedCaller) {
        let pod = caller.podName.map { "\(caller.namespace)/\($0)" } ?? "-"
        entries.withLock { entries in
            entries[caller.spiffeID, default: Entry(streams: 0, pods: [:])].streams += 1
            entries[caller.spiffeID]?.pods[pod, default: 0] += 1
        }
    }

    func closed(by caller: AuthenticatedCaller) {
        let pod = caller.podName.map { "\(caller.namespace)/\($0)" } ?? "-"
        entries.withLock { entries in
            guard var entry = entries[caller.spiffeID] else { return }
            entry.streams -= 1
            entry.pods[pod, default: 1] -= 1
            if entry.pods[pod] == 0 { entry.pods[pod] = nil }
            entries[caller.spiffeID] = entry.streams > 0 ? entry : nil
        }
    }

    /// Every identity with a stream open now.
    public var snapshot: [SPIFFEID: Entry] { entries.withLock { $0 } }
}
