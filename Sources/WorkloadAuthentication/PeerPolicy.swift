import FoundationEssentials
import Glibc
import SDSModel

/// Attestation beyond the token: checks on the Unix peer credentials of the connection a call
/// came in on.
///
/// - Allowed UIDs: only processes running as one of these users may call (e.g. Envoy's 1337).
///   Checked before the token is verified, so a refused peer costs no signature check.
/// - Pod binding: the peer's PID is mapped to its pod through `<procRoot>/<pid>/cgroup`, and that
///   pod's UID must be the one the token is bound to (`kubernetes.io.pod.uid`), so a token copied
///   into another pod is useless. Needs the node's PIDs to be visible to the agent (`hostPID`);
///   the kernel reports a peer outside the agent's PID namespace as PID 0, which is refused.
///   A PID can be reused after its process exits; the credentials are read when the stream
///   opens, which keeps that window to the connect-to-stream interval.
public struct PeerPolicy: Sendable, Equatable {
    /// UIDs a peer may run as; empty means any.
    public var allowedUIDs: Set<UInt32>
    /// Whether the token's bound pod must be the peer process's pod.
    public var requirePodBinding: Bool
    /// Where the node's `/proc` is mounted (a fixture directory in tests).
    public var procRoot: String

    /// No peer checks.
    public static let none = PeerPolicy()

    public init(allowedUIDs: Set<UInt32> = [], requirePodBinding: Bool = false, procRoot: String = "/proc") {
        self.allowedUIDs = allowedUIDs
        self.requirePodBinding = requirePodBinding
        self.procRoot = procRoot
    }

    /// Whether any check needs the peer credentials.
    public var requiresPeer: Bool { !allowedUIDs.isEmpty || requirePodBinding }

    /// The checks that need no token: credentials present, UID allowed.
    public func admit(peer: PeerCredentials?) -> AccessDecision {
        guard requiresPeer else { return .allowed }
        guard let peer else {
            return .denied(reason: "the connection's peer credentials are unknown (not a Unix socket connection)")
        }
        if !allowedUIDs.isEmpty, !allowedUIDs.contains(peer.uid) {
            return .denied(reason: "peer uid \(peer.uid) is not allowed; allowed: \(allowedUIDs.sorted().map(String.init).joined(separator: ","))")
        }
        return .allowed
    }

    /// The checks that bind the peer to the authenticated caller: the pod binding.
    public func bind(peer: PeerCredentials?, to caller: AuthenticatedCaller) -> AccessDecision {
        guard requirePodBinding else { return .allowed }
        guard let peer else {
            return .denied(reason: "the connection's peer credentials are unknown (not a Unix socket connection)")
        }
        guard peer.pid > 0 else {
            return .denied(reason: "the peer's PID is not visible to the agent (pod binding needs hostPID)")
        }
        guard let boundPod = caller.podUID else {
            return .denied(reason: "the token is not bound to a pod (no kubernetes.io pod uid); pod binding needs bound tokens")
        }
        let peerPod: String
        switch PodCgroup.podUID(pid: peer.pid, procRoot: procRoot) {
        case .success(let uid): peerPod = uid
        case .failure(let failure): return .denied(reason: failure.message)
        }
        guard peerPod == boundPod.lowercased() else {
            return .denied(reason: "the token is bound to pod \(boundPod) but the caller (pid \(peer.pid)) runs in pod \(peerPod)")
        }
        return .allowed
    }
}

/// Finds a pod UID in the contents of a `/proc/<pid>/cgroup` file.
public enum PodCgroup {
    /// Why a process's pod could not be found, in words.
    public struct Failure: Error, Sendable {
        public var message: String
    }

    /// The pod UID of process `pid`, read from `<procRoot>/<pid>/cgroup`.
    public static func podUID(pid: Int32, procRoot: String) -> Result<String, Failure> {
        let path = "\(procRoot)/\(pid)/cgroup"
        // /proc files report size 0: read until the end, bounded.
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        var bytes: [UInt8] = []
        if fd >= 0 {
            defer { close(fd) }
            var buffer = [UInt8](repeating: 0, count: 4096)
            while bytes.count < 64 * 1024 {
                let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                guard count > 0 else { break }
                bytes += buffer[..<count]
            }
        }
        guard fd >= 0, let contents = String(validating: bytes, as: UTF8.self) else {
            return .failure(Failure(message: "cannot read \(path) to find the peer's pod"))
        }
        guard let uid = podUID(cgroupFile: contents) else {
            return .failure(Failure(message: "peer pid \(pid) is not in a Kubernetes pod's cgroup"))
        }
        return .success(uid)
    }

    /// The pod UID (lowercase, with dashes) of the first cgroup path that names one, else nil.
    ///
    /// Handles both kubelet cgroup drivers: cgroupfs (`/kubepods/burstable/pod<uid>/<container>`)
    /// and systemd (`/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with
    /// underscores>.slice/cri-containerd-<id>.scope`), under cgroup v1 and v2.
    public static func podUID(cgroupFile: String) -> String? {
        for line in cgroupFile.split(whereSeparator: \.isNewline) {
            // hierarchy-ID:controller-list:path
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard fields.count == 3 else { continue }
            for component in fields[2].split(separator: "/") {
                let name = component.hasSuffix(".slice") ? component.dropLast(".slice".count) : component
                guard name.count >= 39 else { continue }
                let candidate = name.suffix(36)
                guard name.dropLast(36).hasSuffix("pod") else { continue }
                let uid = String(candidate.map { $0 == "_" ? "-" : $0 }).lowercased()
                if isUUID(uid) { return uid }
            }
        }
        return nil
    }

    private static func isUUID(_ text: String) -> Bool {
        let groups = text.split(separator: "-", omittingEmptySubsequences: false)
        return groups.map(\.count) == [8, 4, 4, 4, 12] && groups.allSatisfy { $0.allSatisfy(\.isHexDigit) }
    }
}
