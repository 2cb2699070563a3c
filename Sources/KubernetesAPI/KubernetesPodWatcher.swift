import FoundationEssentials
import Glibc
import Logging
import SDSModel
import Synchronization

/// The pods on this node and the node's labels, from the API server: listed, then watched
/// (`GET /api/v1/pods?fieldSelector=spec.nodeName=NODE`, then the same with `watch=1` from the
/// list's resourceVersion), relisted when the watch ends or breaks, and the node object read
/// again every ``Configuration/nodeRefreshInterval``.
///
/// Needs RBAC `get`, `list`, `watch` on pods and `get` on nodes (Deploy/optional).
public final class KubernetesPodWatcher: Sendable {
    public struct Configuration: Sendable {
        /// This node (`spec.nodeName`, from the downward API).
        public var nodeName: String
        /// How long a lookup of a pod not known yet waits (relisting) before it gives up.
        public var lookupTimeout: Duration = .seconds(3)
        /// How often the node's labels are read again.
        public var nodeRefreshInterval: Duration = .seconds(30)
        /// How long one watch request lasts before the server ends it and it is renewed.
        public var watchTimeout: Duration = .seconds(300)

        public init(nodeName: String) { self.nodeName = nodeName }
    }

    private struct State {
        var pods: [String: PodFacts] = [:]
        var nodeLabels: [String: String] = [:]
        var listed = false
        var lastOnDemandList = ContinuousClock.now - .seconds(60)
    }

    public let configuration: Configuration
    private let client: KubernetesAPIClient
    private let logger: Logger
    private let state = Mutex(State())
    private let clock: any Clock<Duration>

    /// The relist backoff and the node refresh wait on `clock` (tests move one of their own).
    public init(client: KubernetesAPIClient, configuration: Configuration, clock: any Clock<Duration> = ContinuousClock(), logger: Logger) {
        self.client = client
        self.clock = clock
        self.configuration = configuration
        self.logger = logger
    }

    /// Whether the pods on this node have been listed once.
    public var hasListed: Bool { state.withLock { $0.listed } }

    /// How many pods on this node are known.

    /// The pod with `uid`, with its node's labels; a pod not known yet is looked for again (a
    /// list, at most every 500 ms) until ``Configuration/lookupTimeout``, then nil.
    public func lookup(uid: String) async -> PodFacts? {
        let deadline = ContinuousClock.now + configuration.lookupTimeout
        while true {
            if let pod = known(uid) { return pod }
            guard ContinuousClock.now < deadline, !Task.isCancelled else { return nil }
            let listNow = state.withLock { state in
                guard ContinuousClock.now - state.lastOnDemandList >= .milliseconds(500) else { return false }
                state.lastOnDemandList = .now
                return true
            }
            if listNow {
                _ = try? await list(replacing: false)
            } else {
                try? await Task.sleep(for: .milliseconds(100))
            }
        }
    }

    private func known(_ uid: String) -> PodFacts? {
        state.withLock { state in
            guard var pod = state.pods[uid] else { return nil }
            pod.nodeLabels = state.nodeLabels
            return pod
        }
    }

    /// Lists, watches and relists until cancelled; reads the node's labels alongside.
    public func run() async {
        await withDiscardingTaskGroup { group in
            group.addTask { await self.refreshNode() }
            await self.listAndWatch()
            group.cancelAll()
        }
    }

    private var podsPath: String { "/api/v1/pods?fieldSelector=spec.nodeName%3D\(configuration.nodeName)" }

    private func listAndWatch() async {
        var backoff = Duration.milliseconds(500)
        while !Task.isCancelled {
            do {
                let version = try await list(replacing: true)
                backoff = .milliseconds(500)
                try await watch(from: version)
            } catch {
                if Task.isCancelled { return }
                logger.warning(
                    "cannot list or watch this node's pods; attestation waits for them",
                    metadata: ["node": "\(configuration.nodeName)", "error": "\(error)", "retry_in": "\(backoff)"])
                try? await clock.sleep(for: backoff)
                backoff = min(backoff * 2, .seconds(10))
            }
        }
    }

    /// Lists the node's pods; `replacing` drops the ones no longer there (a relist), otherwise
    /// only adds and updates (an on-demand lookup beside a running watch). Returns the list's
    /// resourceVersion.
    @discardableResult
    private func list(replacing: Bool) async throws(KubernetesAPIError) -> String? {
        let data = try await client.get(podsPath)
        let list: PodListObject
        do {
            list = try JSONDecoder().decode(PodListObject.self, from: data)
        } catch {
            throw KubernetesAPIError(message: "the pod list is not a PodList: \(error)", isTransient: true)
        }
        let pods = list.items.compactMap(\.facts)
        let wasListed = state.withLock { state in
            if replacing { state.pods = [:] }
            for pod in pods { state.pods[pod.uid] = pod }
            defer { state.listed = true }
            return state.listed
        }
        if !wasListed {
            logger.info("pods on this node listed", metadata: ["node": "\(configuration.nodeName)", "pods": "\(pods.count)"])
        }
        return list.metadata?.resourceVersion
    }

    private func watch(from version: String?) async throws(KubernetesAPIError) {
        var path = podsPath + "&watch=1&allowWatchBookmarks=true&timeoutSeconds=\(configuration.watchTimeout.components.seconds)"
        if let version { path += "&resourceVersion=\(version)" }
        var gone = false
        try await client.streamLines(path, deadline: configuration.watchTimeout + .seconds(30)) { line in
            guard let event = try? JSONDecoder().decode(WatchEvent.self, from: line) else {
                logger.debug("ignored a watch line that is not an event")
                return
            }
            switch event.type {
            case "ADDED", "MODIFIED":
                if let pod = event.object?.facts { state.withLock { $0.pods[pod.uid] = pod } }
            case "DELETED":
                if let uid = event.object?.metadata.uid { _ = state.withLock { $0.pods.removeValue(forKey: uid.lowercased()) } }
            case "ERROR":
                // 410 Gone: the version is too old; relist.
                gone = true
            default:
                break
            }
        }
        if gone { logger.debug("pod watch expired; relisting") }
    }

    private func refreshNode() async {
        let path = "/api/v1/nodes/\(configuration.nodeName)"
        while !Task.isCancelled {
            do {
                let data = try await client.get(path)
                let node = try JSONDecoder().decode(NodeObject.self, from: data)
                let labels = node.metadata.labels ?? [:]
                let changed = state.withLock { state in
                    defer { state.nodeLabels = labels }
                    return state.nodeLabels != labels
                }
                if changed { logger.info("node labels read", metadata: ["node": "\(configuration.nodeName)", "labels": "\(labels.count)"]) }
            } catch {
                logger.warning(
                    "cannot read this node's labels; node-label rules use the last ones read",
                    metadata: ["node": "\(configuration.nodeName)", "error": "\(error)"])
            }
            try? await clock.sleep(for: configuration.nodeRefreshInterval)
        }
    }
}

// The parts of the API objects the watcher reads (core/v1 Pod, PodList, Node, watch.Event).

struct ObjectMeta: Decodable {
    var name: String?
    var namespace: String?
    var uid: String?
    var labels: [String: String]?
    var resourceVersion: String?
}

struct PodObject: Decodable {
    struct Spec: Decodable {
        struct Container: Decodable {
            var name: String
            var image: String?
        }
        var serviceAccountName: String?
        var nodeName: String?
        var containers: [Container]?
    }
    struct Status: Decodable {
        struct ContainerStatus: Decodable {
            var name: String
            var imageID: String?
        }
        var containerStatuses: [ContainerStatus]?
    }
    var metadata: ObjectMeta
    var spec: Spec?
    var status: Status?

    /// The facts attestation uses; nil without a name, namespace or UID.
    var facts: PodFacts? {
        guard let uid = metadata.uid, let name = metadata.name, let namespace = metadata.namespace else { return nil }
        let resolved = Dictionary(
            (status?.containerStatuses ?? []).map { ($0.name, $0.imageID) }, uniquingKeysWith: { first, _ in first })
        let containers = (spec?.containers ?? []).map { container in
            PodFacts.Container(
                name: container.name, image: container.image ?? "",
                imageID: resolved[container.name].flatMap { $0.flatMap { $0.isEmpty ? nil : $0 } })
        }
        return PodFacts(
            uid: uid.lowercased(), namespace: namespace, name: name, serviceAccount: spec?.serviceAccountName ?? "default",
            nodeName: spec?.nodeName ?? "", labels: metadata.labels ?? [:], containers: containers)
    }
}

struct PodListObject: Decodable {
    var metadata: ObjectMeta?
    var items: [PodObject]
}

struct WatchEvent: Decodable {
    var type: String
    var object: PodObject?

    enum CodingKeys: String, CodingKey { case type, object }

    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        type = try container.decode(String.self, forKey: .type)
        // An ERROR event's object is a Status, not a Pod.
        object = type == "ERROR" ? nil : try container.decodeIfPresent(PodObject.self, forKey: .object)
    }
}

struct NodeObject: Decodable {
    var metadata: ObjectMeta
}

extension PodFacts {
    /// Facts from a core/v1 Pod's JSON (for tests and tools); nil when it is not one.
    public static func fromPodJSON(_ data: Data) -> PodFacts? {
        (try? JSONDecoder().decode(PodObject.self, from: data))?.facts
    }
}
