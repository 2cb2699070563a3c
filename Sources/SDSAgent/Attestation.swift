import CertificateAuthority
import Foundation
import KubernetesAPI
import SDSModel
import WorkloadAPI
import WorkloadAuthentication
import Yams

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
public enum AttestationPolicyFile {
    static let ruleKeys: Set<String> = ["name", "spiffeID", "namespace", "serviceAccount", "images", "labels", "nodeLabels"]

    /// Reads and checks the file; the error names the file and what is wrong.
    public static func load(_ path: String) throws(ConfigurationError) -> AttestationPolicy {
        func fail(_ message: String) -> ConfigurationError {
            ConfigurationError(message: "--attestation-policy \(path): \(message)")
        }
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw fail("cannot read the file") }
        let policy: AttestationPolicy
        do {
            guard let node = try Yams.compose(yaml: text), let top = node.mapping else {
                throw fail("not a YAML mapping with rules:")
            }
            for key in top.keys.compactMap(\.string) where key != "rules" {
                throw fail("unknown key '\(key)' (only rules:)")
            }
            for (index, rule) in (top["rules"]?.sequence ?? []).enumerated() {
                guard let mapping = rule.mapping else { throw fail("rule #\(index + 1) is not a mapping") }
                for key in mapping.keys.compactMap(\.string) where !ruleKeys.contains(key) {
                    throw fail("rule #\(index + 1): unknown key '\(key)' (keys: \(ruleKeys.sorted().joined(separator: ", ")))")
                }
            }
            policy = try YAMLDecoder().decode(AttestationPolicy.self, from: text)
        } catch let error as ConfigurationError {
            throw error
        } catch {
            throw fail("\(error)")
        }
        if let problem = policy.problem() { throw fail(problem) }
        return policy
    }
}

extension JWTAuthority: JWTSVIDSigner {
    public func validateSVID(_ token: String, audience: String, now: Date) throws -> (subject: SPIFFEID, claims: Data) {
        try validate(token, audience: audience, now: now)
    }
}
