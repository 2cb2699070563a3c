import FoundationEssentials
import Glibc

/// A caller whose credentials were verified: who it is and for how long that holds.
///
/// Produced by a workload authenticator; the SDS server binds it to a stream when the stream opens.
public struct AuthenticatedCaller: Hashable, Sendable {
    /// The identity certificates are issued for.
    public var spiffeID: SPIFFEID
    /// Kubernetes namespace of the service account.
    public var namespace: String
    /// Kubernetes service account name.
    public var serviceAccount: String
    /// When the credential stops being valid (the token's `exp`).
    public var credentialExpiry: Date
    /// The bound pod's name, when the token is a bound token.
    public var podName: String?
    /// The bound pod's UID, when the token is a bound token.
    public var podUID: String?
    /// The service account's UID, when the token names it.
    public var serviceAccountUID: String?
    /// The token's `sub`, for logs (never the token itself).
    public var subject: String
    /// The key ID that verified the token, for logs.
    public var keyID: String?
    /// The verified token itself, when a CA is asked on the caller's behalf (never logged).
    public var credential: CallerCredential?

    public init(
        spiffeID: SPIFFEID, namespace: String, serviceAccount: String, credentialExpiry: Date,
        podName: String? = nil, podUID: String? = nil, serviceAccountUID: String? = nil, subject: String,
        keyID: String? = nil
    ) {
        self.serviceAccountUID = serviceAccountUID
        self.spiffeID = spiffeID
        self.namespace = namespace
        self.serviceAccount = serviceAccount
        self.credentialExpiry = credentialExpiry
        self.podName = podName
        self.podUID = podUID
        self.subject = subject
        self.keyID = keyID
    }
}
