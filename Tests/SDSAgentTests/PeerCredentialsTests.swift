import Foundation
import GRPCCore
import SDSAgent
import SDSModel
import TestSupport
import Testing
import WorkloadAuthentication

/// Peer binding over a real Unix socket: the kernel's SO_PEERCRED of this test process is what
/// the agent sees. The pod-binding cases use a fixture /proc (`--proc-root`): there is no
/// Kubernetes node here, so this process's cgroup file is written by the test, naming a pod UID.
@Suite(.timeLimit(.minutes(1))) struct PeerCredentialsTests {
    let tokens = TokenFactory()

    func configuration(in dir: String, peerPolicy: PeerPolicy) throws -> AgentConfiguration {
        let jwks = dir + "/jwks.json"
        try tokens.jwksJSON().write(to: URL(fileURLWithPath: jwks))
        var config = AgentConfiguration(socketPath: dir + "/run/sds.sock", jwksFile: jwks, stateDirectory: dir + "/state")
        config.peerPolicy = peerPolicy
        return config
    }

    func expectPermissionDenied(_ call: @Sendable () async throws -> DiscoveryResponse, sourceLocation: SourceLocation = #_sourceLocation) async {
        do {
            let response = try await call()
            Issue.record("served \(response.resources.count) resource(s) to a refused peer", sourceLocation: sourceLocation)
        } catch let error as RPCError {
            #expect(error.code == .permissionDenied, "\(error)", sourceLocation: sourceLocation)
        } catch {
            Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
        }
    }

    @Test func anAllowedUIDIsServedAndAnotherIsRefusedBeforeItsTokenIsLookedAt() async throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let token = tokens.token()
        let allowed = try configuration(in: dir, peerPolicy: PeerPolicy(allowedUIDs: [getuid()]))
        try await withAgent(allowed) {
            let response = try await fetch(allowed.socketPath, names: ["default"], token: token)
            #expect(response.resources.count == 1)
        }
        let refused = try configuration(in: dir, peerPolicy: PeerPolicy(allowedUIDs: [getuid() &+ 4242]))
        try await withAgent(refused) {
            await expectPermissionDenied { try await fetch(refused.socketPath, names: ["default"], token: token) }
            // A caller cannot claim other credentials: what it sends under the key is replaced.
            let forged: Metadata = [PeerCredentials.metadataKey: "pid=1;uid=\(getuid() &+ 4242);gid=0"]
            await expectPermissionDenied {
                try await fetch(refused.socketPath, names: ["default"], token: token, extra: forged)
            }
        }
    }

    @Test func aTokenIsServedOnlyFromThePodItIsBoundTo() async throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let podA = "6f1a2b3c-4d5e-4f60-8a9b-0c1d2e3f4a5b"
        let podB = "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e"
        // This process, as the kubelet's systemd cgroup driver would place a container of pod A.
        let procRoot = dir + "/proc"
        try FileManager.default.createDirectory(atPath: "\(procRoot)/\(getpid())", withIntermediateDirectories: true)
        try "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod\(podA.replacingOccurrences(of: "-", with: "_")).slice/cri-containerd-0123abcd.scope\n"
            .write(toFile: "\(procRoot)/\(getpid())/cgroup", atomically: true, encoding: .utf8)
        let config = try configuration(in: dir, peerPolicy: PeerPolicy(requirePodBinding: true, procRoot: procRoot))
        let tokenForA = tokens.token(podUID: podA)
        let tokenForB = tokens.token(podUID: podB)
        try await withAgent(config) {
            let response = try await fetch(config.socketPath, names: ["default"], token: tokenForA)
            #expect(response.resources.count == 1)
            // Pod B's token copied into pod A's container: refused.
            await expectPermissionDenied { try await fetch(config.socketPath, names: ["default"], token: tokenForB) }
        }
    }
}
