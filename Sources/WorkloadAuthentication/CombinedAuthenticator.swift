import SDSModel

/// Several authenticators that must all accept a token, in order (cheap local checks first), and
/// agree on who it names. The caller's credential expires when the first of them says so.
public struct CombinedAuthenticator: WorkloadAuthenticator {
    private let authenticators: [any WorkloadAuthenticator]

    public init(_ authenticators: [any WorkloadAuthenticator]) {
        precondition(!authenticators.isEmpty, "at least one authenticator")
        self.authenticators = authenticators
    }

    public func authenticate(token: String) async throws(AuthenticationError) -> AuthenticatedCaller {
        var caller = try await authenticators[0].authenticate(token: token)
        for authenticator in authenticators.dropFirst() {
            let other = try await authenticator.authenticate(token: token)
            guard other.spiffeID == caller.spiffeID else {
                throw AuthenticationError(
                    code: .missingClaims, message: "verifiers disagree on the identity: \(caller.spiffeID) vs \(other.spiffeID)",
                    keyID: caller.keyID, subject: caller.subject)
            }
            caller.credentialExpiry = min(caller.credentialExpiry, other.credentialExpiry)
            caller.podUID = caller.podUID ?? other.podUID
            caller.podName = caller.podName ?? other.podName
            caller.serviceAccountUID = caller.serviceAccountUID ?? other.serviceAccountUID
        }
        return caller
    }
}
