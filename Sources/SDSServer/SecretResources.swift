import EnvoyAPI
import FoundationEssentials
import Glibc
import GRPCCore
import SDSModel
import SwiftProtobuf

/// Builds Envoy's `Secret` resources from the agent's own types. The only place that knows the protos.
package enum SecretResources {
    /// The type URL of `envoy.extensions.transport_sockets.tls.v3.Secret`.
    package static let typeURL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

    /// Refuses a request for another resource type (an empty type URL is tolerated).
    package static func checkTypeURL(_ typeURL: String) throws {
        guard typeURL.isEmpty || typeURL == Self.typeURL else {
            throw RPCError(code: .invalidArgument, message: "type_url '\(typeURL)' is not \(Self.typeURL)")
        }
    }

    /// A `tls_certificate` secret: the full chain and the private key, inline.
    package static func tlsCertificate(named name: String, from secret: WorkloadSecret)
        -> Envoy_Extensions_TransportSockets_Tls_V3_Secret
    {
        var resource = Envoy_Extensions_TransportSockets_Tls_V3_Secret()
        resource.name = name
        resource.tlsCertificate.certificateChain.inlineBytes = Data(secret.certificateChainPEM.utf8)
        resource.tlsCertificate.privateKey.inlineBytes = Data(secret.privateKeyPEM.utf8)
        return resource
    }

    /// A `validation_context` secret: the trust bundle's roots as `trusted_ca`, and its
    /// revocation lists as `crl` (with `only_verify_leaf_cert_crl` when not every CA of the chain
    /// publishes one: Envoy would otherwise refuse every peer).
    package static func validationContext(named name: String, from bundle: TrustBundle)
        -> Envoy_Extensions_TransportSockets_Tls_V3_Secret
    {
        var resource = Envoy_Extensions_TransportSockets_Tls_V3_Secret()
        resource.name = name
        resource.validationContext.trustedCa.inlineBytes = Data(bundle.rootsPEM.utf8)
        if !bundle.revocationPEM.isEmpty {
            resource.validationContext.crl.inlineBytes = Data(bundle.revocationPEM.utf8)
            resource.validationContext.onlyVerifyLeafCertCrl = bundle.onlyVerifyLeafCRL
        }
        return resource
    }

    /// A `generic_secret` secret whose value is `value`, inline (the credential injector's).
    package static func genericSecret(named name: String, value: String) -> Envoy_Extensions_TransportSockets_Tls_V3_Secret {
        var resource = Envoy_Extensions_TransportSockets_Tls_V3_Secret()
        resource.name = name
        resource.genericSecret.secret.inlineString = value
        return resource
    }

    /// Envoy's SPIFFE certificate validator, by its extension name.
    package static let spiffeValidatorName = "envoy.tls.cert_validator.spiffe"

    /// The "all bundles" secret (SPIRE's `ALL`): a validation context whose SPIFFE validator holds
    /// one entry per trust domain, named by the bare trust domain, with only that domain's roots,
    /// so a peer is checked against the roots of the trust domain its SPIFFE ID names.
    package static func allBundles(named name: String, from bundles: [TrustBundle]) throws
        -> Envoy_Extensions_TransportSockets_Tls_V3_Secret
    {
        var validator = Envoy_Extensions_TransportSockets_Tls_V3_SPIFFECertValidatorConfig()
        validator.trustDomains = bundles.sorted { $0.trustDomain < $1.trustDomain }.map { bundle in
            var domain = Envoy_Extensions_TransportSockets_Tls_V3_SPIFFECertValidatorConfig.TrustDomain()
            domain.name = bundle.trustDomain
            domain.trustBundle.inlineBytes = Data(bundle.rootsPEM.utf8)
            return domain
        }
        var resource = Envoy_Extensions_TransportSockets_Tls_V3_Secret()
        resource.name = name
        resource.validationContext.customValidatorConfig.name = spiffeValidatorName
        resource.validationContext.customValidatorConfig.typedConfig = try Google_Protobuf_Any(message: validator)
        return resource
    }

    /// A state-of-the-world response: every resource, the version derived from theirs.
    static func sotwResponse(_ resolved: [ResourceResolver.Resolved]) -> Envoy_Service_Discovery_V3_DiscoveryResponse {
        var response = Envoy_Service_Discovery_V3_DiscoveryResponse()
        response.typeURL = typeURL
        response.resources = resolved.map(\.resource)
        response.versionInfo = resolved.map(\.version).joined(separator: ".")
        return response
    }

    /// A delta response with `resources`, each with its own version; `systemVersion` is every
    /// subscribed resource's (for Envoy's debugging only).
    static func deltaResponse(_ resources: [ResourceResolver.Resolved], systemVersion: [String])
        -> Envoy_Service_Discovery_V3_DeltaDiscoveryResponse
    {
        var response = Envoy_Service_Discovery_V3_DeltaDiscoveryResponse()
        response.typeURL = typeURL
        response.resources = resources.map { item in
            var resource = Envoy_Service_Discovery_V3_Resource()
            resource.name = item.name
            resource.version = item.version
            resource.resource = item.resource
            return resource
        }
        response.systemVersionInfo = systemVersion.joined(separator: ".")
        return response
    }

    /// Packs a secret into `Any` with Envoy's type URL.
    package static func pack(_ secret: Envoy_Extensions_TransportSockets_Tls_V3_Secret) throws -> Google_Protobuf_Any {
        try Google_Protobuf_Any(message: secret)
    }
}
