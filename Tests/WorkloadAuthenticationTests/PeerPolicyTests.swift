import Foundation
import SDSModel
import TestSupport
import Testing
import WorkloadAuthentication

@Suite struct PeerPolicyTests {
    static let podUID = "6f1a2b3c-4d5e-4f60-8a9b-0c1d2e3f4a5b"

    func caller(podUID: String? = Self.podUID) throws -> AuthenticatedCaller {
        AuthenticatedCaller(
            spiffeID: try SPIFFEID(trustDomain: "cluster.local", namespace: "demo", serviceAccount: "frontend"),
            namespace: "demo", serviceAccount: "frontend", credentialExpiry: Date(), podUID: podUID, subject: "s")
    }

    /// A fixture /proc with one process whose cgroup file has `contents`.
    func procRoot(pid: Int32, cgroup contents: String) throws -> String {
        let root = TestPKI.temporaryDirectory()
        try FileManager.default.createDirectory(atPath: "\(root)/\(pid)", withIntermediateDirectories: true)
        try contents.write(toFile: "\(root)/\(pid)/cgroup", atomically: true, encoding: .utf8)
        return root
    }

    func isDenied(_ decision: AccessDecision, mentioning text: String) -> Bool {
        if case .denied(let reason) = decision { return reason.contains(text) }
        return false
    }

    @Test func noPolicyNeedsNoPeer() throws {
        #expect(PeerPolicy.none.admit(peer: nil) == .allowed)
        #expect(PeerPolicy.none.bind(peer: nil, to: try caller()) == .allowed)
    }

    @Test func allowedUIDs() {
        let policy = PeerPolicy(allowedUIDs: [1337])
        #expect(policy.admit(peer: PeerCredentials(pid: 10, uid: 1337, gid: 1337)) == .allowed)
        #expect(isDenied(policy.admit(peer: PeerCredentials(pid: 10, uid: 0, gid: 0)), mentioning: "uid 0 is not allowed"))
        #expect(isDenied(policy.admit(peer: nil), mentioning: "unknown"))
    }

    @Test(arguments: [
        // cgroup v2, systemd driver (containerd)
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f1a2b3c_4d5e_4f60_8a9b_0c1d2e3f4a5b.slice/cri-containerd-0123.scope\n",
        // cgroup v1, cgroupfs driver (docker/containerd)
        "12:pids:/kubepods/burstable/pod6f1a2b3c-4d5e-4f60-8a9b-0c1d2e3f4a5b/4fe3a1\n11:memory:/kubepods/burstable/pod6f1a2b3c-4d5e-4f60-8a9b-0c1d2e3f4a5b/4fe3a1\n",
        // guaranteed QoS, cgroupfs, uppercase
        "0::/kubepods/pod6F1A2B3C-4D5E-4F60-8A9B-0C1D2E3F4A5B/abc\n",
    ])
    func podUIDFromCgroup(contents: String) {
        #expect(PodCgroup.podUID(cgroupFile: contents) == Self.podUID)
    }

    @Test(arguments: [
        "0::/user.slice/user-1000.slice/session-2.scope\n", "0::/\n", "", "garbage",
        "0::/kubepods/burstable/podnot-a-uuid-at-all-but-36-characters/x\n",
        "0::/kubepods/burstable/xpod6f1a2b3c-4d5e-4f60-8a9b-0c1d2e3f4a5bx/c\n",
    ])
    func noPodInCgroup(contents: String) {
        #expect(PodCgroup.podUID(cgroupFile: contents) == nil)
    }

    @Test func podBinding() throws {
        let pid: Int32 = 4321
        let root = try procRoot(pid: pid, cgroup: "0::/kubepods/besteffort/pod\(Self.podUID)/c1\n")
        defer { try? FileManager.default.removeItem(atPath: root) }
        let policy = PeerPolicy(requirePodBinding: true, procRoot: root)
        let peer = PeerCredentials(pid: pid, uid: 1337, gid: 1337)
        #expect(policy.bind(peer: peer, to: try caller()) == .allowed)
        let otherPod = "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e"
        #expect(isDenied(policy.bind(peer: peer, to: try caller(podUID: otherPod)), mentioning: "bound to pod \(otherPod)"))
        #expect(isDenied(policy.bind(peer: peer, to: try caller(podUID: nil)), mentioning: "not bound to a pod"))
        #expect(isDenied(policy.bind(peer: PeerCredentials(pid: 0, uid: 1, gid: 1), to: try caller()), mentioning: "hostPID"))
        #expect(isDenied(policy.bind(peer: PeerCredentials(pid: 999, uid: 1, gid: 1), to: try caller()), mentioning: "cannot read"))
        #expect(isDenied(policy.bind(peer: nil, to: try caller()), mentioning: "unknown"))
    }

    @Test func aProcessOutsideAnyPodIsRefused() throws {
        let root = try procRoot(pid: 77, cgroup: "0::/system.slice/kubelet.service\n")
        defer { try? FileManager.default.removeItem(atPath: root) }
        let decision = PeerPolicy(requirePodBinding: true, procRoot: root).bind(peer: PeerCredentials(pid: 77, uid: 0, gid: 0), to: try caller())
        #expect(isDenied(decision, mentioning: "not in a Kubernetes pod"))
    }
}
