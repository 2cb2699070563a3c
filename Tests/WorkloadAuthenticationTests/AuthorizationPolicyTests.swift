import SDSModel
import Testing
import WorkloadAuthentication

@Suite struct AuthorizationPolicyTests {
    func caller(_ namespace: String, _ serviceAccount: String) -> AuthenticatedCaller {
        AuthenticatedCaller(
            spiffeID: try! SPIFFEID(trustDomain: "cluster.local", namespace: namespace, serviceAccount: serviceAccount),
            namespace: namespace, serviceAccount: serviceAccount, credentialExpiry: .distantFuture, subject: "")
    }

    @Test func noRulesAllowsEveryone() {
        #expect(AuthorizationPolicy.allowAll.evaluate(caller("anything", "x")) == .allowed)
    }

    @Test(arguments: [("demo", "a", true), ("team-x", "a", true), ("other", "a", false), ("ops", "robot", true), ("ops", "human", false)])
    func allowRules(namespace: String, serviceAccount: String, allowed: Bool) {
        let policy = AuthorizationPolicy(allowNamespaces: ["demo", "team-*"], allowServiceAccounts: ["ops/robot"])
        #expect((policy.evaluate(caller(namespace, serviceAccount)) == .allowed) == allowed)
    }

    @Test func denyBeatsAllow() {
        let policy = AuthorizationPolicy(
            allowNamespaces: ["*"], denyNamespaces: ["kube-system"], denyServiceAccounts: ["demo/legacy"])
        #expect(policy.evaluate(caller("kube-system", "a")) == .denied(reason: "namespace kube-system is denied by rule 'kube-system'"))
        guard case .denied = policy.evaluate(caller("demo", "legacy")) else { Issue.record("demo/legacy allowed"); return }
        #expect(policy.evaluate(caller("demo", "new")) == .allowed)
    }

    @Test func malformedRulesAreFound() {
        #expect(AuthorizationPolicy(allowNamespaces: ["a/b"]).malformedRule() == "a/b")
        #expect(AuthorizationPolicy(denyServiceAccounts: ["justname"]).malformedRule() == "justname")
        #expect(AuthorizationPolicy(allowNamespaces: ["demo"], allowServiceAccounts: ["demo/*"]).malformedRule() == nil)
    }
}
