import SDSServer
import Testing

@Suite struct StreamStateMachineTests {
    typealias Request = StreamStateMachine.Request

    @Test func answersTheFirstRequest() {
        var machine = StreamStateMachine()
        #expect(machine.receive(Request(resourceNames: ["default"])) == .respond(names: ["default"], nonce: "1"))
    }

    @Test func answersAFirstRequestCarryingAnOldProcessVersionAndNonce() {
        // After an agent restart Envoy resubscribes with the last version it accepted (spire#813).
        var machine = StreamStateMachine()
        let action = machine.receive(Request(versionInfo: "abc123", resourceNames: ["default"], responseNonce: "77"))
        #expect(action == .respond(names: ["default"], nonce: "1"))
    }

    @Test func neverAnswersAnACK() {
        var machine = StreamStateMachine()
        _ = machine.receive(Request(resourceNames: ["default"]))
        #expect(machine.receive(Request(versionInfo: "v1", resourceNames: ["default"], responseNonce: "1")) == .acknowledged(version: "v1"))
        #expect(machine.receive(Request(versionInfo: "v1", resourceNames: ["default"], responseNonce: "1")) == .acknowledged(version: "v1"))
    }

    @Test func countsANACKAndDoesNotResend() {
        var machine = StreamStateMachine()
        _ = machine.receive(Request(resourceNames: ["default"]))
        let nack = Request(versionInfo: "", resourceNames: ["default"], responseNonce: "1", errorMessage: "bad chain")
        #expect(machine.receive(nack) == .rejected(nonce: "1", message: "bad chain"))
        #expect(machine.rejections == 1)
    }

    @Test func answersANameChangeWithANewNonce() {
        var machine = StreamStateMachine()
        _ = machine.receive(Request(resourceNames: ["default"]))
        let change = Request(versionInfo: "v1", resourceNames: ["default", "ROOTCA"], responseNonce: "1")
        #expect(machine.receive(change) == .respond(names: ["default", "ROOTCA"], nonce: "2"))
        #expect(machine.subscribed == ["default", "ROOTCA"])
        // The same set in another order is no change.
        #expect(machine.receive(Request(versionInfo: "v2", resourceNames: ["ROOTCA", "default"], responseNonce: "2")) == .acknowledged(version: "v2"))
    }

    @Test func ignoresAStaleNonce() {
        var machine = StreamStateMachine()
        _ = machine.receive(Request(resourceNames: ["a"]))
        _ = machine.receive(Request(resourceNames: ["a", "b"], responseNonce: "1"))
        #expect(machine.receive(Request(resourceNames: ["a"], responseNonce: "1")) == .stale(nonce: "1"))
        #expect(machine.subscribed == ["a", "b"])
    }
}

@Suite struct StreamStateMachinePushTests {
    @Test func noPushBeforeTheFirstResponseThenANewNonceForTheSameNames() {
        var machine = StreamStateMachine()
        #expect(machine.push() == nil)
        _ = machine.receive(.init(resourceNames: ["default"]))
        #expect(machine.push() == .respond(names: ["default"], nonce: "2"))
        // Envoy's ACK of the push uses its nonce; an ACK of the older response is now stale.
        #expect(machine.receive(.init(versionInfo: "v1", resourceNames: ["default"], responseNonce: "1")) == .stale(nonce: "1"))
        #expect(machine.receive(.init(versionInfo: "v2", resourceNames: ["default"], responseNonce: "2")) == .acknowledged(version: "v2"))
    }
}
