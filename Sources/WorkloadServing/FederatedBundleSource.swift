import SDSModel

/// What the server needs to serve other trust domains' roots: their current bundles. Declared
/// here, by its consumer; the agent's file-watching store conforms. When a bundle changes the
/// provider signals every stream through the cache's bundle-changed signal.
public protocol FederatedBundleSource: Sendable {
    /// The current bundle of each federated trust domain, by bare trust domain name.
    func federatedBundles() -> [String: TrustBundle]
}
