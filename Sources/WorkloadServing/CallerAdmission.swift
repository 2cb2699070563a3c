import FoundationEssentials
import Glibc
import GRPCCore
import Logging
import SDSModel
import WorkloadAuthentication

/// Who is calling, for every service on the agent's sockets: the checks a call passes before it
/// is served, each refusal logged once (with the peer's pid/uid) and counted in
/// `sds_agent_refused_calls_total{code,reason}`.
///
/// On the token socket: peer uid → token (`unauthenticated`) → authorization policy → pod
/// binding → attestation policy (`permission_denied`). On the peer-attested socket (no token):
/// peer uid → the peer's pod (`unavailable` while it is not known yet) → attestation policy →
/// authorization policy.
public struct CallerAdmission: Sendable {
    let tokenHeaderKey: String
    let peerPolicy: PeerPolicy
    let authenticator: any WorkloadAuthenticator
    /// The authorization policy in force: replaced by a reload.
    public let authorization: Reloadable<AuthorizationPolicy>
    /// Attestation through the caller's pod (the peer-attested socket, the attestation policy).
    public let attestor: WorkloadAttestor?
    let readiness: @Sendable () -> String?
    let logger: Logger
    let refusals: RefusedCalls

    /// `tokenHeaderKey`: the metadata key of the raw token (lowercase); `readiness`: why the
    /// agent cannot issue now (nil when it can), told to a probe.
    public init(
        tokenHeaderKey: String, peerPolicy: PeerPolicy, authorization: AuthorizationPolicy, authenticator: any WorkloadAuthenticator,
        attestor: WorkloadAttestor?, readiness: @escaping @Sendable () -> String?, logger: Logger, refusals: RefusedCalls
    ) {
        self.tokenHeaderKey = tokenHeaderKey
        self.peerPolicy = peerPolicy
        self.authenticator = authenticator
        self.authorization = Reloadable(authorization)
        self.attestor = attestor
        self.readiness = readiness
        self.logger = logger
        self.refusals = refusals
    }

    /// The caller of a call with `metadata`, or the `RPCError` its refusal is answered with.
    ///
    /// Admitted in a child task, for the reason ``ResourceResolver/resolve(_:)`` resolves in one:
    /// a token's verification is a deep call chain, and the slabs it grows in a stream's task
    /// would stay for the stream's life.
    public func admit(_ metadata: Metadata, method: String) async throws -> AuthenticatedCaller {
        async let caller = admitHere(metadata, method: method)
        return try await caller
    }

    private func admitHere(_ metadata: Metadata, method: String) async throws -> AuthenticatedCaller {
        let peer = metadata[stringValues: PeerCredentials.metadataKey].first(where: { _ in true })
            .flatMap(PeerCredentials.init(metadataValue:))
        let token = CallerToken.extract(from: metadata, headerKey: tokenHeaderKey)
        // A liveness probe (`sds-agent check`: the probe header and no token) expects a refusal:
        // it is logged at debug level and not counted. A call with a token is never a probe, so
        // the header cannot hide a refused token from the warnings or the metric.
        let isProbe = token == nil && peer?.socket != .workload && metadata[stringValues: CallerToken.probeHeader].contains { _ in true }
        var call = Refusals(peer: peer, method: method, isProbe: isProbe, logger: logger, refusals: refusals)
        // A probe learns whether the agent can issue: `unavailable` with the reason when it cannot
        // (`sds-agent check` exits 1), the usual refusal when it can.
        if isProbe, let reason = readiness() {
            logger.debug("probe: not ready", metadata: ["reason": "\(reason)"])
            throw RPCError(code: .unavailable, message: "not ready: \(reason)")
        }
        if case .denied(let reason) = peerPolicy.admit(peer: peer) {
            throw call.refuse(.permissionDenied, reason: "peer", "refused SDS call: peer not allowed", detail: reason,
                              message: "caller refused: \(reason)")
        }
        if let peer, peer.socket == .workload {
            return try await admitByPod(peer, &call)
        }
        return try await admitByToken(token, peer: peer, &call)
    }

    /// The peer-attested socket: the caller is its pod's identity (no token), then the policy.
    private func admitByPod(_ peer: PeerCredentials, _ call: inout Refusals) async throws -> AuthenticatedCaller {
        guard let attestor else {
            throw call.refuse(.unavailable, reason: "pod_source_unavailable", "cannot attest the caller now",
                              detail: "no attestor", message: "this agent cannot attest callers")
        }
        let caller: AuthenticatedCaller
        do {
            caller = try await attestor.attest(peer: peer).caller
        } catch {
            throw call.refuse(error, for: nil)
        }
        call.logMetadata.merge(["spiffe_id": "\(caller.spiffeID)", "sub": "\(caller.subject)"]) { $1 }
        try authorize(caller, &call)
        return caller
    }

    /// The token socket: the token verified, then the policy, the pod binding and attestation.
    private func admitByToken(_ token: String?, peer: PeerCredentials?, _ call: inout Refusals) async throws -> AuthenticatedCaller {
        guard let token else {
            call.logMetadata["expected_header"] = "\(tokenHeaderKey)"
            throw call.refuse(
                .unauthenticated, reason: "\(AuthenticationError.Code.missingCredential)",
                "rejected SDS call: no service-account token in the call", detail: "no token",
                message: "no service-account token: send it in '\(tokenHeaderKey)' or 'authorization: Bearer'")
        }
        var caller: AuthenticatedCaller
        do {
            caller = try await authenticator.authenticate(token: token)
            caller.credential = CallerCredential(token: token, expiry: caller.credentialExpiry)
        } catch {
            call.logMetadata.merge(["detail": "\(error.message)", "kid": "\(error.keyID ?? "-")", "sub": "\(error.subject ?? "-")"]) { $1 }
            // Our failure (keys not loaded, API server down) is `unavailable`: Envoy retries it.
            if error.code.isTransient {
                throw call.refuse(.unavailable, reason: "\(error.code)", "cannot verify SDS caller now", detail: "\(error.code)",
                                  message: "cannot verify the token now: \(error)")
            }
            throw call.refuse(.unauthenticated, reason: "\(error.code)", "rejected SDS call: token failed verification",
                              detail: "\(error.code)", message: "token rejected: \(error)")
        }
        call.logMetadata.merge(["spiffe_id": "\(caller.spiffeID)", "sub": "\(caller.subject)", "kid": "\(caller.keyID ?? "-")"]) { $1 }
        try authorize(caller, &call)
        if case .denied(let reason) = peerPolicy.bind(peer: peer, to: caller) {
            throw call.refuse(.permissionDenied, reason: "pod_binding", "refused SDS call: the token does not belong to the calling pod",
                              detail: reason, message: "\(caller.spiffeID) refused: \(reason)")
        }
        if let attestor {
            do {
                try await attestor.check(caller)
            } catch {
                throw call.refuse(error, for: caller.spiffeID)
            }
        }
        return caller
    }

    private func authorize(_ caller: AuthenticatedCaller, _ call: inout Refusals) throws {
        if case .denied(let reason) = authorization.value.evaluate(caller) {
            throw call.refuse(.permissionDenied, reason: "policy", "refused SDS call: caller not authorized by policy", detail: reason,
                              message: "\(caller.spiffeID) is not allowed here: \(reason)")
        }
    }
}

/// One call's refusals: each logged once with what is known of the caller by then (the peer's
/// pid/uid, the token's `sub`/`kid`), and counted, except a probe's.
struct Refusals {
    var logMetadata: Logger.Metadata
    let isProbe: Bool
    let logger: Logger
    let refusals: RefusedCalls

    init(peer: PeerCredentials?, method: String, isProbe: Bool, logger: Logger, refusals: RefusedCalls) {
        logMetadata = [
            "method": "\(method)", "peer_pid": "\(peer.map { String($0.pid) } ?? "-")",
            "peer_uid": "\(peer.map { String($0.uid) } ?? "-")",
        ]
        self.isProbe = isProbe
        self.logger = logger
        self.refusals = refusals
    }

    /// Logs the refusal, counts it, and returns the error for the caller.
    mutating func refuse(_ code: RPCError.Code, reason: String, _ event: Logger.Message, detail: String, message: String) -> RPCError {
        logMetadata["reason"] = "\(detail)"
        logger.log(level: isProbe ? .debug : .warning, event, metadata: logMetadata)
        if !isProbe { refusals.count(code, reason: reason) }
        return RPCError(code: code, message: message)
    }

    /// An attestation failure: `unavailable` while the pod may still appear, else `permission_denied`.
    mutating func refuse(_ error: AttestationError, for id: SPIFFEID?) -> RPCError {
        if error.isTransient {
            return refuse(.unavailable, reason: error.code.rawValue, "cannot attest the caller now", detail: error.message,
                          message: "cannot attest the caller now: \(error.message)")
        }
        return refuse(.permissionDenied, reason: error.code.rawValue, "refused call: attestation failed", detail: error.message,
                      message: "\(id.map { "\($0) refused" } ?? "caller refused"): \(error.message)")
    }
}
