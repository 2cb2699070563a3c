/// What the agent knows about a pod from the Kubernetes API server, for attestation: who it runs
/// as, what it runs, how it is labelled, and where.
public struct PodFacts: Sendable, Hashable {
    /// One container of the pod.
    public struct Container: Sendable, Hashable {
        /// The container's name in the pod spec.
        public var name: String
        /// The image reference the spec asks for (e.g. `registry.example/app:1.2`).
        public var image: String
        /// The image the runtime resolved, from the pod status (`imageID`, e.g.
        /// `registry.example/app@sha256:…`); nil until the container has been created.
        public var imageID: String?

        public init(name: String, image: String, imageID: String? = nil) {
            self.name = name
            self.image = image
            self.imageID = imageID
        }

        /// The digest the runtime resolved (`sha256:…`), when the status names one.
        public var digest: String? {
            guard let imageID, let at = imageID.lastIndex(of: "@") else {
                // Some runtimes report a bare digest.
                return imageID.flatMap { $0.hasPrefix("sha256:") ? $0 : nil }
            }
            return String(imageID[imageID.index(after: at)...])
        }
    }

    public var uid: String
    public var namespace: String
    public var name: String
    public var serviceAccount: String
    /// The node the pod is scheduled on (`spec.nodeName`).
    public var nodeName: String
    public var labels: [String: String]
    /// The pod's containers (not its init containers, which have finished before it is served).
    public var containers: [Container]
    /// The labels of the pod's node.
    public var nodeLabels: [String: String]

    public init(
        uid: String, namespace: String, name: String, serviceAccount: String, nodeName: String = "",
        labels: [String: String] = [:], containers: [Container] = [], nodeLabels: [String: String] = [:]
    ) {
        self.uid = uid
        self.namespace = namespace
        self.name = name
        self.serviceAccount = serviceAccount
        self.nodeName = nodeName
        self.labels = labels
        self.containers = containers
        self.nodeLabels = nodeLabels
    }
}
