import SDSModel

/// The outcome of a policy for one caller. Decisions are values, not errors, so they can be
/// logged and tested as such.
public enum AccessDecision: Sendable, Equatable {
    case allowed
    /// Refused; the reason says which rule or check refused, in words.
    case denied(reason: String)
}

/// Which authenticated callers may get identities from this agent, evaluated after authentication.
///
/// Rules match namespaces (`demo`, or a prefix `team-*`) and service accounts (`demo/frontend`,
/// `demo/*`). A deny rule beats an allow rule; with no allow rule, every caller not denied is
/// allowed.
public struct AuthorizationPolicy: Sendable, Equatable {
    public typealias Decision = AccessDecision

    public var allowNamespaces: [String]
    public var denyNamespaces: [String]
    public var allowServiceAccounts: [String]
    public var denyServiceAccounts: [String]

    /// A policy that allows everyone.
    public static let allowAll = AuthorizationPolicy()

    public init(
        allowNamespaces: [String] = [], denyNamespaces: [String] = [], allowServiceAccounts: [String] = [],
        denyServiceAccounts: [String] = []
    ) {
        self.allowNamespaces = allowNamespaces
        self.denyNamespaces = denyNamespaces
        self.allowServiceAccounts = allowServiceAccounts
        self.denyServiceAccounts = denyServiceAccounts
    }

    /// Checks every rule's syntax; returns the first malformed rule, or nil.
    public func malformedRule() -> String? {
        let namespaceRules = allowNamespaces + denyNamespaces
        let accountRules = allowServiceAccounts + denyServiceAccounts
        if let bad = namespaceRules.first(where: { $0.isEmpty || $0.contains("/") }) { return bad }
        return accountRules.first { $0.split(separator: "/", omittingEmptySubsequences: false).count != 2 }
    }

    /// The decision for `caller`.
    public func evaluate(_ caller: AuthenticatedCaller) -> Decision {
        let account = "\(caller.namespace)/\(caller.serviceAccount)"
        if let rule = denyNamespaces.first(where: { NamePattern.matches($0, caller.namespace) }) {
            return .denied(reason: "namespace \(caller.namespace) is denied by rule '\(rule)'")
        }
        if let rule = denyServiceAccounts.first(where: { NamePattern.matches($0, account) }) {
            return .denied(reason: "service account \(account) is denied by rule '\(rule)'")
        }
        if allowNamespaces.isEmpty && allowServiceAccounts.isEmpty { return .allowed }
        if allowNamespaces.contains(where: { NamePattern.matches($0, caller.namespace) })
            || allowServiceAccounts.contains(where: { NamePattern.matches($0, account) })
        {
            return .allowed
        }
        return .denied(reason: "\(account) matches no allow rule")
    }

}

extension AuthorizationPolicy: CustomStringConvertible {
    /// The rules as the flags spell them (`allow-namespace=[demo] deny-service-account=[demo/legacy]`),
    /// or `allow all`: what a log line shows, not a struct dump.
    public var description: String {
        let rules = [
            ("allow-namespace", allowNamespaces), ("deny-namespace", denyNamespaces),
            ("allow-service-account", allowServiceAccounts), ("deny-service-account", denyServiceAccounts),
        ].filter { !$0.1.isEmpty }
        return rules.isEmpty ? "allow all" : rules.map { "\($0.0)=[\($0.1.joined(separator: ", "))]" }.joined(separator: " ")
    }
}
