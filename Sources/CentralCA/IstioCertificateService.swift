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
        do {
            return try await answer(request, context: context)
        } catch let error as RPCError {
            throw RPCError(code: error.code, message: CallerText(error.message, limit: 1024).description)
        }
    }

    private func answer(
        _ request: ServerRequest<Istio_V1_Auth_IstioCertificateRequest>, context: ServerContext
    ) async throws -> ServerResponse<Istio_V1_Auth_IstioCertificateResponse> {
        var log: Logger.Metadata = [
            "peer": "\(context.remotePeer)",
            "cluster_id": "\(request.metadata[stringValues: "clusterid"].first(where: { _ in true }) ?? "-")",
        ]
        func refuse(_ reason: String, _ event: Logger.Message, detail: String, code: RPCError.Code = .unauthenticated) -> RPCError {
            log["reason"] = "\(detail)"
            logger.warning(event, metadata: log)
            refusedCounters[reason]?.increment()
            return RPCError(code: code, message: code == .unauthenticated ? Self.refusal : detail)
        }

        guard let token = Self.bearerToken(in: request.metadata) else {
            // An agent's reachability probe (the probe header, no token) expects this refusal:
            // logged at debug level, not counted as a refused CSR. A call with a token is never one.
            if request.metadata[stringValues: Self.probeHeader].contains(where: { _ in true }) {
                logger.debug("reachability probe answered", metadata: log)
                throw RPCError(code: .unauthenticated, message: Self.refusal)
            }
            throw refuse("token", "refused CSR: no bearer token", detail: "no 'authorization: Bearer' metadata")
        }
        let caller: AuthenticatedCaller
        do {
            caller = try await authenticator.authenticate(token: token)
        } catch {
            log.merge(["kid": "\(error.keyID ?? "-")", "sub": "\(error.subject ?? "-")"]) { $1 }
            if error.code.isTransient {
                logger.error("cannot verify a CSR caller now", metadata: log.merging(["error": "\(error)"]) { $1 })
                throw RPCError(code: .unavailable, message: "cannot verify the token now; retry")
            }
            throw refuse("token", "refused CSR: token failed verification", detail: "\(error)")
        }
        log["caller"] = "\(caller.spiffeID)"

        var identity = caller.spiffeID
        let impersonated = request.message.metadata.fields[Self.impersonatedIdentityKey]
        if let impersonated, case .stringValue(let requested)? = impersonated.kind, !requested.isEmpty {
            log["impersonated"] = "\(requested)"
            identity = try await authorizeImpersonation(of: requested, by: caller) { reason in
                refuse("impersonation", "refused CSR: impersonation not allowed", detail: reason)
            }
        }
        log["spiffe_id"] = "\(identity)"

        let csr: CertificateSigningRequest
        do {
            let document = try PEMDocument(pemString: request.message.csr)
            csr = try CertificateSigningRequest(pemDocument: document)
        } catch {
            throw refuse("csr", "refused CSR: not a PEM certificate request", detail: "the CSR is not a PEM PKCS#10 request: \(error)", code: .invalidArgument)
        }
        let asked = request.message.validityDuration
        let ttl = asked > 0 ? min(Duration.seconds(asked), configuration.maxTTL) : configuration.defaultTTL

        let chain: [Certificate]
        do {
            chain = try await ca.issue(csr: csr, for: identity, ttl: ttl, csrRules: .keyOnly)
        } catch {
            if error.code.isTransient {
                logger.error("cannot sign a CSR", metadata: log.merging(["error": "\(error)"]) { $1 })
                throw RPCError(code: .unavailable, message: "the CA cannot sign now")
            }
            throw refuse("ca", "refused CSR", detail: "\(error.message)", code: .invalidArgument)
        }
        var response = Istio_V1_Auth_IstioCertificateResponse()
        do {
            // Leaf first, then intermediates, then every trusted root in one element (last), as
            // istiod sends its root bundle: an agent learns a prepared root before it signs.
            response.certChain = try chain.map { try $0.pem() } + [ca.roots.map { try $0.pem() }.joined()]
        } catch {
            throw RPCError(code: .internalError, message: "cannot encode the certificate")
        }
        issued.increment()
        logger.info(
            "issued certificate over the CSR API",
            metadata: log.merging([
                "serial": "\(chain[0].serialNumber.hexString)", "ttl": "\(ttl.components.seconds)s",
                "not_after": "\(chain[0].notValidAfter.formatted(.iso8601))",
            ]) { $1 })
        return ServerResponse(message: response)
    }

    /// istiod's `node_auth.go`: the caller's service account is a trusted node account, the
    /// requested identity is a SPIFFE ID of this trust domain, and a pod of its service account
    /// runs on the caller's node.
    private func authorizeImpersonation(
        of requested: String, by caller: AuthenticatedCaller, refuse: (String) -> RPCError
    ) async throws -> SPIFFEID {
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
