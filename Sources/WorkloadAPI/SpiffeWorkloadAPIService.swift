import FoundationEssentials
import Glibc
import GRPCCore
import Logging
import SDSModel
import SPIFFEAPI
import WorkloadServing
import SwiftASN1
import SwiftProtobuf

/// What the Workload API needs to issue and check JWT-SVIDs; the CA module's `JWTAuthority`
/// conforms in the agent.
public protocol JWTSVIDSigner: Sendable {
    /// The trust domain whose JWT bundle this is.
    var trustDomain: String { get }
    /// A JWT-SVID for `subject` and `audience`.
    func sign(subject: SPIFFEID, audience: [String], ttl: Duration, now: Date) async throws -> (token: String, expiry: Date)
    /// The trust domain's JWT bundle (a JWKS document).
    func bundleJWKS() -> Data
    /// The SPIFFE ID and claims (JSON) of a valid JWT-SVID for `audience`; throws with a reason.
    func validateSVID(_ token: String, audience: String, now: Date) async throws -> (subject: SPIFFEID, claims: Data)
}

/// The SPIFFE Workload API (`/SpiffeWorkloadAPI/*`) on the peer-attested socket: the caller is
/// the pod its process runs in (``CallerAdmission``), and gets exactly that pod's identity.
///
/// X.509: `FetchX509SVID` and `FetchX509Bundles` stream and send again when the certificate or
/// a bundle changes (rotation, a new root, a federated bundle). JWT: `FetchJWTSVID` signs with
/// the CA module's JWT key for the audiences asked for, `FetchJWTBundles` streams that key's
/// JWKS, `ValidateJWTSVID` checks a token of this trust domain. Every call must carry
/// `workload.spiffe.io: true` (the spec's guard against browsers and SSRF), else
/// `invalid_argument`.
public struct SpiffeWorkloadAPIService: SpiffeWorkloadAPI.ServiceProtocol {
    let admission: CallerAdmission
    let secrets: any SecretSource
    let federation: (any FederatedBundleSource)?
    let jwt: (any JWTSVIDSigner)?
    let jwtTTL: Duration
    let logger: Logger
    let now: @Sendable () -> Date

    /// The metadata every Workload API call must carry.
    public static let securityHeader = "workload.spiffe.io"

    public init(
        admission: CallerAdmission, secrets: any SecretSource, federation: (any FederatedBundleSource)?, jwt: (any JWTSVIDSigner)?,
        jwtTTL: Duration = .seconds(300), logger: Logger, now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.admission = admission
        self.secrets = secrets
        self.federation = federation
        self.jwt = jwt
        self.jwtTTL = jwtTTL
        self.logger = logger
        self.now = now
    }

    // MARK: X.509-SVID profile

    public func fetchX509SVID(
        request: ServerRequest<X509SVIDRequest>, context: ServerContext
    ) async throws -> StreamingServerResponse<X509SVIDResponse> {
        let caller = try await admit(request.metadata, context)
        // Watch before the first answer, so a change between the two is not missed.
        let updates = secrets.updates(for: caller.spiffeID)
        let first = try await escapingErrors { try await x509Response(for: caller) }
        logger.info("Workload API: X.509-SVID served", metadata: ["spiffe_id": "\(caller.spiffeID)", "pod": "\(caller.subject)"])
        return StreamingServerResponse { writer in
            try await writer.write(first)
            var last = first
            for await _ in updates {
                let next = try await escapingErrors { try await x509Response(for: caller) }
                guard next != last else { continue }
                try await writer.write(next)
                last = next
                logger.info("Workload API: X.509-SVID pushed", metadata: ["spiffe_id": "\(caller.spiffeID)"])
            }
            return [:]
        }
    }

    public func fetchX509Bundles(
        request: ServerRequest<X509BundlesRequest>, context: ServerContext
    ) async throws -> StreamingServerResponse<X509BundlesResponse> {
        let caller = try await admit(request.metadata, context)
        let updates = secrets.updates(for: caller.spiffeID)
        let first = try await bundlesResponse()
        return StreamingServerResponse { writer in
            try await writer.write(first)
            var last = first
            for await _ in updates {
                let next = try await bundlesResponse()
                guard next != last else { continue }
                try await writer.write(next)
                last = next
            }
            return [:]
        }
    }

    // MARK: JWT-SVID profile

    public func fetchJWTSVID(
        request: ServerRequest<JWTSVIDRequest>, context: ServerContext
    ) async throws -> ServerResponse<JWTSVIDResponse> {
        let caller = try await admit(request.metadata, context)
        return try await escapingErrors {
            let audience = request.message.audience
            guard !audience.isEmpty, !audience.contains(where: \.isEmpty) else {
                throw RPCError(code: .invalidArgument, message: "audience must be specified")
            }
            guard audience.count <= 16, audience.allSatisfy({ $0.utf8.count <= 256 }) else {
                throw RPCError(code: .invalidArgument, message: "at most 16 audiences of at most 256 bytes each")
            }
            let wanted = request.message.spiffeID
            guard wanted.isEmpty || wanted == caller.spiffeID.description else {
                throw RPCError(code: .permissionDenied, message: "this workload is not entitled to \(wanted); it is \(caller.spiffeID)")
            }
            let signer = try requireJWT()
            let (token, expiry) = try await signer.sign(subject: caller.spiffeID, audience: audience, ttl: jwtTTL, now: now())
            logger.info(
                "Workload API: JWT-SVID issued",
                metadata: ["spiffe_id": "\(caller.spiffeID)", "audience": "\(audience)", "expires": "\(expiry.formatted(.iso8601))"])
            var svid = JWTSVID()
            svid.spiffeID = caller.spiffeID.description
            svid.svid = token
            var response = JWTSVIDResponse()
            response.svids = [svid]
            return ServerResponse(message: response)
        }
    }

    public func fetchJWTBundles(
        request: ServerRequest<JWTBundlesRequest>, context: ServerContext
    ) async throws -> StreamingServerResponse<JWTBundlesResponse> {
        _ = try await admit(request.metadata, context)
        let signer = try await escapingErrors { try requireJWT() }
        var bundles = JWTBundlesResponse()
        bundles.bundles = ["spiffe://\(signer.trustDomain)": signer.bundleJWKS()]
        let response = bundles
        return StreamingServerResponse { writer in
            try await writer.write(response)
            // The JWT key does not rotate while the agent runs: hold the stream until the caller leaves.
            let (quiet, _) = AsyncStream.makeStream(of: Void.self)
            for await _ in quiet {}
            return [:]
        }
    }

    public func validateJWTSVID(
        request: ServerRequest<ValidateJWTSVIDRequest>, context: ServerContext
    ) async throws -> ServerResponse<ValidateJWTSVIDResponse> {
        let caller = try await admit(request.metadata, context)
        return try await escapingErrors {
            guard !request.message.audience.isEmpty else { throw RPCError(code: .invalidArgument, message: "audience must be specified") }
            guard !request.message.svid.isEmpty else { throw RPCError(code: .invalidArgument, message: "svid must be specified") }
            let signer = try requireJWT()
            let result: (subject: SPIFFEID, claims: Data)
            do {
                result = try await signer.validateSVID(request.message.svid, audience: request.message.audience, now: now())
            } catch {
                logger.info("Workload API: JWT-SVID did not validate", metadata: ["caller": "\(caller.spiffeID)", "reason": "\(error)"])
                throw RPCError(code: .invalidArgument, message: "JWT-SVID does not validate: \(error)")
            }
            var response = ValidateJWTSVIDResponse()
            response.spiffeID = result.subject.description
            response.claims = (try? Google_Protobuf_Struct(jsonUTF8Data: result.claims)) ?? Google_Protobuf_Struct()
            return ServerResponse(message: response)
        }
    }

    // MARK: Shared steps

    /// The spec's header check, then the caller through the agent's admission.
    private func admit(_ metadata: Metadata, _ context: ServerContext) async throws -> AuthenticatedCaller {
        try await escapingErrors {
            guard metadata[stringValues: Self.securityHeader].contains(where: { $0 == "true" }) else {
                throw RPCError(code: .invalidArgument, message: "security header missing from request: \(Self.securityHeader): true")
            }
            return try await admission.admit(metadata, method: context.descriptor.method)
        }
    }

    private func requireJWT() throws -> any JWTSVIDSigner {
        guard let jwt else {
            throw RPCError(
                code: .failedPrecondition,
                message: "JWT-SVIDs need the agent's own CA: with --upstream-ca there is no JWT key every node shares")
        }
        return jwt
    }

    private func x509Response(for caller: AuthenticatedCaller) async throws -> X509SVIDResponse {
        let secret: WorkloadSecret
        do {
            secret = try await secrets.workloadSecret(for: caller.spiffeID, credential: caller.credential)
        } catch {
            throw RPCError(issuing: caller.spiffeID, error)
        }
        let bundle = await secrets.trustBundle()
        guard !bundle.isEmpty else { throw RPCError(code: .unavailable, message: "no trust bundle yet: the CA has not answered") }
        var svid = X509SVID()
        svid.spiffeID = caller.spiffeID.description
        svid.x509Svid = try Self.der(secret.certificateChainPEM)
        svid.x509SvidKey = try Self.der(secret.privateKeyPEM)
        svid.bundle = try Self.der(bundle.rootsPEM)
        var response = X509SVIDResponse()
        response.svids = [svid]
        response.federatedBundles = try federatedBundlesDER()
        return response
    }

    private func bundlesResponse() async throws -> X509BundlesResponse {
        try await escapingErrors {
            let bundle = await secrets.trustBundle()
            guard !bundle.isEmpty else { throw RPCError(code: .unavailable, message: "no trust bundle yet: the CA has not answered") }
            var response = X509BundlesResponse()
            response.bundles = try federatedBundlesDER()
            response.bundles["spiffe://\(bundle.trustDomain)"] = try Self.der(bundle.rootsPEM)
            return response
        }
    }

    /// Other trust domains' roots, DER, keyed by the domain's SPIFFE ID.
    private func federatedBundlesDER() throws -> [String: Data] {
        var bundles: [String: Data] = [:]
        for (domain, federated) in federation?.federatedBundles() ?? [:] where !federated.isEmpty {
            bundles["spiffe://\(domain)"] = try Self.der(federated.rootsPEM)
        }
        return bundles
    }

    /// Every PEM block of `pem`, DER-encoded and concatenated (the API's "ASN.1 DER encoded"
    /// chains and bundles).
    static func der(_ pem: String) throws -> Data {
        do {
            return Data(try PEMDocument.parseMultiple(pemString: pem).flatMap(\.derBytes))
        } catch {
            throw RPCError(code: .internalError, message: "a certificate or key the agent holds is not PEM: \(error)")
        }
    }
}

