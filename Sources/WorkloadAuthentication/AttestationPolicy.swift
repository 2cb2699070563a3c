import SDSModel

/// Which pods may hold which identities, beyond what their token or service account proves:
/// the images the pod runs, its labels, and its node's labels (`--attestation-policy FILE`).
///
/// Opt-in per identity: an identity no rule selects is issued as before, without a look at its
/// pod. An identity one or more rules select is issued only to a pod that meets every selector
/// of at least one of them; otherwise the caller gets `permission_denied` and the log names each
/// failed selector.
///
/// ```yaml
/// rules:
///   - name: payments-eu                     # for logs; defaults to the rule's position
///     spiffeID: spiffe://cluster.local/ns/payments/sa/api   # or namespace/serviceAccount:
///     namespace: payments                   # NAME or PREFIX*
///     serviceAccount: "*"                   # NAME or PREFIX* (default: any)
///     images:                               # every container runs one of these
///       - registry.example/payments/api     # a repository: any tag or digest of it
///       - registry.example/mesh/proxyv2:1.24.0   # a repository at a tag
///       - sha256:4f5e…                      # a digest the runtime resolved (pod status imageID)
///     labels: {app: api}                    # the pod carries each
///     nodeLabels: {topology.kubernetes.io/region: eu-west-1}   # its node carries each
/// ```
public struct AttestationPolicy: Sendable, Hashable, Codable {
    public struct Rule: Sendable, Hashable, Codable {
        public var name: String?
        public var spiffeID: String?
        public var namespace: String?
        public var serviceAccount: String?
        public var images: [String]?
        public var labels: [String: String]?
        public var nodeLabels: [String: String]?

        public init(
            name: String? = nil, spiffeID: String? = nil, namespace: String? = nil, serviceAccount: String? = nil,
            images: [String]? = nil, labels: [String: String]? = nil, nodeLabels: [String: String]? = nil
        ) {
            self.name = name
            self.spiffeID = spiffeID
            self.namespace = namespace
            self.serviceAccount = serviceAccount
            self.images = images
            self.labels = labels
            self.nodeLabels = nodeLabels
        }
    }

    public var rules: [Rule]

    /// No rules: every identity is issued as the token and the other policies allow.
    public static let none = AttestationPolicy(rules: [])

    public init(rules: [Rule]) { self.rules = rules }

    /// What is wrong with the policy, naming the rule, or nil when it is usable.
    public func problem() -> String? {
        for (index, rule) in rules.enumerated() {
            let name = rule.name ?? "#\(index + 1)"
            if rule.spiffeID == nil && rule.namespace == nil {
                return "rule \(name) selects no identity: give spiffeID, or namespace (and serviceAccount)"
            }
            if rule.spiffeID != nil && (rule.namespace != nil || rule.serviceAccount != nil) {
                return "rule \(name) gives both spiffeID and namespace/serviceAccount: use one"
            }
            if let id = rule.spiffeID, (try? SPIFFEID(parsing: id)) == nil {
                return "rule \(name): spiffeID '\(id)' is not a SPIFFE ID"
            }
            if (rule.images ?? []).isEmpty && (rule.labels ?? [:]).isEmpty && (rule.nodeLabels ?? [:]).isEmpty {
                return "rule \(name) has no selector: give images, labels or nodeLabels"
            }
            if let bad = rule.images?.first(where: { ImageSelector($0) == nil }) {
                return "rule \(name): image '\(bad)' is not a repository, repository:tag, sha256:DIGEST or repository@sha256:DIGEST"
            }
        }
        return nil
    }

    /// The rules that select `identity` (by its SPIFFE ID, or its namespace and service account).
    public func rules(for identity: SPIFFEID, namespace: String, serviceAccount: String) -> [(name: String, rule: Rule)] {
        rules.enumerated().compactMap { index, rule in
            let selected: Bool
            if let id = rule.spiffeID {
                selected = id == identity.description
            } else if let ns = rule.namespace {
                selected = NamePattern.matches(ns, namespace) && NamePattern.matches(rule.serviceAccount ?? "*", serviceAccount)
            } else {
                selected = false
            }
            return selected ? (rule.name ?? "#\(index + 1)", rule) : nil
        }
    }

    /// Whether any rule selects `identity`: only then is its pod looked up.
    public func selects(_ identity: SPIFFEID, namespace: String, serviceAccount: String) -> Bool {
        !rules(for: identity, namespace: namespace, serviceAccount: serviceAccount).isEmpty
    }

    /// The decision for `pod` asking for `identity`: allowed when no rule selects the identity or
    /// when one selecting rule's selectors all hold; else denied, naming every failed selector.
    public func evaluate(_ identity: SPIFFEID, namespace: String, serviceAccount: String, pod: PodFacts) -> AccessDecision {
        let selecting = rules(for: identity, namespace: namespace, serviceAccount: serviceAccount)
        guard !selecting.isEmpty else { return .allowed }
        var failures: [String] = []
        for (name, rule) in selecting {
            guard let failed = Self.firstFailure(of: rule, pod: pod) else { return .allowed }
            failures.append("rule \(name): \(failed)")
        }
        return .denied(reason: failures.joined(separator: "; "))
    }

    /// The first selector of `rule` that `pod` does not meet, in words, or nil.
    static func firstFailure(of rule: Rule, pod: PodFacts) -> String? {
        if let images = rule.images, !images.isEmpty {
            let selectors = images.compactMap(ImageSelector.init)
            if pod.containers.isEmpty { return "images: the pod's containers are not known" }
            for container in pod.containers where !selectors.contains(where: { $0.matches(container) }) {
                let resolved = container.digest.map { " (\($0))" } ?? ""
                return "image: container \(container.name) runs \(container.image)\(resolved), not one of \(images)"
            }
        }
        // Label values can be secrets (SPIRE removed selector values from its logs as a security
        // fix): a refusal names the key and whether it was missing or different, never a value.
        for (key, value) in (rule.labels ?? [:]).sorted(by: { $0.key < $1.key }) where pod.labels[key] != value {
            return "label \(key): pod \(pod.namespace)/\(pod.name) \(pod.labels[key] == nil ? "has no such label" : "has another value")"
        }
        for (key, value) in (rule.nodeLabels ?? [:]).sorted(by: { $0.key < $1.key }) where pod.nodeLabels[key] != value {
            let node = pod.nodeName.isEmpty ? "the pod's node" : "node \(pod.nodeName)"
            return "node label \(key): \(node) \(pod.nodeLabels[key] == nil ? "has no such label" : "has another value")"
        }
        return nil
    }

}

/// One entry of a rule's `images`: a repository (with an optional tag) and/or a digest.
struct ImageSelector: Hashable {
    var repository: String?
    var tag: String?
    var digest: String?

    init?(_ text: String) {
        guard !text.isEmpty else { return nil }
        if text.hasPrefix("sha256:") {
            guard Self.isDigest(text) else { return nil }
            digest = text
            return
        }
        guard let reference = ImageReference(text) else { return nil }
        repository = reference.repository
        tag = reference.tag
        digest = reference.digest
        if let digest, !Self.isDigest(digest) { return nil }
    }

    /// Whether `container` runs this image: its repository (and tag) per the spec, its digest per
    /// the spec when pinned, else the digest the runtime resolved.
    func matches(_ container: PodFacts.Container) -> Bool {
        let spec = ImageReference(container.image)
        if let repository {
            guard let spec, spec.repository == repository else { return false }
            if let tag, spec.tag != tag { return false }
        }
        if let digest {
            let resolved = spec?.digest ?? container.digest
            guard resolved == digest else { return false }
        }
        return true
    }

    static func isDigest(_ text: String) -> Bool {
        let hex = text.dropFirst("sha256:".count)
        return text.hasPrefix("sha256:") && hex.count == 64 && hex.allSatisfy(\.isHexDigit)
    }
}

/// An image reference split into repository (normalized as the container runtimes do: Docker
/// Hub's `nginx` is `docker.io/library/nginx`), tag and digest.
package struct ImageReference: Hashable {
    package var repository: String
    package var tag: String?
    package var digest: String?

    package init?(_ text: String) {
        var rest = Substring(text)
        if let at = rest.firstIndex(of: "@") {
            digest = String(rest[rest.index(after: at)...])
            rest = rest[..<at]
        }
        if let colon = rest.lastIndex(of: ":"), !rest[colon...].contains("/") {
            tag = String(rest[rest.index(after: colon)...])
            rest = rest[..<colon]
        }
        guard !rest.isEmpty, !rest.contains(where: { $0.isWhitespace }) else { return nil }
        var components = rest.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard !components.contains(where: \.isEmpty) else { return nil }
        let first = components[0]
        if components.count == 1 || !(first.contains(".") || first.contains(":") || first == "localhost") {
            components.insert("docker.io", at: 0)
        }
        if components[0] == "index.docker.io" { components[0] = "docker.io" }
        if components[0] == "docker.io" && components.count == 2 { components.insert("library", at: 1) }
        repository = components.joined(separator: "/")
    }
}
