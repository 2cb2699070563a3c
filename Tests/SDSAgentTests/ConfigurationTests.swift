import Foundation
import SDSAgent
import TestSupport
import Testing

@Suite struct DurationTextTests {
    @Test(arguments: [("24h", 86400.0), ("90s", 90), ("1h30m", 5400), ("500ms", 0.5), ("2m10s", 130)])
    func parses(_ text: String, seconds: Double) throws {
        let duration = try #require(DurationText.parse(text))
        #expect(duration == .milliseconds(Int64(seconds * 1000)))
    }

    @Test(arguments: ["", "24", "h", "1d", "-5s", "1.5h", "10 s", "5s5"])
    func rejects(_ text: String) {
        #expect(DurationText.parse(text) == nil)
    }

    /// Inputs that trapped with `arithmetic overflow` before (SIGILL): now refused as too long.
    @Test(arguments: [
        "9999999999999999h", "2562047788015216h", "9223372036854775807s", "9223372036854775808ms",
        "876000h1ms", "876001h", "99999999999999999999999999999999h", "500000h500000h",
    ])
    func refusesWhatWouldOverflowWithoutATrap(_ text: String) {
        #expect(DurationText.parse(text) == nil)
    }

    @Test func acceptsTheMaximumExactly() {
        #expect(DurationText.parse("876000h") == DurationText.maximum)
        #expect(DurationText.parse("438000h438000h") == DurationText.maximum)
    }

    /// A fuzz in miniature (the libFuzzer target runs the same property for long): any input
    /// parses or is refused, never traps, and what parses is within the maximum.
    @Test func randomTextNeverTrapsAndStaysInRange() {
        let alphabet = Array("0123456789hms-. \u{0}9h")
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<20000 {
            let text = String((0..<Int.random(in: 0...40, using: &generator)).map { _ in alphabet.randomElement(using: &generator)! })
            if let duration = DurationText.parse(text) {
                #expect(duration >= .zero && duration <= DurationText.maximum)
            }
        }
    }
}

@Suite struct AgentConfigurationTests {
    @Test func defaultsServeBothValidationContextNames() {
        let config = AgentConfiguration(trustDomain: "example.org", jwksFile: "/x")
        #expect(config.effectiveValidationContextNames == ["ROOTCA", "spiffe://example.org"])
    }

    @Test func rejectsSettingsThatCannotWork() {
        var config = AgentConfiguration(jwksFile: "/x")
        config.trustDomain = "Bad Domain"
        #expect(refusal(config) == "invalid_value trust-domain")
        config = AgentConfiguration(jwksFile: "/x", certificateTTL: .seconds(1))
        #expect(refusal(config) == "invalid_value cert-ttl")
        config = AgentConfiguration(jwksFile: "/x", validationContextNames: ["default"])
        #expect(refusal(config) == "conflicting_settings workload-secret-name")
        config = AgentConfiguration(jwksFile: "/x", caCertificateFile: "/ca.pem")
        #expect(refusal(config) == "conflicting_settings ca-cert")
        config = AgentConfiguration(jwksFile: "/x")
        config.attestation.workloadSocketPath = "/tmp/workload.sock"
        #expect(refusal(config) == "missing_setting workload-socket")
        config = AgentConfiguration(jwksFile: "/x")
        config.tokens.jwksFile = nil
        #expect(refusal(config) == "missing_setting jwks")
    }

    /// The code and key of the configuration's refusal (`invalid_value cert-ttl`); nil when it is valid.
    func refusal(_ config: AgentConfiguration) -> String? {
        do {
            try config.validate()
            return nil
        } catch {
            return "\(error.code.rawValue) \(error.key ?? "-")"
        }
    }

    func problem(_ config: AgentConfiguration) -> String? {
        do {
            try config.validate()
            return nil
        } catch {
            return error.message
        }
    }

    @Test func attestationNeedsTheNodeTheAPIServerAndItsOwnSocket() {
        var config = AgentConfiguration(jwksFile: "/x")
        config.attestation.workloadSocketPath = "/tmp/workload.sock"
        #expect(problem(config)?.contains("--workload-socket needs --node-name") == true)
        config.attestation.nodeName = "Not A Node"
        #expect(problem(config)?.contains("not a Kubernetes node name") == true)
        config.attestation.nodeName = "ip-10-0-0-1.eu-west-1.compute.internal"
        #expect(problem(config)?.contains("needs the API server") == true)
        config.tokens.kubernetesAPI = .init(serverURL: "https://127.0.0.1:6443")
        #expect(problem(config) == nil)
        config.attestation.workloadSocketPath = config.socketPath
        #expect(problem(config)?.contains("other than --socket") == true)
        config.attestation.workloadSocketPath = "/tmp/workload.sock"
        config.upstreamCA = .init(host: "istiod", port: 15012, serverBundleFile: "/b.pem", trustDomain: "cluster.local")
        #expect(problem(config)?.contains("--upstream-ca-credential node") == true)
        config.upstreamCA = nil
        config.attestation.jwtSVIDTTL = .seconds(2)
        #expect(problem(config)?.contains("--jwt-svid-ttl") == true)
    }

    @Test func theAttestationPolicyFileIsReadStrictly() throws {
        var config = AgentConfiguration(jwksFile: "/x")
        config.attestation.nodeName = "node-a"
        config.tokens.kubernetesAPI = .init(serverURL: "https://127.0.0.1:6443")
        let path = TestPKI.temporaryDirectory() + "-policy.yaml"
        config.attestation.policyFile = path
        #expect(problem(config)?.contains("cannot read") == true)
        for (text, expected) in [
            ("rules:\n  - namespace: payments\n    imagez: [x]\n", "unknown key 'imagez'"),
            ("rulez: []\n", "unknown key 'rulez'"),
            ("rules:\n  - namespace: payments\n", "no selector"),
            ("rules: [1]\n", "not a mapping"),
            ("rules:\n  - namespace: payments\n    labels: [a]\n", "--attestation-policy"),
        ] {
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            #expect(problem(config)?.contains(expected) == true, "\(text): \(problem(config) ?? "nil")")
        }
        try "rules:\n  - namespace: payments\n    images: [registry.example/app]\n    nodeLabels: {region: eu}\n"
            .write(toFile: path, atomically: true, encoding: .utf8)
        #expect(problem(config) == nil)
        let policy = try config.loadAttestationPolicy()
        #expect(policy.rules.first?.nodeLabels == ["region": "eu"])
    }
}

@Suite struct SidecarBootstrapTests {
    static let template = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("envoy-bootstrap/envoy-sidecar.yaml")

    func bootstrap() -> SidecarBootstrap {
        SidecarBootstrap(
            sdsSocket: "/var/run/sds-agent/sds.sock", tokenFile: "/var/run/secrets/tokens/sds", nodeID: "pod-1",
            nodeCluster: "frontend", adminPort: 15000, inboundPort: 15006, appPort: 8080, outboundPort: 15001,
            upstreamAddress: "backend.demo", upstreamPort: 15006,
            inboundAllowedIDs: ["spiffe://cluster.local/ns/demo/sa/frontend", "spiffe://cluster.local/ns/ops/*"],
            upstreamIDs: ["spiffe://cluster.local/ns/demo/sa/backend"])
    }

    @Test func fillsEveryPlaceholderOfTheShippedTemplate() throws {
        let template = try String(contentsOf: Self.template, encoding: .utf8)
        var b = bootstrap()
        b.validationContextName = "spiffe://cluster.local"
        let rendered = try b.render(template: template)
        #expect(!rendered.contains("{{"))
        #expect(rendered.contains("target_uri: \"unix:/var/run/sds-agent/sds.sock\""))
        #expect(rendered.contains("set_node_on_first_message_only: true"))
        #expect(rendered.contains("initial_fetch_timeout: 0s"))
        #expect(rendered.contains("{san_type: URI, matcher: {prefix: \"spiffe://cluster.local/ns/ops/\"}}"))
        #expect(rendered.contains("name: \"spiffe://cluster.local\""))
    }

    @Test func refusesValuesThatWouldBreakTheYAML() {
        var b = bootstrap()
        b.nodeID = "evil\"\ninjected: true"
        #expect(throws: ConfigurationError.self) { try b.render(template: "{{NODE_ID}}") }
        b = bootstrap()
        b.inboundAllowedIDs = ["not-spiffe"]
        #expect(throws: ConfigurationError.self) { try b.render(template: "{{INBOUND_SAN_MATCHERS}}") }
        #expect(throws: ConfigurationError.self) { try bootstrap().render(template: "{{NO_SUCH_PLACEHOLDER}}") }
    }
}
