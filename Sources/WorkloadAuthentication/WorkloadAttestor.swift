import FoundationEssentials
import Glibc
import SDSModel
import Synchronization

/// What the attestor needs to know about pods: the seam to the Kubernetes API server's pods on
/// this node (``KubernetesPodWatcher`` in the agent), or a fixture in tests.
public protocol PodDirectory: Sendable {
    /// The pod with `uid`, its node's labels included. A pod not known yet is waited for briefly;
    /// then the error is transient (the caller gets `unavailable` and retries).
    func pod(uid: String) async throws(AttestationError) -> PodFacts
}

/// Why a caller could not be attested; the code says how the SDS or Workload API answers.
public struct AttestationError: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Code: String, Sendable, Hashable {
        /// The connection's peer credentials are unknown or its PID is not visible: `permission_denied`.
        case noPeer = "no_peer"
        /// The peer process is not in a pod's cgroup: `permission_denied`.
        case notInPod = "not_in_pod"
        /// The pod is not known (yet) to the API server's answer: `unavailable`.
        case podUnknown = "pod_unknown"
        /// The API server cannot be asked now: `unavailable`.
        case podSourceUnavailable = "pod_source_unavailable"
        /// The attestation policy refuses the pod: `permission_denied`.
        case policy
        /// The identity has rules, but the token names no pod to check them against: `permission_denied`.
        case noBoundPod = "no_bound_pod"
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// Whether retrying may succeed: the caller gets `unavailable`, not `permission_denied`.
    public var isTransient: Bool { code == .podUnknown || code == .podSourceUnavailable }

    public var description: String { message }
}

/// Attestation through the pod: who a peer process is (peer PID → cgroup → pod → its service
/// account), and whether a pod may hold an identity (``AttestationPolicy``).
///
/// Used by the peer-attested socket, where callers send no token, and on the token socket when
/// an attestation policy selects the caller's identity (the pod is then the token's bound pod).
public final class WorkloadAttestor: Sendable {
    private let pods: (any PodDirectory)?
    private let procRoot: String
    private let trustDomain: String
    private let policyState: Mutex<AttestationPolicy>

    public init(pods: (any PodDirectory)?, procRoot: String, trustDomain: String, policy: AttestationPolicy = .none) {
        self.pods = pods
        self.procRoot = procRoot
        self.trustDomain = trustDomain
        self.policyState = Mutex(policy)
    }

    /// The policy in force.
    public var policy: AttestationPolicy { policyState.withLock { $0 } }

    /// Puts `policy` in force (SIGHUP); the caller has checked it with ``AttestationPolicy/problem()``.
    public func replacePolicy(with policy: AttestationPolicy) {
        policyState.withLock { $0 = policy }
    }

    /// The caller behind a connection of the peer-attested socket: the service account of the
    /// pod the peer process runs in, checked against the attestation policy.
    public func attest(peer: PeerCredentials?) async throws(AttestationError) -> (caller: AuthenticatedCaller, pod: PodFacts) {
        guard let peer else { throw AttestationError(.noPeer, "the connection's peer credentials are unknown") }
        guard peer.pid > 0 else {
            throw AttestationError(.noPeer, "the peer's PID is not visible to the agent (attestation needs hostPID)")
        }
        let uid: String
        switch PodCgroup.podUID(pid: peer.pid, procRoot: procRoot) {
        case .success(let found): uid = found
        case .failure(let reason): throw AttestationError(.notInPod, reason.message)
        }
        guard let pods else { throw AttestationError(.podSourceUnavailable, "no pod source: the agent has no API server to ask") }
        let pod = try await pods.pod(uid: uid)
        let id: SPIFFEID
        do {
            id = try SPIFFEID(trustDomain: trustDomain, namespace: pod.namespace, serviceAccount: pod.serviceAccount)
        } catch {
            throw AttestationError(.notInPod, "pod \(pod.namespace)/\(pod.name) has no usable service account: \(error)")
        }
        let caller = AuthenticatedCaller(
            spiffeID: id, namespace: pod.namespace, serviceAccount: pod.serviceAccount, credentialExpiry: .distantFuture,
            podName: pod.name, podUID: pod.uid, subject: "pod \(pod.namespace)/\(pod.name) (pid \(peer.pid))")
        try check(caller, pod: pod)
        return (caller, pod)
    }

    /// The attestation policy for a caller proven by its token: nothing to do unless a rule
    /// selects its identity; then the token's bound pod must meet the rule.
    public func check(_ caller: AuthenticatedCaller) async throws(AttestationError) {
        guard policy.selects(caller.spiffeID, namespace: caller.namespace, serviceAccount: caller.serviceAccount) else { return }
        guard let uid = caller.podUID else {
            throw AttestationError(
                .noBoundPod, "\(caller.spiffeID) has attestation rules, but the token is not bound to a pod (no kubernetes.io pod uid)")
        }
        guard let pods else { throw AttestationError(.podSourceUnavailable, "no pod source: the agent has no API server to ask") }
        let pod = try await pods.pod(uid: uid.lowercased())
        guard pod.namespace == caller.namespace, pod.serviceAccount == caller.serviceAccount else {
            throw AttestationError(
                .policy, "the token's pod \(pod.namespace)/\(pod.name) runs as \(pod.namespace)/\(pod.serviceAccount), not \(caller.namespace)/\(caller.serviceAccount)")
        }
        try check(caller, pod: pod)
    }

    private func check(_ caller: AuthenticatedCaller, pod: PodFacts) throws(AttestationError) {
        if case .denied(let reason) = policy.evaluate(
            caller.spiffeID, namespace: caller.namespace, serviceAccount: caller.serviceAccount, pod: pod)
        {
            throw AttestationError(.policy, reason)
        }
    }
}
