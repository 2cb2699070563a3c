import CertificateAuthority
import CoreMetrics
import FoundationEssentials
import Glibc
import GRPCCore
import IstioAPI
import Logging
import SDSModel
import WorkloadAuthentication
import SwiftASN1
import X509
import SwiftProtobuf

/// Istio's `IstioCertificateService` (istio/api `security/v1alpha1/ca.proto`) in front of an
/// ``EmbeddedCA``: what `sds-agent ca serve` answers, as istiod does (`security/pkg/server/ca`).
///
/// The caller is authenticated by `authorization: Bearer <token>` with the same verifiers as the
/// SDS side. The certificate carries the caller's identity whatever the CSR asks for (only the
/// CSR's key is used, after its proof of possession), or the SPIFFE ID in
/// `metadata["ImpersonatedIdentity"]` when the caller is a trusted node account and a pod of that
/// service account runs on the caller's node (``NodeAuthorizer``). Every refusal is an opaque
/// `unauthenticated`, as istiod answers; the reason is logged here. TTLs are capped.
public struct IstioCertificateService: Istio_V1_Auth_IstioCertificateService.ServiceProtocol {
    /// What the service grants.
    public struct Configuration: Sendable {
        /// Trust domain of every identity issued.
        public var trustDomain: String
        /// Lifetime when the request asks for none.
        public var defaultTTL: Duration
        /// Longest lifetime granted, whatever is asked.
        public var maxTTL: Duration
        /// Service accounts (`NAMESPACE/NAME`) allowed to ask for other identities on their node.
        public var trustedNodeAccounts: Set<String>

        public init(trustDomain: String, defaultTTL: Duration, maxTTL: Duration, trustedNodeAccounts: Set<String> = []) {
            self.trustDomain = trustDomain
            self.defaultTTL = defaultTTL
            self.maxTTL = maxTTL
            self.trustedNodeAccounts = trustedNodeAccounts
        }
    }

    /// The metadata key naming the identity a node agent asks for (istiod's `ImpersonatedIdentity`).
    public static let impersonatedIdentityKey = "ImpersonatedIdentity"
    /// The message of every refusal of the caller, as istiod's.
    public static let refusal = "request authenticate failure"

    private let configuration: Configuration
    private let authenticator: any WorkloadAuthenticator
    private let ca: EmbeddedCA
    private let nodes: (any NodeAuthorizer)?
    private let logger: Logger
    private let issued: Counter
    private let refusedCounters: [String: Counter]
    private let metricsFactory: any MetricsFactory

    public init(
        configuration: Configuration, authenticator: any WorkloadAuthenticator, ca: EmbeddedCA,
        nodes: (any NodeAuthorizer)?, logger: Logger, metrics: any MetricsFactory = MetricsSystem.factory
    ) {
        self.configuration = configuration
        self.authenticator = authenticator
        self.ca = ca
        self.nodes = nodes
        self.logger = logger
        self.metricsFactory = metrics
        issued = Counter(label: "sds_agent_ca_certificates_issued_total", factory: metrics)
        refusedCounters = Dictionary(
            uniqueKeysWithValues: ["token", "impersonation", "csr", "ca"].map {
                ($0, Counter(label: "sds_agent_ca_refused_requests_total", dimensions: [("reason", $0)], factory: metrics))
            })
    }

    /// Metadata that marks an agent's reachability probe (the same key as the SDS socket's).
    public static let probeHeader = "x-sds-agent-probe"

    public func createCertificate(
        request: ServerRequest<Istio_V1_Auth_IstioCertificateRequest>, context: ServerContext
    ) async throws -> ServerResponse<Istio_V1_Auth_IstioCertificateResponse> {
        // Status messages may quote what the caller sent (a CSR's PEM label, say): escaped and
        // bounded at this edge, as the SDS service does for its own.
        // Every answer, a refusal included, says which CA certificates are tainted, so agents
        // learn of a taint from any call (their periodic probe too) and re-issue what chains to one.
        let tainted = ca.tainted
        var announcement = Metadata()
        if !tainted.isEmpty { announcement.addString(tainted.metadataValue, forKey: TaintedCertificates.metadataKey) }
        // And the roots trusted now, so an agent's probe learns a new root before any CSR of it
        // is due (the answer's last element says the same to a CSR).
        for root in ca.roots.prefix(CAAnnouncement.maximumRoots) {
            var serializer = DER.Serializer()
            if (try? serializer.serialize(root)) != nil { announcement.addBinary(serializer.serializedBytes, forKey: CAAnnouncement.rootsKey) }
        }
        // And the revocation lists served now, which agents in upstream mode serve in turn.
        if let served = ca.servedRevocation, served.lists.reduce(0, { $0 + $1.der.count }) <= CAAnnouncement.maximumRevocationBytes {
            for list in served.lists.prefix(CAAnnouncement.maximumRevocationLists) {
                announcement.addBinary(list.der, forKey: CAAnnouncement.revocationKey)
            }
        }
        do {
            var response = try await answer(request, context: context)
            response.metadata.add(contentsOf: announcement)
            return response
        } catch let error as RPCError {
            throw RPCError(code: error.code, message: CallerText(error.message, limit: 1024).description, metadata: announcement)
        }
    }

    private func answer(
        _ request: ServerRequest<Istio_V1_Auth_IstioCertificateRequest>, context: ServerContext
    ) async throws -> ServerResponse<Istio_V1_Auth_IstioCertificateResponse> {
        var call = CSRCall(
            log: [
                "peer": "\(context.remotePeer)",
                "cluster_id": "\(request.metadata[stringValues: "clusterid"].first(where: { _ in true }) ?? "-")",
            ], logger: logger, counters: refusedCounters)
        let caller = try await authenticate(request.metadata, &call)
        let identity = try await identity(asked: request.message, by: caller, &call)
        let csr: CertificateSigningRequest
        do {
            csr = try CertificateSigningRequest(pemDocument: try PEMDocument(pemString: request.message.csr))
        } catch {
            throw call.refuse("csr", "refused CSR: not a PEM certificate request", detail: "the CSR is not a PEM PKCS#10 request: \(error)", code: .invalidArgument)
        }
        let asked = request.message.validityDuration
        let ttl = asked > 0 ? min(Duration.seconds(asked), configuration.maxTTL) : configuration.defaultTTL
        let chain: [Certificate]
        do {
            chain = try await ca.issue(csr: csr, for: identity, ttl: ttl, csrRules: .keyOnly)
        } catch {
            if error.code.isTransient {
                logger.error("cannot sign a CSR", metadata: call.log.merging(["error": "\(error)"]) { $1 })
                throw RPCError(code: .unavailable, message: "the CA cannot sign now")
            }
            throw call.refuse("ca", "refused CSR", detail: "\(error.message)", code: .invalidArgument)
        }
        var response = Istio_V1_Auth_IstioCertificateResponse()
        do {
            // Leaf first, then intermediates, then every trusted root in one element (last), as
            // istiod sends its root bundle: an agent learns a prepared root before it signs.
            response.certChain = try chain.map { try $0.pem() } + [ca.rootsPEM]
        } catch {
            throw RPCError(code: .internalError, message: "cannot encode the certificate")
        }
        issued.increment()
        logger.info(
            "issued certificate over the CSR API",
            metadata: call.log.merging([
                "serial": "\(chain[0].serialNumber.hexString)", "ttl": "\(ttl.components.seconds)s",
                "not_after": "\(chain[0].notValidAfter.formatted(.iso8601))",
            ]) { $1 })
        return ServerResponse(message: response)
    }

    /// The caller, from its bearer token; a probe (the probe header, no token) is answered the
    /// refusal it expects, at debug level and not counted.
    private func authenticate(_ metadata: Metadata, _ call: inout CSRCall) async throws -> AuthenticatedCaller {
        guard let token = Self.bearerToken(in: metadata) else {
            // A call with a token is never a probe.
            if metadata[stringValues: Self.probeHeader].contains(where: { _ in true }) {
                logger.debug("reachability probe answered", metadata: call.log)
                throw RPCError(code: .unauthenticated, message: Self.refusal)
            }
            throw call.refuse("token", "refused CSR: no bearer token", detail: "no 'authorization: Bearer' metadata")
        }
        let caller: AuthenticatedCaller
        do {
            caller = try await authenticator.authenticate(token: token)
        } catch {
            call.log.merge(["kid": "\(error.keyID ?? "-")", "sub": "\(error.subject ?? "-")"]) { $1 }
            if error.code.isTransient {
                logger.error("cannot verify a CSR caller now", metadata: call.log.merging(["error": "\(error)"]) { $1 })
                throw RPCError(code: .unavailable, message: "cannot verify the token now; retry")
            }
            throw call.refuse("token", "refused CSR: token failed verification", detail: "\(error)")
        }
        call.log["caller"] = "\(caller.spiffeID)"
        return caller
    }

    /// The identity to sign: the caller's own, or the one a trusted node account asks for.
    private func identity(
        asked request: Istio_V1_Auth_IstioCertificateRequest, by caller: AuthenticatedCaller, _ call: inout CSRCall
    ) async throws -> SPIFFEID {
        var identity = caller.spiffeID
        let impersonated = request.metadata.fields[Self.impersonatedIdentityKey]
        if let impersonated, case .stringValue(let requested)? = impersonated.kind, !requested.isEmpty {
            call.log["impersonated"] = "\(requested)"
            do {
                identity = try await authorizeImpersonation(of: requested, by: caller)
            } catch let refused as ImpersonationRefused {
                throw call.refuse("impersonation", "refused CSR: impersonation not allowed", detail: refused.reason)
            }
        }
        call.log["spiffe_id"] = "\(identity)"
        return identity
    }

    /// istiod's `node_auth.go`: the caller's service account is a trusted node account, the
    /// requested identity is a SPIFFE ID of this trust domain, and a pod of its service account
    /// runs on the caller's node.
    private func authorizeImpersonation(of requested: String, by caller: AuthenticatedCaller) async throws -> SPIFFEID {
        func refuse(_ reason: String) -> ImpersonationRefused { ImpersonationRefused(reason: reason) }
        let account = "\(caller.namespace)/\(caller.serviceAccount)"
        guard configuration.trustedNodeAccounts.contains(account) else {
            throw refuse("\(account) is not a trusted node account (--trusted-node-account)")
        }
        guard let identity = try? SPIFFEID(parsing: requested), identity.trustDomain == configuration.trustDomain,
            let (namespace, serviceAccount) = identity.kubernetesServiceAccount
        else {
            throw refuse("'\(requested)' is not spiffe://\(configuration.trustDomain)/ns/NAMESPACE/sa/NAME")
        }
        guard let nodes else { throw refuse("impersonation needs the API server (--kube-api-server) to find the caller's node") }
        do {
            try await nodes.authorize(caller: caller, toActAs: namespace, serviceAccount)
        } catch {
            if error.isTransient {
                logger.error("cannot check the caller's node now", metadata: ["error": "\(error.message)", "caller": "\(caller.spiffeID)"])
                throw RPCError(code: .unavailable, message: "cannot check the caller's node now; retry")
            }
            throw refuse(error.message)
        }
        return identity
    }

    /// The token in `authorization: Bearer <token>`.
    static func bearerToken(in metadata: Metadata) -> String? {
        metadata[stringValues: "authorization"].lazy.compactMap(BearerToken.token(in:)).first
    }
}

/// One CSR call's log context and refusals: each refusal logged once with it, and counted.
struct CSRCall {
    var log: Logger.Metadata
    let logger: Logger
    let counters: [String: Counter]

    /// Logs and counts a refusal; the caller learns only istiod's opaque refusal unless `code`
    /// says the request itself is wrong.
    mutating func refuse(_ reason: String, _ event: Logger.Message, detail: String, code: RPCError.Code = .unauthenticated) -> RPCError {
        log["reason"] = "\(detail)"
        logger.warning(event, metadata: log)
        counters[reason]?.increment()
        return RPCError(code: code, message: code == .unauthenticated ? IstioCertificateService.refusal : detail)
    }
}

/// Why a node account may not ask for an identity (answered as istiod's opaque refusal).
struct ImpersonationRefused: Error {
    var reason: String
}
