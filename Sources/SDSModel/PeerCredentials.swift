/// The Unix peer credentials of the process at the other end of a connection (`SO_PEERCRED`).
///
/// The kernel records them when the peer calls `connect(2)`, so a caller cannot choose them. The
/// agent reads them once per HTTP/2 stream and hands them to the SDS service in call metadata
/// under ``metadataKey``; whatever a client sent under that key is removed first.
public struct PeerCredentials: Hashable, Sendable, CustomStringConvertible {
    /// Process ID, in the agent's PID namespace (0 when the peer is not visible there).
    public var pid: Int32
    /// Effective user ID of the peer at connect time.
    public var uid: UInt32
    /// Effective group ID of the peer at connect time.
    public var gid: UInt32
    /// Which of the agent's sockets the connection came in on.
    public var socket: Socket

    /// The agent's sockets: the token socket (`--socket`), where callers prove themselves with a
    /// service-account token, and the peer-attested socket (`--workload-socket`), where the
    /// calling process's pod is the proof.
    public enum Socket: String, Sendable, Hashable {
        case token
        case workload
    }

    public init(pid: Int32, uid: UInt32, gid: UInt32, socket: Socket = .token) {
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.socket = socket
    }

    /// The call-metadata key the transport writes the credentials under.
    public static let metadataKey = "x-sds-agent-peer"

    /// The metadata value, `pid=<pid>;uid=<uid>;gid=<gid>`, then `;socket=workload` for the
    /// peer-attested socket.
    public var metadataValue: String {
        "pid=\(pid);uid=\(uid);gid=\(gid)" + (socket == .workload ? ";socket=workload" : "")
    }

    /// Parses ``metadataValue``; nil for anything else.
    public init?(metadataValue: String) {
        var fields: [Substring: Substring] = [:]
        for part in metadataValue.split(separator: ";") {
            let pair = part.split(separator: "=", maxSplits: 1)
            guard pair.count == 2, fields.updateValue(pair[1], forKey: pair[0]) == nil else { return nil }
        }
        let socket = fields["socket"].map { Socket(rawValue: String($0)) } ?? .token
        guard fields.count == (fields["socket"] == nil ? 3 : 4), let socket, let pid = fields["pid"].flatMap({ Int32($0) }),
            let uid = fields["uid"].flatMap({ UInt32($0) }), let gid = fields["gid"].flatMap({ UInt32($0) })
        else { return nil }
        self.init(pid: pid, uid: uid, gid: gid, socket: socket)
    }

    public var description: String { metadataValue }
}
