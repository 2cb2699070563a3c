/// Where the verifier gets its keys: a fixed JWKS file, or keys discovered from the API server.
public protocol VerificationKeySource: Sendable {
    /// The keys to verify with now; nil while none could be loaded yet.
    func currentKeys() async -> VerificationKeySet?
    /// Called when a token names a key ID the current keys lack: may fetch the keys again
    /// (rate-limited), and returns the keys to use.
    func keys(afterUnknownKeyID keyID: String) async -> VerificationKeySet?
}

extension VerificationKeySet: VerificationKeySource {
    public func currentKeys() async -> VerificationKeySet? { self }
    public func keys(afterUnknownKeyID keyID: String) async -> VerificationKeySet? { self }
}
