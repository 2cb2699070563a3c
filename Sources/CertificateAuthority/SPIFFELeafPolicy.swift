import SDSModel
import SwiftASN1
import X509

/// Verifier policy for an X.509-SVID leaf: exactly one URI SAN, equal to the expected SPIFFE ID.
///
/// It declares the SAN extension as handled, so a leaf whose SAN is critical (as it must be with
/// an empty subject) passes the verifier's critical-extension check.
public struct SPIFFELeafPolicy: VerifierPolicy, Sendable {
    /// The identity the leaf must carry.
    public let expected: SPIFFEID

    public init(expected: SPIFFEID) { self.expected = expected }

    public var verifyingCriticalExtensions: [ASN1ObjectIdentifier] { [.X509ExtensionID.subjectAlternativeName] }

    public func chainMeetsPolicyRequirements(chain: UnverifiedCertificateChain) async -> PolicyEvaluationResult {
        let sans: SubjectAlternativeNames
        do {
            guard let found = try chain.leaf.extensions.subjectAlternativeNames else {
                return .failsToMeetPolicy(reason: "leaf has no SAN extension")
            }
            sans = found
        } catch {
            return .failsToMeetPolicy(reason: "leaf SAN extension is malformed: \(error)")
        }
        let uris = sans.compactMap { name -> String? in
            if case .uniformResourceIdentifier(let uri) = name { return uri }
            return nil
        }
        guard uris == [expected.description], sans.count == 1 else {
            return .failsToMeetPolicy(reason: "leaf SANs \(Array(sans)) are not exactly [\(expected)]")
        }
        return .meetsPolicy
    }
}
