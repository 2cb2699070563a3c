import FoundationEssentials
import Glibc
import KubernetesAPI
import SDSModel

/// Decides whether a node agent may get a certificate for another service account: the check
/// istiod makes for `ImpersonatedIdentity` (`security/pkg/server/ca/node_auth.go`).
public protocol NodeAuthorizer: Sendable {
    /// Succeeds when `caller` runs in a pod that exists (name and UID from its bound token) with
    /// the caller's service account, and a pod of `namespace/serviceAccount` runs on that pod's node.
    func authorize(caller: AuthenticatedCaller, toActAs namespace: String, _ serviceAccount: String)
        async throws(NodeAuthorizationError)
}

/// Why a node may not act for a service account; `isTransient` when the API server could not be asked.
public struct NodeAuthorizationError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public var isTransient: Bool
    public init(_ message: String, isTransient: Bool = false) {
        self.message = message
        self.isTransient = isTransient
    }
    public var description: String { message }
}

/// ``NodeAuthorizer`` through the Kubernetes API: GET the caller's pod, then list the pods on its
/// node in the requested namespace (`fieldSelector=spec.nodeName=…`). Needs RBAC `get` and `list`
/// on pods.
public struct KubernetesNodeAuthorizer: NodeAuthorizer {
    private let api: KubernetesAPIClient

    public init(api: KubernetesAPIClient) { self.api = api }

    private struct Pod: Decodable {
        struct Metadata: Decodable {
            var name: String?
            var uid: String?
        }
        struct Spec: Decodable {
            var serviceAccountName: String?
            var nodeName: String?
        }
        struct Status: Decodable {
            var phase: String?
        }
        var metadata: Metadata
        var spec: Spec?
        var status: Status?
    }

    private struct PodList: Decodable {
        var items: [Pod]
    }

    public func authorize(caller: AuthenticatedCaller, toActAs namespace: String, _ serviceAccount: String)
        async throws(NodeAuthorizationError)
    {
        guard let podName = caller.podName, let podUID = caller.podUID else {
            throw NodeAuthorizationError("the caller's token is not bound to a pod, so its node is unknown")
        }
        guard KubernetesName.isValid(caller.namespace), KubernetesName.isValid(podName), KubernetesName.isValid(namespace)
        else { throw NodeAuthorizationError("a namespace or pod name is not a Kubernetes name") }

        let pod: Pod = try await get("/api/v1/namespaces/\(caller.namespace)/pods/\(podName)")
        guard pod.metadata.uid == podUID else {
            throw NodeAuthorizationError("pod \(caller.namespace)/\(podName) is not the one the token is bound to (UID differs)")
        }
        guard pod.spec?.serviceAccountName == caller.serviceAccount else {
            throw NodeAuthorizationError("pod \(caller.namespace)/\(podName) does not run as \(caller.serviceAccount)")
        }
        guard let node = pod.spec?.nodeName, KubernetesName.isValid(node) else {
            throw NodeAuthorizationError("pod \(caller.namespace)/\(podName) is not scheduled on a node")
        }
        let pods: PodList = try await get(
            "/api/v1/namespaces/\(namespace)/pods?fieldSelector=spec.nodeName%3D\(node)")
        let running = pods.items.contains { $0.spec?.serviceAccountName == serviceAccount && $0.spec?.nodeName == node }
        guard running else {
            throw NodeAuthorizationError("no pod of \(namespace)/\(serviceAccount) runs on node \(node)")
        }
    }

    private func get<T: Decodable>(_ path: String) async throws(NodeAuthorizationError) -> T {
        let data: Data
        do {
            data = try await api.get(path)
        } catch {
            // A 404 is a refusal (no such pod); anything else may pass.
            if error.message.contains("HTTP 404") { throw NodeAuthorizationError("not found: \(path)") }
            throw NodeAuthorizationError(error.message, isTransient: error.isTransient)
        }
        do {
            return try JSONDecoder().decode(T.self, from: data)
        } catch {
            throw NodeAuthorizationError("the API server's answer for \(path) is not what Kubernetes sends: \(error)", isTransient: true)
        }
    }
}
