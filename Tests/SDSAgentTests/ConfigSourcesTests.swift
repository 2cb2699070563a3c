import Foundation
import SDSAgent
import TestSupport
import Testing

/// The file, environment and flag merging behind `serve --config` and `SDS_AGENT_*`, on a flag
/// model given here (the executable reads the real one from ArgumentParser).
@Suite struct ConfigSourcesTests {
    let flags = ConfigSources.Flags(
        single: ["trust-domain", "cert-ttl", "socket", "kube-api-server"], repeatable: ["audience", "federated-bundle"],
        switches: ["token-review"])

    func file(_ text: String, in dir: String, name: String = "agent.yaml") throws -> String {
        let path = dir + "/" + name
        try Data(text.utf8).write(to: URL(fileURLWithPath: path))
        return path
    }

    @Test func flagsBeatTheEnvironmentWhichBeatsTheFile() throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = try file("trust-domain: from.file\ncert-ttl: 1h\naudience: [a, b]\ntoken-review: true\n", in: dir)
        let (arguments, sources) = try ConfigSources.merge(
            arguments: ["--config", config, "--trust-domain", "from.flag"],
            environment: ["SDS_AGENT_CERT_TTL": "2h", "SDS_AGENT_AUDIENCE": " c , d "], flags: flags)
        let effective = ConfigSources.Effective(merged: arguments, sources: sources, flags: flags)
        #expect(effective.values()["trust-domain"] == ["from.flag"])
        #expect(effective.values()["cert-ttl"] == ["2h"])
        // A repeatable setting comes whole from the highest source that sets it.
        #expect(effective.values()["audience"] == ["c", "d"])
        #expect(effective.values()["token-review"] == ["true"])
        #expect(sources["trust-domain"] == .flag && sources["cert-ttl"] == .environment)
        #expect(sources["audience"] == .environment && sources["token-review"] == .file)
    }

    @Test func relativePathsInAFileAreTheFilesOwn() throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = try file("socket: run/sds.sock\nfederated-bundle: [other.org=bundles/other.pem]\n", in: dir)
        let (arguments, _) = try ConfigSources.merge(arguments: ["--config", config], environment: [:], flags: flags)
        #expect(arguments.contains("--socket=\(dir)/run/sds.sock"))
        #expect(arguments.contains("--federated-bundle=other.org=\(dir)/bundles/other.pem"))
    }

    @Test(arguments: [
        ("trust-domian: x\n", "unknown key 'trust-domian'"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("token-review: maybe\n", "'token-review' is a switch"),
        ("trust-domain: [a, b]\n", "'trust-domain' must be a single value"),
    ])
    func aFileThatCannotBeReadSaysWhereAndWhy(_ text: String, _ expected: String) throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = try file(text, in: dir)
        #expect {
            try ConfigSources.merge(arguments: ["--config", config], environment: [:], flags: flags)
        } throws: { error in
            "\(error)".contains(expected) && "\(error)".contains(config)
        }
    }

    @Test func theEnvironmentNamesEachFlagAndTypoedVariablesAreFound() throws {
        #expect(ConfigSources.environmentName("trust-domain") == "SDS_AGENT_TRUST_DOMAIN")
        let environment = ["SDS_AGENT_TRUST_DOMAIN": "x", "SDS_AGENT_TRUST_DOMIAN": "y", "SDS_AGENT_CONFIG": "/c", "PATH": "/bin"]
        #expect(ConfigSources.unknownVariables(in: environment, flags: flags) == ["SDS_AGENT_TRUST_DOMIAN"])
        #expect(throws: ConfigSources.Failure.self) {
            try ConfigSources.merge(arguments: [], environment: ["SDS_AGENT_TOKEN_REVIEW": "perhaps"], flags: flags)
        }
    }

    @Test func theStartLineRedactsCredentialsAndReloadsSeeWhatChanged() throws {
        let before = ConfigSources.Effective(
            merged: ["--kube-api-server", "https://user:secret@api:6443", "--audience", "a"], flags: flags)
        #expect(before.values()["kube-api-server"] == ["https://REDACTED@api:6443"])
        let after = ConfigSources.Effective(merged: ["--kube-api-server", "https://user:secret@api:6443", "--audience", "b"], flags: flags)
        #expect(after.changedSettings(since: before) == ["audience"])
    }

    @Test func aBadValueIsTracedToTheVariableOrTheFileItCameFrom() {
        let effective = ConfigSources.Effective(
            commandLine: ["--config", "/etc/agent.yaml"], sources: ["cert-ttl": .environment, "socket": .file], flags: flags)
        let fromEnvironment = ConfigSources.origin(of: "The value 'x' is invalid for '--cert-ttl <duration>'", in: effective)
        #expect(fromEnvironment?.origin == "SDS_AGENT_CERT_TTL" && fromEnvironment?.flag == "cert-ttl")
        #expect(ConfigSources.origin(of: "Missing value for '--socket <socket>'", in: effective)?.origin == "--config /etc/agent.yaml: socket")
        #expect(ConfigSources.origin(of: "The value 'x' is invalid for '--trust-domain <trust-domain>'", in: effective) == nil)
    }
}
