import CertificateAuthority
import FoundationEssentials
import Glibc
import KubernetesAPI
import Logging
import SDSModel
import WorkloadAPI
import WorkloadAuthentication

extension KubernetesPodWatcher: PodDirectory {
    /// The pod, or `pod_unknown` (the caller gets `unavailable` and retries) once the lookup's
    /// brief wait is over.
    public func pod(uid: String) async throws(AttestationError) -> PodFacts {
        if let pod = await lookup(uid: uid) { return pod }
        throw AttestationError(
            .podUnknown,
            hasListed
                ? "pod \(uid) is not among node \(configuration.nodeName)'s pods in the API server's answer"
                : "node \(configuration.nodeName)'s pods have not been listed from the API server yet")
    }
}

/// `--attestation-policy FILE`: YAML with `rules:`, read strictly (an unknown key is an error,
/// because a misspelt selector would otherwise be a rule that checks nothing).
package enum AttestationPolicyFile {
    static let ruleKeys: Set<String> = ["name", "spiffeID", "namespace", "serviceAccount", "images", "labels", "nodeLabels"]

    /// Reads and checks the file; the error names the file and what is wrong.
    package static func load(_ path: String) throws(ConfigurationError) -> AttestationPolicy {
        func fail(_ code: ConfigurationError.Code, _ message: String) -> ConfigurationError {
            ConfigurationError(code, key: "attestation-policy", message: "--attestation-policy \(path): \(message)")
        }
        let text: String
        do {
            text = try InputFile.text(path)
        } catch {
            throw fail(.unreadableInput, "cannot read it: \(error.reason)")
        }
        let document: YAMLNode?
        do {
            document = try YAMLNode.parse(text)
        } catch {
            throw fail(.invalidValue, "not YAML the agent reads: \(error)")
        }
        guard let top = document?.mapping else { throw fail(.invalidValue, "not a YAML mapping with rules:") }
        for entry in top where entry.key != "rules" { throw fail(.invalidValue, "unknown key '\(entry.key)' (only rules:)") }
        guard let rulesNode = document?["rules"], let list = rulesNode.sequence else {
            throw fail(.invalidValue, "rules: must be a sequence of rules (rules: [] for none)")
        }
        var rules: [AttestationPolicy.Rule] = []
        for (index, node) in list.enumerated() {
            do throws(RuleError) {
                rules.append(try rule(node))
            } catch {
                throw fail(.invalidValue, "rule #\(index + 1)\(error.message)")
            }
        }
        let policy = AttestationPolicy(rules: rules)
        if let problem = policy.problem() { throw fail(.invalidValue, problem) }
        return policy
    }

    /// What is wrong with one rule, said after its number (`: images must be …`).
    struct RuleError: Error {
        var message: String
    }

    /// One entry of `rules:`.
    static func rule(_ node: YAMLNode) throws(RuleError) -> AttestationPolicy.Rule {
        guard let mapping = node.mapping else { throw RuleError(message: " is not a mapping") }
        var rule = AttestationPolicy.Rule()
        for entry in mapping {
            func text() throws(RuleError) -> String {
                guard let value = entry.value.scalar else {
                    throw RuleError(message: ": \(entry.key) must be a single value, not a \(entry.value.kind)")
                }
                return value
            }
            func labels() throws(RuleError) -> [String: String] {
                guard let pairs = entry.value.mapping else { throw RuleError(message: ": \(entry.key) must be a mapping of label to value") }
                var labels: [String: String] = [:]
                for pair in pairs {
                    guard let value = pair.value.scalar else { throw RuleError(message: ": \(entry.key).\(pair.key) must be a single value") }
                    labels[pair.key] = value
                }
                return labels
            }
            switch entry.key {
            case "name": rule.name = try text()
            case "spiffeID": rule.spiffeID = try text()
            case "namespace": rule.namespace = try text()
            case "serviceAccount": rule.serviceAccount = try text()
            case "images":
                guard let images = entry.value.sequence?.compactMap(\.scalar), images.count == entry.value.sequence?.count else {
                    throw RuleError(message: ": images must be a sequence of image references")
                }
                rule.images = images
            case "labels": rule.labels = try labels()
            case "nodeLabels": rule.nodeLabels = try labels()
            default:
                throw RuleError(message: ": unknown key '\(entry.key)' (keys: \(ruleKeys.sorted().joined(separator: ", ")))")
            }
        }
        return rule
    }
}

extension JWTAuthority: JWTSVIDSigner {}

extension Agent {
    /// This node's pods, watched, and the attestor over them (with a peer-attested socket or an
    /// attestation policy; nil otherwise).
    static func makeAttestation(
        _ configuration: AgentConfiguration, policy: AttestationPolicy, api: KubernetesAPIClient?, _ readiness: AgentReadiness,
        _ logger: Logger
    ) -> (KubernetesPodWatcher?, WorkloadAttestor?) {
        guard configuration.attestation.needsPods else { return (nil, nil) }
        var podWatcher: KubernetesPodWatcher?
        if let api, let node = configuration.attestation.nodeName {
            let watcher = KubernetesPodWatcher(client: api, configuration: .init(nodeName: node), logger: logger)
            readiness.add { watcher.hasListed ? nil : "the pods of node \(node) have not been listed from the API server yet" }
            podWatcher = watcher
        }
        if !policy.rules.isEmpty {
            logger.info("attestation policy loaded", metadata: [
                "file": "\(configuration.attestation.policyFile ?? "-")", "rules": .number(policy.rules.count),
            ])
        }
        let attestor = WorkloadAttestor(
            pods: podWatcher, procRoot: configuration.peerPolicy.procRoot, trustDomain: configuration.trustDomain, policy: policy)
        return (podWatcher, attestor)
    }
}
