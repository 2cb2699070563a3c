import SDSModel
import Testing

@Suite struct PeerCredentialsMetadataTests {
    @Test func roundTrips() {
        let peer = PeerCredentials(pid: 4321, uid: 1337, gid: 1338)
        #expect(peer.metadataValue == "pid=4321;uid=1337;gid=1338")
        #expect(PeerCredentials(metadataValue: peer.metadataValue) == peer)
    }

    @Test func carriesThePeerAttestedSocket() {
        let peer = PeerCredentials(pid: 7, uid: 1337, gid: 1337, socket: .workload)
        #expect(peer.metadataValue == "pid=7;uid=1337;gid=1337;socket=workload")
        #expect(PeerCredentials(metadataValue: peer.metadataValue) == peer)
        #expect(PeerCredentials(metadataValue: "pid=7;uid=1337;gid=1337")?.socket == .token)
    }

    @Test(arguments: ["", "pid=1", "pid=1;uid=2", "pid=1;uid=2;gid=x", "pid=1;uid=-2;gid=3", "pid=1;pid=1;uid=2;gid=3",
                      "pid=1;uid=2;gid=3;extra=4", "uid=2;gid=3;port=1", "pid=1;uid=2;gid=3;socket=other",
                      "pid=1;uid=2;gid=3;socket=workload;x=1", "pid=1;uid=2;socket=workload"])
    func refusesAnythingElse(_ value: String) {
        #expect(PeerCredentials(metadataValue: value) == nil)
    }
}
