import SDSServer
import Testing

@Suite struct DeltaStreamStateMachineTests {
    typealias Request = DeltaStreamStateMachine.Request

    @Test func firstSubscriptionIsEvaluatedAndSentVersionsAreRemembered() {
        var machine = DeltaStreamStateMachine(wildcardNames: ["default", "ROOTCA"])
        #expect(machine.receive(Request(subscribe: ["default"])) == .evaluate(names: ["default"]))
        #expect(machine.changed(["default": "v1"]) == ["default"])
        #expect(machine.didSend(["default": "v1"]) == "1")
        #expect(machine.changed(["default": "v1"]).isEmpty)
        #expect(machine.receive(Request(responseNonce: "1")) == .acknowledged(nonce: "1"))
    }

    @Test func aReconnectWithTheCurrentVersionSendsNothing() {
        var machine = DeltaStreamStateMachine(wildcardNames: [])
        #expect(machine.receive(Request(subscribe: ["default"], initialVersions: ["default": "v1"])) == .evaluate(names: ["default"]))
        #expect(machine.changed(["default": "v1"]).isEmpty)
        #expect(machine.changed(["default": "v2"]) == ["default"])
    }

    @Test func aNACKedVersionIsNotResentButANewOneIs() {
        var machine = DeltaStreamStateMachine(wildcardNames: [])
        _ = machine.receive(Request(subscribe: ["default"]))
        _ = machine.didSend(["default": "bad"])
        #expect(machine.receive(Request(responseNonce: "1", errorMessage: "Failed to load certificate chain")) == .rejected(nonce: "1", message: "Failed to load certificate chain"))
        #expect(machine.rejections == 1)
        #expect(machine.push() == .evaluate(names: ["default"]))
        #expect(machine.changed(["default": "bad"]).isEmpty)
        #expect(machine.changed(["default": "good"]) == ["default"])
    }

    @Test func subscribeAndUnsubscribeOnAnOpenStream() {
        var machine = DeltaStreamStateMachine(wildcardNames: [])
        _ = machine.receive(Request(subscribe: ["default"]))
        _ = machine.didSend(["default": "v1"])
        #expect(machine.receive(Request(subscribe: ["ROOTCA"], responseNonce: "1")) == .evaluate(names: ["ROOTCA"]))
        #expect(machine.receive(Request(unsubscribe: ["default"])) == .none)
        #expect(machine.subscribed == ["ROOTCA"])
        #expect(machine.changed(["default": "v2", "ROOTCA": "r1"]) == ["ROOTCA"])
    }

    @Test func wildcardSubscribesToEverythingServed() {
        var machine = DeltaStreamStateMachine(wildcardNames: ["default", "ROOTCA"])
        #expect(machine.receive(Request(subscribe: ["*"])) == .evaluate(names: ["default", "ROOTCA"]))
    }
}
