import Foundation
import KubernetesAPI
import SDSModel
import TestSupport
import Testing
import WorkloadAuthentication

@Suite struct ImageReferenceTests {
    @Test(arguments: [
        ("nginx", "docker.io/library/nginx", nil, nil),
        ("nginx:1.27", "docker.io/library/nginx", "1.27", nil),
        ("bitnami/redis:7", "docker.io/bitnami/redis", "7", nil),
        ("index.docker.io/library/nginx", "docker.io/library/nginx", nil, nil),
        ("registry.example:5000/team/app:v2", "registry.example:5000/team/app", "v2", nil),
        ("localhost/app", "localhost/app", nil, nil),
        ("ghcr.io/org/app@sha256:abc", "ghcr.io/org/app", nil, "sha256:abc"),
        ("ghcr.io/org/app:1@sha256:abc", "ghcr.io/org/app", "1", "sha256:abc"),
    ] as [(String, String, String?, String?)])
    func normalizesAsTheRuntimesDo(_ text: String, _ repository: String, _ tag: String?, _ digest: String?) throws {
        let reference = try #require(ImageReference(text))
        #expect(reference.repository == repository)
        #expect(reference.tag == tag)
        #expect(reference.digest == digest)
    }

    @Test(arguments: ["", "a//b", "/app", "app/", "has space/app"])
    func refusesWhatIsNoReference(_ text: String) {
        #expect(ImageReference(text) == nil)
    }
}

@Suite struct AttestationPolicyTests {
    static let digest = "sha256:" + String(repeating: "ab", count: 32)
    static let otherDigest = "sha256:" + String(repeating: "cd", count: 32)
    let id = try! SPIFFEID(trustDomain: "cluster.local", namespace: "payments", serviceAccount: "api")

    func pod(
        image: String = "registry.example/payments/api:1.0", digest: String? = Self.digest, labels: [String: String] = ["app": "api"],
        nodeLabels: [String: String] = ["region": "eu"]
    ) -> PodFacts {
        PodFacts(
            uid: "u", namespace: "payments", name: "api-0", serviceAccount: "api", nodeName: "node-a", labels: labels,
            containers: [.init(name: "main", image: image, imageID: digest.map { "registry.example/payments/api@\($0)" })],
            nodeLabels: nodeLabels)
    }

    func decision(_ rules: [AttestationPolicy.Rule], _ pod: PodFacts) -> AccessDecision {
        AttestationPolicy(rules: rules).evaluate(id, namespace: "payments", serviceAccount: "api", pod: pod)
    }

    func denied(_ decision: AccessDecision, mentioning text: String) -> Bool {
        if case .denied(let reason) = decision { return reason.contains(text) }
        return false
    }

    @Test func anIdentityNoRuleSelectsIsAllowedWithoutItsPod() {
        let policy = AttestationPolicy(rules: [.init(namespace: "other", images: ["x"])])
        #expect(!policy.selects(id, namespace: "payments", serviceAccount: "api"))
        #expect(policy.evaluate(id, namespace: "payments", serviceAccount: "api", pod: pod(image: "evil/x")) == .allowed)
    }

    @Test func rulesSelectBySPIFFEIDOrNamespaceAndServiceAccountPatterns() {
        let byID = AttestationPolicy(rules: [.init(spiffeID: id.description, labels: ["a": "b"])])
        #expect(byID.selects(id, namespace: "payments", serviceAccount: "api"))
        let byPrefix = AttestationPolicy(rules: [.init(namespace: "pay*", serviceAccount: "a*", labels: ["a": "b"])])
        #expect(byPrefix.selects(id, namespace: "payments", serviceAccount: "api"))
        let otherAccount = AttestationPolicy(rules: [.init(namespace: "payments", serviceAccount: "web", labels: ["a": "b"])])
        #expect(!otherAccount.selects(id, namespace: "payments", serviceAccount: "api"))
    }

    @Test func imagesMatchByRepositoryTagOrDigest() {
        #expect(decision([.init(namespace: "payments", images: ["registry.example/payments/api"])], pod()) == .allowed)
        #expect(decision([.init(namespace: "payments", images: ["registry.example/payments/api:1.0"])], pod()) == .allowed)
        #expect(denied(decision([.init(namespace: "payments", images: ["registry.example/payments/api:2.0"])], pod()),
                       mentioning: "container main runs registry.example/payments/api:1.0"))
        #expect(decision([.init(namespace: "payments", images: [Self.digest])], pod()) == .allowed)
        #expect(denied(decision([.init(namespace: "payments", images: [Self.otherDigest])], pod()), mentioning: Self.digest))
        #expect(decision([.init(namespace: "payments", images: ["registry.example/payments/api@\(Self.digest)"])], pod()) == .allowed)
        // A digest rule needs the digest the runtime resolved: a container not created yet fails it.
        #expect(denied(decision([.init(namespace: "payments", images: [Self.digest])], pod(digest: nil)), mentioning: "main"))
        // A spec pinned by digest is its own proof.
        #expect(decision([.init(namespace: "payments", images: [Self.digest])],
                         pod(image: "registry.example/payments/api@\(Self.digest)", digest: Self.otherDigest)) == .allowed)
        // Docker Hub names are normalized on both sides.
        #expect(decision([.init(namespace: "payments", images: ["docker.io/library/nginx"])], pod(image: "nginx:1.27")) == .allowed)
    }

    @Test func everyContainerMustRunAnApprovedImage() {
        var twoContainers = pod()
        twoContainers.containers.append(.init(name: "sidecar", image: "evil.example/miner:1"))
        #expect(denied(decision([.init(namespace: "payments", images: ["registry.example/payments/api"])], twoContainers),
                       mentioning: "container sidecar runs evil.example/miner:1"))
    }

    /// The key is named, never a value: label values can be secrets (SPIRE removed selector
    /// values from its logs as a security fix).
    @Test func labelsAndNodeLabelsAreNamedWhenTheyFailButNotTheirValues() {
        let wrong = decision([.init(namespace: "payments", labels: ["app": "api"])], pod(labels: ["app": "s3cret-web"]))
        #expect(denied(wrong, mentioning: "label app: pod payments/api-0 has another value"))
        #expect(!denied(wrong, mentioning: "s3cret") && !denied(wrong, mentioning: "=api"))
        #expect(denied(decision([.init(namespace: "payments", labels: ["tier": "db"])], pod()), mentioning: "label tier: pod payments/api-0 has no such label"))
        let node = decision([.init(namespace: "payments", nodeLabels: ["region": "us"])], pod())
        #expect(denied(node, mentioning: "node label region: node node-a has another value"))
        #expect(!denied(node, mentioning: "eu") && !denied(node, mentioning: "=us"))
    }

    @Test func oneMatchingRuleOfSeveralIsEnoughAndEveryFailureIsNamed() {
        let eu = AttestationPolicy.Rule(name: "eu", namespace: "payments", nodeLabels: ["region": "eu"])
        let us = AttestationPolicy.Rule(name: "us", namespace: "payments", nodeLabels: ["region": "us"])
        #expect(decision([us, eu], pod()) == .allowed)
        let decision = decision([us, .init(name: "ap", namespace: "payments", nodeLabels: ["region": "ap"])], pod())
        #expect(denied(decision, mentioning: "rule us: node label region"))
        #expect(denied(decision, mentioning: "rule ap: node label region"))
    }

    @Test(arguments: [
        (AttestationPolicy.Rule(images: ["x"]), "selects no identity"),
        (AttestationPolicy.Rule(spiffeID: "spiffe://td/x", namespace: "n", images: ["x"]), "both"),
        (AttestationPolicy.Rule(spiffeID: "not-an-id", images: ["x"]), "not a SPIFFE ID"),
        (AttestationPolicy.Rule(namespace: "n"), "no selector"),
        (AttestationPolicy.Rule(namespace: "n", images: ["sha256:short"]), "is not a repository"),
    ])
    func malformedRulesAreNamed(_ rule: AttestationPolicy.Rule, _ problem: String) {
        let text = AttestationPolicy(rules: [rule]).problem()
        #expect(text?.contains(problem) == true, "\(text ?? "nil")")
        #expect(text?.contains("#1") == true)
    }
}

/// A fixture pod source.
struct FixturePods: PodDirectory {
    var pods: [String: PodFacts]
    func pod(uid: String) async throws(AttestationError) -> PodFacts {
        guard let pod = pods[uid] else { throw AttestationError(.podUnknown, "pod \(uid) unknown") }
        return pod
    }
}

@Suite struct WorkloadAttestorTests {
    static let uid = "6f1a2b3c-4d5e-4f60-8a9b-0c1d2e3f4a5b"
    static let pid: Int32 = 4242

    func procRoot(uid: String = Self.uid) throws -> String {
        let root = TestPKI.temporaryDirectory()
        try FileManager.default.createDirectory(atPath: "\(root)/\(Self.pid)", withIntermediateDirectories: true)
        try "0::/kubepods/burstable/pod\(uid)/abc\n".write(toFile: "\(root)/\(Self.pid)/cgroup", atomically: true, encoding: .utf8)
        return root
    }

    func pod(image: String = "registry.example/app:1") -> PodFacts {
        PodFacts(uid: Self.uid, namespace: "payments", name: "api-0", serviceAccount: "api", containers: [.init(name: "main", image: image)])
    }

    func code(_ body: () async throws -> Void) async -> AttestationError.Code? {
        do {
            try await body()
            return nil
        } catch {
            return (error as? AttestationError)?.code
        }
    }

    @Test func thePeersPodGivesTheIdentity() async throws {
        let attestor = WorkloadAttestor(pods: FixturePods(pods: [Self.uid: pod()]), procRoot: try procRoot(), trustDomain: "cluster.local")
        let (caller, pod) = try await attestor.attest(peer: PeerCredentials(pid: Self.pid, uid: 1337, gid: 1337, socket: .workload))
        #expect(caller.spiffeID.description == "spiffe://cluster.local/ns/payments/sa/api")
        #expect(caller.podUID == Self.uid && pod.name == "api-0")
        #expect(caller.credential == nil)
    }

    @Test func withoutAPodThereIsNoIdentity() async throws {
        let root = try procRoot()
        let attestor = WorkloadAttestor(pods: FixturePods(pods: [:]), procRoot: root, trustDomain: "cluster.local")
        #expect(await code { _ = try await attestor.attest(peer: nil) } == .noPeer)
        #expect(await code { _ = try await attestor.attest(peer: PeerCredentials(pid: 0, uid: 0, gid: 0)) } == .noPeer)
        #expect(await code { _ = try await attestor.attest(peer: PeerCredentials(pid: 99, uid: 0, gid: 0)) } == .notInPod)
        let unknown = await code { _ = try await attestor.attest(peer: PeerCredentials(pid: Self.pid, uid: 0, gid: 0)) }
        #expect(unknown == .podUnknown)
        #expect(AttestationError(.podUnknown, "").isTransient && !AttestationError(.policy, "").isTransient)
    }

    @Test func thePolicyAppliesToTokenCallersThroughTheirBoundPod() async throws {
        let policy = AttestationPolicy(rules: [.init(namespace: "payments", images: ["registry.example/app"])])
        let good = WorkloadAttestor(
            pods: FixturePods(pods: [Self.uid: pod()]), procRoot: "/nonexistent", trustDomain: "cluster.local", policy: policy)
        let bad = WorkloadAttestor(
            pods: FixturePods(pods: [Self.uid: pod(image: "evil/x")]), procRoot: "/nonexistent", trustDomain: "cluster.local",
            policy: policy)
        var caller = AuthenticatedCaller(
            spiffeID: try SPIFFEID(trustDomain: "cluster.local", namespace: "payments", serviceAccount: "api"),
            namespace: "payments", serviceAccount: "api", credentialExpiry: Date(), podUID: Self.uid.uppercased(), subject: "s")
        #expect(await code { try await good.check(caller) } == nil)
        #expect(await code { try await bad.check(caller) } == .policy)
        caller.podUID = nil
        #expect(await code { try await good.check(caller) } == .noBoundPod)
        // A caller no rule selects is not looked up at all.
        let other = AuthenticatedCaller(
            spiffeID: try SPIFFEID(trustDomain: "cluster.local", namespace: "web", serviceAccount: "x"),
            namespace: "web", serviceAccount: "x", credentialExpiry: Date(), subject: "s")
        let noPods = WorkloadAttestor(pods: nil, procRoot: "/nonexistent", trustDomain: "cluster.local", policy: policy)
        #expect(await code { try await noPods.check(other) } == nil)
        // A reload replaces the rules at once.
        bad.replacePolicy(with: .none)
        caller.podUID = Self.uid
        #expect(await code { try await bad.check(caller) } == nil)
    }

    @Test func aTokenBoundToAPodOfAnotherAccountIsRefused() async throws {
        let policy = AttestationPolicy(rules: [.init(namespace: "payments", labels: ["a": "b"])])
        var other = pod()
        other.serviceAccount = "web"
        let attestor = WorkloadAttestor(
            pods: FixturePods(pods: [Self.uid: other]), procRoot: "/nonexistent", trustDomain: "cluster.local", policy: policy)
        let caller = AuthenticatedCaller(
            spiffeID: try SPIFFEID(trustDomain: "cluster.local", namespace: "payments", serviceAccount: "api"),
            namespace: "payments", serviceAccount: "api", credentialExpiry: Date(), podUID: Self.uid, subject: "s")
        #expect(await code { try await attestor.check(caller) } == .policy)
    }
}

@Suite struct PodJSONTests {
    @Test func readsWhatAttestationUsesFromACoreV1Pod() throws {
        let json = """
            {"apiVersion":"v1","kind":"Pod","metadata":{"name":"api-0","namespace":"payments","uid":"ABC-1","labels":{"app":"api"}},
             "spec":{"serviceAccountName":"api","nodeName":"node-a","containers":[{"name":"main","image":"r.example/app:1"},
               {"name":"proxy","image":"r.example/proxy:2"}]},
             "status":{"containerStatuses":[{"name":"main","imageID":"r.example/app@sha256:00"},{"name":"proxy","imageID":""}]}}
            """
        let pod = try #require(PodFacts.fromPodJSON(Data(json.utf8)))
        #expect(pod.uid == "abc-1" && pod.namespace == "payments" && pod.name == "api-0" && pod.serviceAccount == "api")
        #expect(pod.nodeName == "node-a" && pod.labels == ["app": "api"])
        #expect(pod.containers.map(\.name) == ["main", "proxy"])
        #expect(pod.containers[0].digest == "sha256:00" && pod.containers[1].imageID == nil)
        let noAccount = #"{"metadata":{"name":"a","namespace":"b","uid":"c"},"spec":{}}"#
        #expect(PodFacts.fromPodJSON(Data(noAccount.utf8))?.serviceAccount == "default")
        #expect(PodFacts.fromPodJSON(Data(#"{"metadata":{"name":"a"}}"#.utf8)) == nil)
    }
}
