import Foundation
import KubernetesAPI
import SDSModel
import Synchronization
import TestSupport
import Testing

/// The pod watcher against the fake API server (written from core/v1's Pod, PodList and Node
/// JSON; no Kubernetes API server runs here), its waits on a test clock.
@Suite struct KubernetesPodWatcherTests {
    static let uid = "6c1c33a4-0b59-4a36-9a39-5d8e0e5f3f11"

    /// The node's labels can change; the watch is refused (503), so the watcher relists with
    /// its backoff, on the clock.
    final class Cluster: Sendable {
        let zone = Mutex("zone-a")

        func answer(_ request: FakeAPIServer.Request) -> FakeAPIServer.Response {
            if request.path.hasPrefix("/api/v1/nodes/node-1") {
                return .json(["kind": "Node", "metadata": ["name": "node-1", "labels": ["topology.kubernetes.io/zone": zone.withLock { $0 }]]])
            }
            if request.path.hasPrefix("/api/v1/pods?"), request.path.contains("watch=1") {
                return .json(["kind": "Status", "code": 503], status: 503)
            }
            if request.path.hasPrefix("/api/v1/pods?") {
                let pod: [String: Any] = [
                    "metadata": ["name": "api-0", "namespace": "payments", "uid": KubernetesPodWatcherTests.uid, "labels": ["app": "api"]],
                    "spec": ["serviceAccountName": "api", "nodeName": "node-1", "containers": [["name": "app", "image": "registry.example/api:1"]]],
                ]
                return .json(["kind": "PodList", "metadata": ["resourceVersion": "7"], "items": [pod]])
            }
            return .json(["kind": "Status", "code": 404], status: 404)
        }
    }

    @Test(.timeLimit(.minutes(1))) func podsAreListedAndTheNodesLabelsReadAgainEveryIntervalOfItsClock() async throws {
        let cluster = Cluster()
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "agent-token".write(toFile: dir + "/token", atomically: true, encoding: .utf8)
        let server = try await FakeAPIServer(directory: dir, handler: cluster.answer)
        let api = try KubernetesAPIClient(configuration: .init(serverURL: server.url, caFile: server.caFile, tokenFile: dir + "/token"))
        let clock = TestClock()
        let watcher = KubernetesPodWatcher(client: api, configuration: .init(nodeName: "node-1"), clock: clock, logger: TestPKI.quietLogger)
        let loop = Task { await watcher.run() }

        // Both loops wait on the clock: the relist backoff and the node refresh.
        #expect(await clock.sleeping(2, within: .seconds(20)))
        #expect(watcher.hasListed)
        let pod = try #require(await watcher.lookup(uid: Self.uid))
        #expect(pod.namespace == "payments" && pod.serviceAccount == "api" && pod.labels == ["app": "api"])
        #expect(pod.nodeLabels == ["topology.kubernetes.io/zone": "zone-a"])

        cluster.zone.withLock { $0 = "zone-b" }
        clock.advance(by: .seconds(29))
        #expect(await clock.sleeping(2, within: .seconds(20)))
        #expect(await watcher.lookup(uid: Self.uid)?.nodeLabels["topology.kubernetes.io/zone"] == "zone-a", "read again before 30 s")
        clock.advance(by: .seconds(1))
        #expect(await clock.sleeping(2, within: .seconds(20)))
        #expect(await watcher.lookup(uid: Self.uid)?.nodeLabels["topology.kubernetes.io/zone"] == "zone-b")

        loop.cancel()
        await loop.value
        await api.shutdown()
        await server.stop()
    }
}
