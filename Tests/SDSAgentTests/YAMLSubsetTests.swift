import SDSAgent
import Testing

@Suite struct YAMLSubsetTests {
    func parse(_ text: String) throws -> YAMLNode? { try YAMLNode.parse(text) }

    func error(_ text: String) -> String? {
        do {
            _ = try YAMLNode.parse(text)
            return nil
        } catch {
            return error.description
        }
    }

    @Test func readsTheConfigurationFilesShape() throws {
        let node = try #require(try parse("""
            # the agent's settings
            ---
            trust-domain: cluster.local   # a comment
            cert-ttl: "2h"
            socket-mode: 0660
            kube-api-server: https://user:secret@127.0.0.1:6443
            audience: [file-aud, "sds-agent"]
            allow-namespace:
              - demo
              - 'team-*'
            deny-namespace:
            - kube-system
            peer-pod-binding: yes
            empty:
            labels: {app: api, "tier": 'db'}
            hash: "a # not a comment"

            """))
        #expect(node["trust-domain"]?.scalar == "cluster.local")
        #expect(node["cert-ttl"]?.scalar == "2h")
        #expect(node["socket-mode"]?.scalar == "0660")
        #expect(node["kube-api-server"]?.scalar == "https://user:secret@127.0.0.1:6443")
        #expect(node["audience"] == .sequence([.scalar("file-aud"), .scalar("sds-agent")]))
        #expect(node["allow-namespace"] == .sequence([.scalar("demo"), .scalar("team-*")]))
        #expect(node["deny-namespace"] == .sequence([.scalar("kube-system")]))
        #expect(node["peer-pod-binding"]?.bool == true)
        #expect(node["empty"] == .empty)
        #expect(node["labels"]?["app"]?.scalar == "api" && node["labels"]?["tier"]?.scalar == "db")
        #expect(node["hash"]?.scalar == "a # not a comment")
        #expect(node.mapping?.map(\.key).first == "trust-domain")
    }

    /// A file saved on Windows: "\r\n" is one Character in Swift, so a split on "\n" read the
    /// whole file as one line and the first key's value.
    @Test(arguments: ["\r\n", "\r", "\n"]) func anyLineEndingReadsTheSame(_ ending: String) throws {
        let text = ["trust-domain: cluster.local", "audience:", "  - a", "  - b", "cert-ttl: 2h", ""].joined(separator: ending)
        let node = try #require(try parse(text))
        #expect(node["trust-domain"]?.scalar == "cluster.local")
        #expect(node["audience"] == .sequence([.scalar("a"), .scalar("b")]))
        #expect(node["cert-ttl"]?.scalar == "2h")
        #expect(error("a: 1\r\n\tb: 2\r\n") == "line 2: a tab in the indentation (use spaces)")
    }

    @Test func readsTheAttestationPolicysShape() throws {
        let node = try #require(try parse("""
            rules:
              - name: payments-eu
                namespace: payments
                images:
                  - registry.example/payments/api
                  - "sha256:abc"
                labels:
                  app: api
                nodeLabels: {topology.kubernetes.io/region: eu-west-1}
              - spiffeID: spiffe://cluster.local/ns/pinned/sa/job
                images: [registry.example/job:1.0]
            """))
        let rules = try #require(node["rules"]?.sequence)
        #expect(rules.count == 2)
        #expect(rules[0]["name"]?.scalar == "payments-eu")
        #expect(rules[0]["images"] == .sequence([.scalar("registry.example/payments/api"), .scalar("sha256:abc")]))
        #expect(rules[0]["labels"]?["app"]?.scalar == "api")
        #expect(rules[0]["nodeLabels"]?["topology.kubernetes.io/region"]?.scalar == "eu-west-1")
        #expect(rules[1]["spiffeID"]?.scalar == "spiffe://cluster.local/ns/pinned/sa/job")
        #expect(rules[1]["images"] == .sequence([.scalar("registry.example/job:1.0")]))
    }

    @Test func quotedScalarsKeepWhatIsInside() throws {
        let node = try #require(try parse(#"""
            a: "tab\there \"q\" \u00e9 \\"
            b: 'it''s # here'
            "quoted key": 1
            """#))
        #expect(node["a"]?.scalar == "tab\there \"q\" é \\")
        #expect(node["b"]?.scalar == "it's # here")
        #expect(node["quoted key"]?.scalar == "1")
    }

    @Test func anEmptyDocumentIsNothing() throws {
        #expect(try parse("") == nil)
        #expect(try parse("# only a comment\n\n") == nil)
        #expect(try parse("- a\n- b\n") == .sequence([.scalar("a"), .scalar("b")]))
    }

    @Test(arguments: [
        ("a: &x 1\nb: *x\n", "anchors"),
        ("a: !!str 1\n", "tags"),
        ("a: |\n  text\n", "block scalars"),
        ("a: 1\n---\nb: 2\n", "more than one document"),
        ("a: 1\na: 2\n", "appears twice"),
        ("a: [1, 2\n", "unclosed '['"),
        ("a: {b: 1\n", "unclosed '{'"),
        ("a: [\"x\" y]\n", "expected ',' or ']'"),
        ("a: {b: \"1\" c: 2}\n", "expected ',' or '}'"),
        ("a: {b: 1, b: 2}\n", "appears twice"),
        ("a: \"open\n", "unclosed"),
        ("a:\n\tb: 1\n", "tab"),
        ("a: 1\n  b: 2\n", "line 2"),
        ("a: \"\\q\"\n", "unknown escape"),
        ("a: [1] x\n", "unexpected text"),
    ])
    func refusesWhatItDoesNotRead(_ text: String, _ says: String) {
        let message = error(text)
        #expect(message?.contains(says) == true, "\(text): \(message ?? "parsed")")
    }

    @Test func neverTrapsOnRandomText() {
        var generator = SystemRandomNumberGenerator()
        let alphabet = Array("ab:- #'\"[]{},\n\t\\|>&*!%@`u0")
        for _ in 0..<2000 {
            let text = String((0..<Int.random(in: 0..<60, using: &generator)).map { _ in alphabet.randomElement(using: &generator)! })
            _ = try? YAMLNode.parse(text)
        }
    }
}
