import Foundation
import SDSAgent
import Testing

@Suite struct DurationTextTests {
    @Test(arguments: [("24h", 86400.0), ("90s", 90), ("1h30m", 5400), ("500ms", 0.5), ("2m10s", 130)])
    func parses(_ text: String, seconds: Double) throws {
        let duration = try #require(DurationText.parse(text))
        #expect(duration == .milliseconds(Int64(seconds * 1000)))
    }

    @Test(arguments: ["", "24", "h", "1d", "-5s", "1.5h", "10 s"])
    func rejects(_ text: String) {
        #expect(DurationText.parse(text) == nil)
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
        #expect(throws: ConfigurationError.self) { try config.validate() }
        config = AgentConfiguration(jwksFile: "/x", certificateTTL: .seconds(1))
        #expect(throws: ConfigurationError.self) { try config.validate() }
        config = AgentConfiguration(jwksFile: "/x", validationContextNames: ["default"])
        #expect(throws: ConfigurationError.self) { try config.validate() }
        config = AgentConfiguration(jwksFile: "/x", caCertificateFile: "/ca.pem")
        #expect(throws: ConfigurationError.self) { try config.validate() }
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
