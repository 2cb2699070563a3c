import EnvoyAPI
import GRPCCore
import Logging
import SDSModel
import WorkloadServing
import SwiftProtobuf

/// Turns secret names into Envoy resources for one caller, each with an opaque version.
struct ResourceResolver: Sendable {
    struct Resolved: Sendable {
        var name: String
        var version: String
        var resource: Google_Protobuf_Any
    }

    let configuration: SDSServerConfiguration
    let secrets: any SecretSource
    let caller: AuthenticatedCaller
    let federation: (any FederatedBundleSource)?
    let logger: Logger

    /// Every name this caller may ask for: what a wildcard subscription means for SDS.
    var allNames: [String] { configuration.servedNames }

    /// The names a SotW or Fetch request means: `*` anywhere in the list (or no name at all, the
    /// legacy wildcard) is every name in ``allNames``; `*` is never a resource of its own.
    func expand(_ names: [String]) -> [String] {
        guard names.isEmpty || names.contains(RequestedNames.wildcard) else { return names }
        var seen = Set<String>()
        return (allNames + names.filter { $0 != RequestedNames.wildcard }).filter { seen.insert($0).inserted }
    }

    /// The current resources for `names`, sorted by name.
    ///
    /// Resolved in a child task. A Swift task keeps every allocator slab its deepest call chain
    /// needed until the task ends, and a stream's task lives as long as the stream: issuing a
    /// certificate (the cache actor, the CA, logging) inside it left ~10 KiB per open stream
    /// behind. The child's slabs go when it returns.
    func resolve(_ names: some Sequence<String>) async throws -> [Resolved] {
        let names = Array(names)
        async let resolved = resolveHere(names)
        return try await resolved
    }

    private func resolveHere(_ names: [String]) async throws -> [Resolved] {
        var resolved: [Resolved] = []
        // The workload secret first: with an upstream CA, its answer is what brings the roots.
        let ordered = Set(names).sorted { ($0 == configuration.workloadSecretName ? 0 : 1, $0) < ($1 == configuration.workloadSecretName ? 0 : 1, $1) }
        for name in ordered {
            let resource: Envoy_Extensions_TransportSockets_Tls_V3_Secret
            let version: String
            if name == configuration.workloadSecretName {
                let secret: WorkloadSecret
                do {
                    secret = try await secrets.workloadSecret(for: caller.spiffeID, credential: caller.credential)
                } catch {
                    logger.error("no certificate for the caller", metadata: ["error": "\(error.message)"])
                    throw RPCError(issuing: caller.spiffeID, error)
                }
                resource = SecretResources.tlsCertificate(named: name, from: secret)
                version = secret.version
            } else if case .success(let audiences) = JWTSVIDName.audiences(in: name) {
                // A JWT-SVID of the caller for these audiences, as the credential injector takes it.
                let svid: JWTSVIDSecret
                do {
                    svid = try await secrets.jwtSVID(for: caller.spiffeID, audiences: audiences)
                } catch {
                    logger.error("no JWT-SVID for the caller", metadata: ["error": "\(error.message)"])
                    throw RPCError(issuing: caller.spiffeID, error, what: "a JWT-SVID")
                }
                resource = SecretResources.genericSecret(named: name, value: svid.headerValue)
                version = svid.version
            } else if let trustDomain = configuration.federatedNames[name] {
                // Another trust domain's roots: only under its own name (and in the all-bundles
                // context), never under ours, or that domain could mint our identities.
                guard let bundle = federation?.federatedBundles()[trustDomain], !bundle.isEmpty else {
                    throw RPCError(code: .unavailable, message: "no bundle for federated trust domain \(trustDomain) yet")
                }
                resource = SecretResources.validationContext(named: name, from: bundle)
                version = bundle.version
            } else if name == configuration.allBundlesName {
                let own = try await ownBundle()
                let federated = (federation?.federatedBundles() ?? [:]).filter {
                    configuration.federatedTrustDomains.contains($0.key) && !$0.value.isEmpty
                }
                let bundles = [own] + federated.values.sorted { $0.trustDomain < $1.trustDomain }
                resource = try SecretResources.allBundles(named: name, from: bundles)
                version = bundles.map { "\($0.trustDomain)=\($0.version)" }.joined(separator: ",")
            } else {
                let bundle = try await ownBundle()
                resource = SecretResources.validationContext(named: name, from: bundle)
                version = bundle.version
            }
            resolved.append(Resolved(name: name, version: version, resource: try SecretResources.pack(resource)))
        }
        return resolved.sorted { $0.name < $1.name }
    }

    /// Our own trust bundle; `unavailable` while it is empty (an upstream CA that has not answered).
    private func ownBundle() async throws -> TrustBundle {
        let bundle = await secrets.trustBundle()
        guard !bundle.isEmpty else {
            throw RPCError(code: .unavailable, message: "no trust bundle yet: the CA has not answered; retry")
        }
        return bundle
    }

    /// A state-of-the-world response for `names`; its version is derived from the resources'.
    func sotwResponse(for names: [String]) async throws -> Envoy_Service_Discovery_V3_DiscoveryResponse {
        SecretResources.sotwResponse(try await resolve(names))
    }
}

/// The secret names of one request, checked against what this agent serves: at most
/// ``SDSServerConfiguration/maxResourceNamesPerRequest``, each a served name or ``wildcard``.
struct RequestedNames {
    /// Every served name (SotW and Fetch: also no name at all, the legacy wildcard; Delta: in
    /// the subscribe list); never a resource of its own.
    static let wildcard = "*"
    let names: [String]

    /// `invalid_argument` for too many names, `not_found` (naming what is served) for a name
    /// this agent does not serve.
    init(_ names: [String], configuration: SDSServerConfiguration) throws {
        guard names.count <= configuration.maxResourceNamesPerRequest else {
            throw RPCError(
                code: .invalidArgument,
                message: "\(names.count) resource names in one request; the limit is \(configuration.maxResourceNamesPerRequest)")
        }
        // A JWT-SVID name is served for any audience, once it is well formed.
        for name in names where JWTSVIDName.isJWTSVID(name) {
            if case .failure(let reason) = JWTSVIDName.audiences(in: name) {
                throw RPCError(code: .invalidArgument, message: "resource name '\(name)': \(reason.message)")
            }
        }
        let served = Set(configuration.servedNames)
        let unknown = names.filter { $0 != Self.wildcard && !served.contains($0) && !JWTSVIDName.isJWTSVID($0) }
        guard unknown.isEmpty else {
            throw RPCError(
                code: .notFound, message: "unknown secret name(s) \(unknown); this agent serves \(configuration.servedNames)")
        }
        self.names = names
    }
}
