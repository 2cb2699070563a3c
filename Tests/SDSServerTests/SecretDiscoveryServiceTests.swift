import CertificateAuthority
import Crypto
import EnvoyAPI
import Foundation
import GRPCCore
import GRPCInProcessTransport
import MetricsTestKit
import SDSModel
import SDSAgent
import SDSServer
import SecretCache
import WorkloadServing
import TestSupport
import Synchronization
import Testing
import WorkloadAuthentication
import X509

/// The SDS service over gRPC's in-process transport: real gRPC framing, no socket.
@Suite(.timeLimit(.minutes(1))) struct SecretDiscoveryServiceTests {
    let tokens = TokenFactory()

    @discardableResult
    func withClient<Result: Sendable>(
        clock: ManualClock = ManualClock(), tokenExpiryMargin: Duration = .seconds(30),
        authorization: AuthorizationPolicy = .allowAll, metrics: TestMetrics = TestMetrics(),
        authenticator override: (any WorkloadAuthenticator)? = nil, limits: StreamLimits = .defaults,
        attestor: WorkloadAttestor? = nil, peerPolicy: PeerPolicy = .none, issuer: (any CertificateIssuer)? = nil,
        _ body: @Sendable @escaping (Envoy_Service_Secret_V3_SecretDiscoveryService.Client<InProcessTransport.Client>, SecretCache) async throws -> Result
    ) async throws -> Result {
        let keys = try await VerificationKeySet(jwksJSON: tokens.jwksJSON())
        let authenticator = KubernetesTokenVerifier(
            configuration: .init(trustDomain: "cluster.local", issuers: [TokenFactory.issuer], audiences: [TokenFactory.audience]),
            keys: keys)
        let cache = SecretCache(
            issuer: issuer ?? TestPKI.ca(now: { clock.now }), configuration: .init(certificateTTL: .seconds(3600), rotation: .init(jitter: 0)),
            logger: TestPKI.quietLogger, now: { clock.now })
        let service = SecretDiscoveryService(
            configuration: .init(
                validationContextNames: ["ROOTCA", "spiffe://cluster.local"], tokenExpiryMargin: tokenExpiryMargin,
                authorization: authorization, peerPolicy: peerPolicy, limits: limits),
            authenticator: override ?? authenticator, secrets: cache, logger: TestPKI.quietLogger, metrics: metrics,
            attestor: attestor)
        let transport = InProcessTransport()
        return try await withGRPCServer(transport: transport.server, services: [service]) { _ in
            try await withGRPCClient(transport: transport.client) { client in
                try await body(Envoy_Service_Secret_V3_SecretDiscoveryService.Client(wrapping: client), cache)
            }
        }
    }

    @Test func streamServesTheCallersCertificateAndNeverAnswersAnACK() async throws {
        let metadata = SDSTestClient.metadata(token: tokens.token(namespace: "demo", serviceAccount: "frontend"))
        try await withClient { client, cache in
            try await SDSTestClient.withStream(client, metadata: metadata) { session in
                session.send(SDSTestClient.request(["default"], node: true))
                let first = try #require(try await session.next())
                #expect(first.typeURL == SDSTestClient.secretTypeURL && first.nonce == "1" && !first.versionInfo.isEmpty)
                let secret = try #require(try SDSTestClient.secrets(in: first).first)
                #expect(secret.name == "default")
                let leaf = try Certificate(pemEncoded: String(decoding: secret.tlsCertificate.certificateChain.inlineBytes, as: UTF8.self))
                #expect(try leaf.extensions.subjectAlternativeNames.map(Array.init) == [.uniformResourceIdentifier("spiffe://cluster.local/ns/demo/sa/frontend")])
                #expect(String(decoding: secret.tlsCertificate.privateKey.inlineBytes, as: UTF8.self).contains("PRIVATE KEY"))

                // ACK (no node: set_node_on_first_message_only), then a name change. Had the ACK been
                // answered, the next response would carry only "default".
                session.send(SDSTestClient.request(["default"], version: first.versionInfo, nonce: first.nonce))
                session.send(SDSTestClient.request(["default", "ROOTCA"], version: first.versionInfo, nonce: first.nonce))
                let second = try #require(try await session.next())
                #expect(second.nonce == "2")
                #expect(try SDSTestClient.secrets(in: second).map(\.name).sorted() == ["ROOTCA", "default"])
            }
            #expect(await cache.issuedCertificates == 1)
        }
    }

    /// The embedded CA, telling whether it wants the caller's token, and recording what it got.
    final class CredentialRecordingIssuer: CertificateIssuer, Sendable {
        let usesCallerCredential: Bool
        let ca = TestPKI.ca()
        let received = Mutex<[String?]>([])
        init(usesCallerCredential: Bool) { self.usesCallerCredential = usesCallerCredential }
        func issue(csr: CertificateSigningRequest, for identity: SPIFFEID, ttl: Duration, credential: CallerCredential?)
            async throws(IssuanceError) -> [Certificate]
        {
            received.withLock { $0.append(credential?.token) }
            return try await ca.issue(csr: csr, for: identity, ttl: ttl, credential: nil)
        }
        func trustBundle() async -> TrustBundle { await ca.trustBundle() }
    }

    @Test(arguments: [true, false])
    func theCallersTokenReachesOnlyACAThatUsesIt(_ uses: Bool) async throws {
        let token = tokens.token(namespace: "demo", serviceAccount: "frontend")
        let issuer = CredentialRecordingIssuer(usesCallerCredential: uses)
        try await withClient(issuer: issuer) { client, _ in
            try await SDSTestClient.withStream(client, metadata: SDSTestClient.metadata(token: token)) { session in
                session.send(SDSTestClient.request(["default"], node: true))
                let first = try await session.next()
                #expect(first != nil)
            }
        }
        #expect(issuer.received.withLock { $0 } == [uses ? token : nil])
    }

    @Test func aRotationIsPushedOnTheOpenStreamAndANACKIsNotAnswered() async throws {
        let clock = ManualClock()
        let metadata = SDSTestClient.metadata(token: tokens.token())
        let metrics = TestMetrics()
        try await withClient(clock: clock, metrics: metrics) { client, cache in
            try await SDSTestClient.withStream(client, metadata: metadata) { session in
                session.send(SDSTestClient.request(["default"], node: true))
                let first = try #require(try await session.next())
                #expect(try metrics.expectMeter(SecretDiscoveryService.openStreamsMetric, [("api", "sotw")]).lastValue == 1)
                // Envoy rejects it (NACK): nothing is sent back for that.
                session.send(SDSTestClient.request(["default"], nonce: first.nonce, error: "Failed to load certificate chain"))
                clock.advance(1801)
                await cache.maintain()
                let pushed = try #require(try await session.next())
                #expect(pushed.nonce == "2" && pushed.versionInfo != first.versionInfo)
                let old = try #require(try SDSTestClient.secrets(in: first).first)
                let new = try #require(try SDSTestClient.secrets(in: pushed).first)
                #expect(old.tlsCertificate.privateKey != new.tlsCertificate.privateKey, "rotation re-keys")
            }
        }
        #expect(try metrics.expectCounter(SecretDiscoveryService.rejectionsMetric, [("api", "sotw")]).totalValue == 1)
        #expect(try metrics.expectMeter(SecretDiscoveryService.openStreamsMetric, [("api", "sotw")]).lastValue == 0, "the stream ended")
    }

    @Test func manyStreamsOfOneIdentityShareOneCertificateAllGetTheRotationAndLeaveNoWatchers() async throws {
        let clock = ManualClock()
        let metadata = SDSTestClient.metadata(token: tokens.token())
        let firstResponses = Counter()
        try await withClient(clock: clock) { client, cache in
            let serials = try await withThrowingTaskGroup(of: [String].self) { group in
                for _ in 0..<20 {
                    group.addTask {
                        try await SDSTestClient.withStream(client, metadata: metadata) { session in
                            session.send(SDSTestClient.request(["default"]))
                            let first = try #require(try await session.next())
                            firstResponses.increment()
                            let second = try #require(try await session.next())  // the push
                            return [first.versionInfo, second.versionInfo]
                        }
                    }
                }
                // Rotate once all 20 streams have their first response.
                let deadline = ContinuousClock.now + .seconds(20)
                while firstResponses.count < 20 {
                    guard ContinuousClock.now < deadline else { throw CancellationError() }
                    try await Task.sleep(for: .milliseconds(10))
                }
                clock.advance(1801)
                await cache.maintain()
                return try await group.reduce(into: [[String]]()) { $0.append($1) }
            }
            #expect(Set(serials.map { $0[0] }).count == 1, "one certificate for the identity")
            #expect(Set(serials.map { $0[1] }).count == 1 && serials[0][1] != serials[0][0], "every stream got the rotation")
            #expect(await cache.issuedCertificates == 2)
            // Every stream ended: every watcher is gone.
            let deadline = ContinuousClock.now + .seconds(10)
            while cache.watcherCount > 0 && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
            #expect(cache.watcherCount == 0)
        }
    }

    @Test func aStreamEndsWithUnavailableBeforeItsTokenExpires() async throws {
        // Token valid for 31 s, margin 30 s: the stream must end after about a second.
        let metadata = SDSTestClient.metadata(token: tokens.token(ttl: 31))
        let started = ContinuousClock.now
        try await withClient(tokenExpiryMargin: .seconds(30)) { client, _ in
            do {
                try await SDSTestClient.withStream(client, metadata: metadata) { session in
                    session.send(SDSTestClient.request(["default"]))
                    _ = try #require(try await session.next())
                    while try await session.next() != nil {}
                }
                Issue.record("the stream outlived its token")
            } catch let error as RPCError {
                #expect(error.code == .unavailable)
                #expect(error.message.contains("token"))
            }
        }
        #expect(ContinuousClock.now - started < .seconds(10))
    }

    @Test(arguments: ["ROOTCA", "spiffe://cluster.local"])
    func servesTheTrustBundleUnderEitherName(_ name: String) async throws {
        let metadata = SDSTestClient.metadata(token: tokens.token())
        try await withClient { client, _ in
            try await SDSTestClient.withStream(client, metadata: metadata) { session in
                session.send(SDSTestClient.request([name]))
                let response = try #require(try await session.next())
                let secret = try #require(try SDSTestClient.secrets(in: response).first)
                #expect(secret.name == name)
                let pem = String(decoding: secret.validationContext.trustedCa.inlineBytes, as: UTF8.self)
                #expect(pem.contains("BEGIN CERTIFICATE"))
            }
        }
    }

    /// The rejection matrix, end to end through the gRPC service: each bad credential is
    /// `unauthenticated`, counted under its own reason, and no certificate is issued.
    enum BadCredential: String, CaseIterable, Sendable {
        case missing, notAJWT, malformedBase64, malformedJSON, algNone, hmacWithThePublicKey, unknownKeyID, wrongKey
        case expired, notYetValid, wrongIssuer, wrongAudience, garbledKubernetesClaim, missingKubernetesClaim, oversized

        func token(signedBy tokens: TokenFactory) -> String? {
            let now = Date()
            var claims = TokenFactory.claims(namespace: "demo", serviceAccount: "frontend", now: now)
            let t = Int(now.timeIntervalSince1970)
            switch self {
            case .missing: return nil
            case .notAJWT: return "not-a-jwt"
            case .malformedBase64: return "!!!.???.***"
            case .malformedJSON: return "bm90IGpzb24.bm90IGpzb24.c2ln"  // "not json" as header and payload
            case .algNone: return TokenFactory.signingInput(header: ["alg": "none", "kid": tokens.kid], claims: claims) + ".e30"
            case .hmacWithThePublicKey:
                let input = TokenFactory.signingInput(header: ["alg": "HS256", "kid": tokens.kid], claims: claims)
                let secret = SymmetricKey(data: Data(tokens.key.publicKey.pemRepresentation.utf8))
                return input + "." + TokenFactory.base64URL(Data(HMAC<SHA256>.authenticationCode(for: Data(input.utf8), using: secret)))
            case .unknownKeyID: return TokenFactory(kid: "not-in-the-jwks").sign(claims: claims)
            case .wrongKey: return TokenFactory(kid: tokens.kid).sign(claims: claims)
            case .expired: claims["iat"] = t - 7200; claims["nbf"] = t - 7200; claims["exp"] = t - 3600
            case .notYetValid: claims["iat"] = t + 3600; claims["nbf"] = t + 3600; claims["exp"] = t + 7200
            case .wrongIssuer: claims["iss"] = "https://evil.example.com"
            case .wrongAudience: claims["aud"] = ["vault"]
            case .garbledKubernetesClaim: claims["kubernetes.io"] = "demo"
            case .missingKubernetesClaim: claims["kubernetes.io"] = nil; claims["sub"] = "admin@example.com"
            case .oversized: claims["padding"] = String(repeating: "x", count: 20_000)
            }
            return tokens.sign(claims: claims)
        }

        var reason: String {
            switch self {
            case .missing: "missing_credential"
            case .notAJWT, .malformedBase64, .malformedJSON, .garbledKubernetesClaim: "malformed_token"
            case .algNone, .hmacWithThePublicKey: "disallowed_algorithm"
            case .unknownKeyID: "unknown_key"
            case .wrongKey: "bad_signature"
            case .expired: "expired"
            case .notYetValid: "not_yet_valid"
            case .wrongIssuer: "wrong_issuer"
            case .wrongAudience: "wrong_audience"
            case .missingKubernetesClaim: "missing_claims"
            case .oversized: "token_too_large"
            }
        }
    }

    @Test(arguments: BadCredential.allCases)
    func aBadCredentialIsUnauthenticatedAndIssuesNothing(_ bad: BadCredential) async throws {
        let metrics = TestMetrics()
        let token = bad.token(signedBy: tokens)
        try await withClient(metrics: metrics) { client, cache in
            do {
                try await SDSTestClient.withStream(client, metadata: SDSTestClient.metadata(token: token)) { session in
                    session.send(SDSTestClient.request(["default"]))
                    _ = try await session.next()
                }
                Issue.record("the stream was accepted")
            } catch let error as RPCError {
                #expect(error.code == .unauthenticated)
                if let token { #expect(!error.message.contains(token), "the status must never echo the token") }
            }
            #expect(await cache.issuedCertificates == 0)
            // The agent keeps serving everyone else.
            _ = try await client.fetchSecrets(SDSTestClient.request(["default"]), metadata: SDSTestClient.metadata(token: tokens.token()))
            #expect(await cache.issuedCertificates == 1)
        }
        let refused = try metrics.expectCounter(
            SecretDiscoveryService.refusedCallsMetric, [("code", "unauthenticated"), ("reason", bad.reason)])
        #expect(refused.totalValue == 1)
    }

    @Test func aProbeIsNotCountedButTheProbeHeaderCannotHideABadToken() async throws {
        let metrics = TestMetrics()
        try await withClient(metrics: metrics) { client, cache in
            for token in [nil, "not-a-jwt"] as [String?] {
                var metadata = SDSTestClient.metadata(token: token)
                metadata.addString("1", forKey: CallerToken.probeHeader)
                await #expect(throws: RPCError.self) {
                    _ = try await client.fetchSecrets(SDSTestClient.request(["default"]), metadata: metadata)
                }
            }
            #expect(await cache.issuedCertificates == 0)
        }
        #expect(throws: (any Error).self, "a probe is not a refused caller") {
            try metrics.expectCounter(
                SecretDiscoveryService.refusedCallsMetric, [("code", "unauthenticated"), ("reason", "missing_credential")])
        }
        let hidden = try metrics.expectCounter(
            SecretDiscoveryService.refusedCallsMetric, [("code", "unauthenticated"), ("reason", "malformed_token")])
        #expect(hidden.totalValue == 1)
    }

    @Test func aCallerThePolicyDeniesGetsPermissionDeniedAndNoCertificate() async throws {
        let denied = SDSTestClient.metadata(token: tokens.token(namespace: "other", serviceAccount: "frontend"))
        let allowed = SDSTestClient.metadata(token: tokens.token(namespace: "demo", serviceAccount: "frontend"))
        let metrics = TestMetrics()
        try await withClient(authorization: AuthorizationPolicy(allowNamespaces: ["demo"]), metrics: metrics) { client, cache in
            do {
                _ = try await client.fetchSecrets(SDSTestClient.request(["default"]), metadata: denied)
                Issue.record("a denied namespace was served")
            } catch let error as RPCError {
                #expect(error.code == .permissionDenied)
                #expect(error.message.contains("other/frontend"))
            }
            #expect(await cache.issuedCertificates == 0)
            _ = try await client.fetchSecrets(SDSTestClient.request(["default"]), metadata: allowed)
            #expect(await cache.issuedCertificates == 1)
        }
        let refused = try metrics.expectCounter(
            SecretDiscoveryService.refusedCallsMetric, [("code", "permission_denied"), ("reason", "policy")])
        #expect(refused.totalValue == 1)
    }

    /// An authenticator that cannot verify anything now (keys not loaded, API server down).
    struct Unavailable: WorkloadAuthenticator {
        func authenticate(token: String) async throws(AuthenticationError) -> AuthenticatedCaller {
            throw AuthenticationError(code: .keysUnavailable, message: "no verification keys are loaded yet")
        }
    }

    @Test func whenTheAgentCannotVerifyTheCallIsUnavailableSoEnvoyRetries() async throws {
        let metrics = TestMetrics()
        try await withClient(metrics: metrics, authenticator: Unavailable()) { client, cache in
            do {
                _ = try await client.fetchSecrets(SDSTestClient.request(["default"]), metadata: SDSTestClient.metadata(token: tokens.token()))
                Issue.record("served without verifying")
            } catch let error as RPCError {
                #expect(error.code == .unavailable)
            }
            #expect(await cache.issuedCertificates == 0)
        }
        let refused = try metrics.expectCounter(
            SecretDiscoveryService.refusedCallsMetric, [("code", "unavailable"), ("reason", "keys_unavailable")])
        #expect(refused.totalValue == 1)
    }

    @Test func acceptsAnAuthorizationBearerHeader() async throws {
        var metadata = Metadata()
        metadata.addString("Bearer \(tokens.token())", forKey: "authorization")
        let bearer = metadata
        let response = try await withClient { client, _ in
            try await client.fetchSecrets(SDSTestClient.request(["default"]), metadata: bearer)
        }
        #expect(response.resources.count == 1)
    }

    @Test func anUnknownNameEndsTheStreamWithNotFound() async throws {
        let metadata = SDSTestClient.metadata(token: tokens.token())
        try await withClient { client, cache in
            do {
                try await SDSTestClient.withStream(client, metadata: metadata) { session in
                    session.send(SDSTestClient.request(["kube-system-admin"]))
                    _ = try await session.next()
                }
                Issue.record("an unknown name was answered")
            } catch let error as RPCError {
                #expect(error.code == .notFound)
                #expect(error.message.contains("kube-system-admin") && error.message.contains("default"))
            }
            #expect(await cache.issuedCertificates == 0)
        }
    }

    @Test func aWrongTypeURLIsInvalidArgument() async throws {
        var request = SDSTestClient.request(["default"])
        request.typeURL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        let wrongType = request
        let metadata = SDSTestClient.metadata(token: tokens.token())
        try await withClient { client, _ in
            await #expect(throws: RPCError.self) { try await client.fetchSecrets(wrongType, metadata: metadata) }
        }
    }

    /// Pods by UID, as the agent's pod watcher would answer.
    struct FixturePods: PodDirectory {
        var pods: [String: PodFacts]
        func pod(uid: String) async throws(AttestationError) -> PodFacts {
            guard let pod = pods[uid] else { throw AttestationError(.podUnknown, "pod \(uid) is not known") }
            return pod
        }
    }

    @Test func aPeerAttestedCallerGetsItsPodsIdentityWithNoTokenAndThePoliciesStillApply() async throws {
        let known = "6f1a2b3c-4d5e-4f60-8a9b-0c1d2e3f4a5b", unknown = "00000000-4d5e-4f60-8a9b-0c1d2e3f4a5b"
        let root = TestPKI.temporaryDirectory()
        for (pid, uid) in [(11, known), (12, unknown)] {
            try FileManager.default.createDirectory(atPath: "\(root)/\(pid)", withIntermediateDirectories: true)
            try "0::/kubepods/besteffort/pod\(uid)/c\n".write(toFile: "\(root)/\(pid)/cgroup", atomically: true, encoding: .utf8)
        }
        let pods = FixturePods(pods: [
            known: PodFacts(uid: known, namespace: "payments", name: "api-0", serviceAccount: "api",
                            containers: [.init(name: "main", image: "evil.example/x:1")])
        ])
        @Sendable func peer(pid: Int32, uid: UInt32 = 1337) -> Metadata {
            [PeerCredentials.metadataKey: .string(PeerCredentials(pid: pid, uid: uid, gid: 1337, socket: .workload).metadataValue)]
        }
        @Sendable func code(_ body: () async throws -> Void) async -> RPCError.Code? {
            do {
                try await body()
                return nil
            } catch {
                return (error as? RPCError)?.code
            }
        }
        let metrics = TestMetrics()
        let attestor = WorkloadAttestor(pods: pods, procRoot: root, trustDomain: "cluster.local")
        try await withClient(metrics: metrics, attestor: attestor, peerPolicy: PeerPolicy(allowedUIDs: [1337])) { client, cache in
            let response = try await client.fetchSecrets(SDSTestClient.request(["default"]), metadata: peer(pid: 11))
            let secret = try Envoy_Extensions_TransportSockets_Tls_V3_Secret(unpackingAny: response.resources[0])
            let chain = String(decoding: secret.tlsCertificate.certificateChain.inlineBytes, as: UTF8.self)
            let leaf = try Certificate(pemEncoded: chain)
            #expect(leaf.description.contains("spiffe://cluster.local/ns/payments/sa/api"))
            #expect(await code { _ = try await client.fetchSecrets(SDSTestClient.request(["default"]), metadata: peer(pid: 12)) } == .unavailable)
            #expect(await code { _ = try await client.fetchSecrets(SDSTestClient.request(["default"]), metadata: peer(pid: 13)) } == .permissionDenied)
            #expect(await code { _ = try await client.fetchSecrets(SDSTestClient.request(["default"]), metadata: peer(pid: 11, uid: 0)) } == .permissionDenied)
            // The attestation policy, reloaded: the pod's image is not approved.
            attestor.replacePolicy(with: AttestationPolicy(rules: [.init(namespace: "payments", images: ["registry.example/api"])]))
            #expect(await code { _ = try await client.fetchSecrets(SDSTestClient.request(["default"]), metadata: peer(pid: 11)) } == .permissionDenied)
            #expect(await cache.issuedCertificates == 1)
        }
        for (code, reason) in [("unavailable", "pod_unknown"), ("permission_denied", "not_in_pod"), ("permission_denied", "peer"),
                               ("permission_denied", "policy")] {
            #expect(try metrics.expectCounter(SecretDiscoveryService.refusedCallsMetric, [("code", code), ("reason", reason)]).totalValue == 1)
        }
    }

    @Test func fetchReturnsTheCurrentVersion() async throws {
        let metadata = SDSTestClient.metadata(token: tokens.token())
        try await withClient { client, _ in
            let a = try await client.fetchSecrets(SDSTestClient.request(["default"]), metadata: metadata)
            let b = try await client.fetchSecrets(SDSTestClient.request(["default"]), metadata: metadata)
            #expect(a.versionInfo == b.versionInfo && !a.versionInfo.isEmpty)
        }
    }

    /// `*` means every name the caller may have, never a resource called `*` (it was answered as
    /// a validation context of that name).
    @Test(arguments: [["*"], ["*", "default"], ["default", "*", "ROOTCA"]])
    func aWildcardIsEveryNameAndNeverAResource(_ names: [String]) async throws {
        let metadata = SDSTestClient.metadata(token: tokens.token())
        let served = ["ALL", "ROOTCA", "default", "spiffe://cluster.local"]
        try await withClient { client, _ in
            let fetched = try await client.fetchSecrets(SDSTestClient.request(names), metadata: metadata)
            #expect(try SDSTestClient.secrets(in: fetched).map(\.name).sorted() == served)
            try await SDSTestClient.withStream(client, metadata: metadata) { session in
                session.send(SDSTestClient.request(names, node: true))
                let first = try #require(try await session.next())
                #expect(try SDSTestClient.secrets(in: first).map(\.name).sorted() == served)
            }
        }
    }

    @Test func deltaServesSubscriptionsAndSkipsWhatEnvoyAlreadyHas() async throws {
        let metadata = SDSTestClient.metadata(token: tokens.token())
        try await withClient { client, _ in
            let (stream, continuation) = AsyncStream.makeStream(of: Envoy_Service_Discovery_V3_DeltaDiscoveryRequest.self)
            let request = StreamingClientRequest<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest>(metadata: metadata) { writer in
                for await message in stream { try await writer.write(message) }
            }
            try await client.deltaSecrets(request: request) { response in
                defer { continuation.finish() }
                var responses = response.messages.makeAsyncIterator()
                var subscribe = Envoy_Service_Discovery_V3_DeltaDiscoveryRequest()
                subscribe.typeURL = SDSTestClient.secretTypeURL
                subscribe.resourceNamesSubscribe = ["default"]
                continuation.yield(subscribe)
                let first = try #require(try await responses.next())
                #expect(first.resources.map(\.name) == ["default"] && first.nonce == "1" && !first.resources[0].version.isEmpty)
                let secret = try EnvoySecret(unpackingAny: first.resources[0].resource)
                #expect(!secret.tlsCertificate.certificateChain.inlineBytes.isEmpty)

                var ack = Envoy_Service_Discovery_V3_DeltaDiscoveryRequest()
                ack.responseNonce = first.nonce
                continuation.yield(ack)
                var more = Envoy_Service_Discovery_V3_DeltaDiscoveryRequest()
                more.responseNonce = first.nonce
                more.resourceNamesSubscribe = ["ROOTCA"]
                continuation.yield(more)
                let second = try #require(try await responses.next())
                #expect(second.resources.map(\.name) == ["ROOTCA"] && second.nonce == "2", "the ACK is not answered")
            }
        }
    }


    // MARK: Limits and hostile input

    @Test func aStreamOverTheLimitGetsResourceExhaustedAndTheOthersAreServed() async throws {
        let metrics = TestMetrics()
        let limits = StreamLimits(maxStreams: 2, firstRequestTimeout: .seconds(10))
        let tokens = self.tokens
        try await withClient(metrics: metrics, limits: limits) { client, _ in
            try await SDSTestClient.withStream(client, metadata: SDSTestClient.metadata(token: tokens.token(serviceAccount: "a"))) { a in
                a.send(SDSTestClient.request(["default"]))
                _ = try #require(try await a.next())
                try await SDSTestClient.withStream(client, metadata: SDSTestClient.metadata(token: tokens.token(serviceAccount: "b"))) { b in
                    b.send(SDSTestClient.request(["default"]))
                    _ = try #require(try await b.next())
                    await #expect {
                        try await SDSTestClient.withStream(client, metadata: SDSTestClient.metadata(token: tokens.token(serviceAccount: "c"))) {
                            c in
                            c.send(SDSTestClient.request(["default"]))
                            _ = try await c.next()
                        }
                    } throws: { error in
                        (error as? RPCError)?.code == .resourceExhausted
                            && (error as? RPCError)?.message.contains("maximum of 2 open streams") == true
                    }
                    // FetchSecrets holds no stream slot: still served at the limit.
                    let fetched = try await client.fetchSecrets(
                        SDSTestClient.request(["default"]), metadata: SDSTestClient.metadata(token: tokens.token(serviceAccount: "d")))
                    #expect(fetched.resources.count == 1)
                }
            }
            // The slots are given back when streams end.
            try await SDSTestClient.withStream(client, metadata: SDSTestClient.metadata(token: tokens.token(serviceAccount: "e"))) { e in
                e.send(SDSTestClient.request(["default"]))
                _ = try #require(try await e.next())
            }
        }
        let refused = try metrics.expectCounter(
            SecretDiscoveryService.refusedCallsMetric, [("code", "resource_exhausted"), ("reason", "stream_limit")])
        #expect(refused.totalValue == 1)
    }

    /// One identity holding its maximum must not lock anyone else out (it could take every
    /// stream of the agent before): the next stream of that caller is refused, another
    /// identity's first secret still arrives, and a pod is its own caller.
    @Test func oneCallerAtItsMaximumLeavesRoomForEveryoneElse() async throws {
        let metrics = TestMetrics()
        let limits = StreamLimits(maxStreams: 10, maxStreamsPerCaller: 2, firstRequestTimeout: .seconds(10))
        let tokens = self.tokens
        try await withClient(metrics: metrics, limits: limits) { client, _ in
            let greedy = SDSTestClient.metadata(token: tokens.token(serviceAccount: "greedy"))
            try await SDSTestClient.withStream(client, metadata: greedy) { first in
                first.send(SDSTestClient.request(["default"]))
                _ = try #require(try await first.next())
                try await SDSTestClient.withStream(client, metadata: greedy) { second in
                    second.send(SDSTestClient.request(["ROOTCA"]))
                    _ = try #require(try await second.next())
                    await #expect {
                        try await SDSTestClient.withStream(client, metadata: greedy) { third in
                            third.send(SDSTestClient.request(["default"]))
                            _ = try await third.next()
                        }
                    } throws: { error in
                        (error as? RPCError)?.code == .resourceExhausted
                            && (error as? RPCError)?.message.contains("this caller holds its maximum of 2") == true
                    }
                    // Another identity: served at once.
                    try await SDSTestClient.withStream(client, metadata: SDSTestClient.metadata(token: tokens.token(serviceAccount: "other"))) {
                        other in
                        other.send(SDSTestClient.request(["default"]))
                        let secret = try #require(try await other.next())
                        #expect(secret.resources.count == 1)
                    }
                    // The same service account from another pod (bound token): its own share.
                    let pod = SDSTestClient.metadata(token: tokens.token(serviceAccount: "greedy", podUID: "uid-2"))
                    try await SDSTestClient.withStream(client, metadata: pod) { replica in
                        replica.send(SDSTestClient.request(["default"]))
                        _ = try #require(try await replica.next())
                    }
                }
            }
        }
        let refused = try metrics.expectCounter(
            SecretDiscoveryService.refusedCallsMetric, [("code", "resource_exhausted"), ("reason", "caller_stream_limit")])
        #expect(refused.totalValue == 1)
    }

    @Test func statusMessagesEscapeWhatTheCallerSent() async throws {
        let forged = "x\n2026-11-30T03:00:00+0000 critical sds-agent: forged\r\0"
        let badKid = tokens.sign(
            claims: TokenFactory.claims(namespace: "demo", serviceAccount: "frontend", now: Date()), header: ["alg": "ES256", "kid": forged])
        let badAlg = tokens.sign(
            claims: TokenFactory.claims(namespace: "demo", serviceAccount: "frontend", now: Date()), header: ["alg": forged, "kid": tokens.kid])
        var badName = SDSTestClient.request([forged + String(repeating: "A", count: 65536)])
        badName.typeURL = SDSTestClient.secretTypeURL
        var badType = SDSTestClient.request(["default"])
        badType.typeURL = forged
        let good = SDSTestClient.metadata(token: tokens.token())
        let calls: [(DiscoveryRequest, Metadata)] = [
            (SDSTestClient.request(["default"]), SDSTestClient.metadata(token: badKid)),
            (SDSTestClient.request(["default"]), SDSTestClient.metadata(token: badAlg)),
            (badName, good), (badType, good),
        ]
        try await withClient { client, _ in
            for (request, metadata) in calls {
                do {
                    _ = try await client.fetchSecrets(request, metadata: metadata)
                    Issue.record("a hostile request was answered")
                } catch let error as RPCError {
                    #expect(!error.message.contains("\n") && !error.message.contains("\r") && !error.message.contains("\0"))
                    #expect(error.message.count <= 1100)
                    #expect(error.message.contains("x\\n2026") || error.message.contains("…(+"))
                }
            }
        }
    }
}

@Suite struct FirstRequestDeadlineTests {
    typealias Event = StreamEvent<Int>

    func drain(_ events: [Event]) async throws -> [String] {
        var seen: [String] = []
        let base = AsyncStream<Event> { continuation in
            for event in events { continuation.yield(event) }
            continuation.finish()
        }
        for try await event in FirstRequestDeadline(base: base, timeout: .seconds(10)) {
            seen.append("\(event)")
        }
        return seen
    }

    @Test func endsAStreamWhoseFirstRequestDidNotComeInTime() async {
        await #expect {
            _ = try await drain([.updated, .firstRequestDue, .request(1)])
        } throws: { error in
            (error as? RPCError)?.code == .deadlineExceeded
        }
    }

    @Test func ignoresTheDeadlineOnceARequestCame() async throws {
        #expect(try await drain([.request(1), .firstRequestDue, .updated]) == ["request(1)", "updated"])
    }
}

/// The per-stream event source: one reader task with back-pressure, change signals and deadlines
/// without tasks of their own, a fixed order, and nothing left behind after `finish()`.
@Suite(.timeLimit(.minutes(1))) struct StreamEventSourceTests {
    /// A source whose changes the test signals by hand, and which counts live watches.
    final class Signals: SecretSource, Sendable {
        let usesCallerCredential = false
        let signals = Mutex<[Int: @Sendable () -> Void]>([:])
        func workloadSecret(for identity: SPIFFEID, credential: CallerCredential?) async throws(SecretError) -> WorkloadSecret {
            throw SecretError(.unavailable, message: "not used")
        }
        func trustBundle() async -> TrustBundle { TrustBundle(trustDomain: "cluster.local", rootsPEM: "", version: "") }
        func updates(for identity: SPIFFEID) -> AsyncStream<Void> { AsyncStream { $0.finish() } }
        func watch(_ identity: SPIFFEID, signal: @escaping @Sendable () -> Void) -> SecretWatch {
            let id = signals.withLock { signals in
                let id = (signals.keys.max() ?? 0) + 1
                signals[id] = signal
                return id
            }
            return SecretWatch { [self] in _ = signals.withLock { $0.removeValue(forKey: id) } }
        }
        func fire() { for signal in signals.withLock({ Array($0.values) }) { signal() } }
        var watching: Int { signals.withLock { $0.count } }
    }

    let identity = try! SPIFFEID(trustDomain: "cluster.local", namespace: "demo", serviceAccount: "frontend")

    @Test func readsARequestOnlyWhenTheStreamIsReadyAndKeepsItsOrder() async throws {
        let pulled = Atomic<Int>(0)
        let (requests, sink) = AsyncThrowingStream.makeStream(of: Int.self, throwing: (any Error).self)
        for i in 1...5 { sink.yield(i) }
        sink.finish()
        let counted = requests.map { value -> Int in
            pulled.add(1, ordering: .relaxed)
            return value
        }
        let signals = Signals()
        let source = StreamEventSource(
            requests: RPCAsyncSequence(wrapping: counted), secrets: signals, identity: identity,
            firstRequestTimeout: .seconds(60), credentialExpiresIn: .seconds(60))
        var iterator = source.makeAsyncIterator()
        var seen: [String] = []
        var taken = 0
        while let event = try await iterator.next() {
            seen.append("\(event)")
            if case .request = event { taken += 1 }
            // Back-pressure: at most the request being handed over is read ahead.
            #expect(pulled.load(ordering: .relaxed) <= taken + 1)
            if taken == 2 && !seen.contains("updated") { signals.fire() }
            if case .requestsEnded = event { break }
        }
        // Requests in order, the change once (after the second request: a pending request goes first),
        // the end last.
        #expect(seen.filter { $0 != "updated" } == ["request(1)", "request(2)", "request(3)", "request(4)", "request(5)", "requestsEnded"])
        #expect(seen.filter { $0 == "updated" }.count == 1 && seen.firstIndex(of: "updated")! > 1)
        source.finish()
        #expect(signals.watching == 0)
    }

    @Test func deliversTheDeadlinesWhenTheyFallDueAndEndsWhenFinished() async throws {
        // The requests stay open (a dropped continuation would end them).
        let (requests, open) = AsyncThrowingStream.makeStream(of: Int.self, throwing: (any Error).self)
        defer { open.finish() }
        let signals = Signals()
        let clock = ManualClock()
        let source = StreamEventSource(
            requests: RPCAsyncSequence(wrapping: requests), secrets: signals, identity: identity,
            firstRequestTimeout: .seconds(10), credentialExpiresIn: .seconds(3600), deadlines: clock)
        #expect(clock.scheduled == 2)
        // Not yet due: a change is all there is to deliver.
        clock.advance(by: .seconds(9))
        signals.fire()
        #expect(try await Self.next(source) == "updated")
        clock.advance(by: .seconds(1))
        #expect(try await Self.next(source) == "firstRequestDue")
        // The token's deadline, while the stream waits for it.
        async let expiring = Self.next(source)
        clock.advance(by: .seconds(3590))
        #expect(try await expiring == "credentialExpiring")
        #expect(signals.watching == 1)
        // A stream waiting for its next event gets nil once the source is finished.
        async let next = Self.next(source)
        source.finish()
        #expect(try await next == nil)
        #expect(signals.watching == 0)
    }

    static func next(_ source: StreamEventSource<Int>) async throws -> String? {
        var iterator = source.makeAsyncIterator()
        return try await iterator.next().map { "\($0)" }
    }

    @Test func finishingCancelsTheDeadlines() {
        let (requests, open) = AsyncThrowingStream.makeStream(of: Int.self, throwing: (any Error).self)
        defer { open.finish() }
        let clock = ManualClock()
        let source = StreamEventSource(
            requests: RPCAsyncSequence(wrapping: requests), secrets: Signals(), identity: identity,
            firstRequestTimeout: .seconds(10), credentialExpiresIn: .seconds(3600), deadlines: clock)
        #expect(clock.scheduled == 2)
        source.finish()
        #expect(clock.scheduled == 0)
    }

    @Test func dispatchDeadlinesFireOnceAndNotWhenCancelled() async {
        let fired = Atomic<Int>(0)
        let (done, signal) = AsyncStream.makeStream(of: Void.self)
        // Cancelled at once, due well before the other fires: had it run, the count would show it.
        let cancelled = DispatchDeadlines().schedule(after: .milliseconds(100)) { fired.add(100, ordering: .relaxed) }
        cancelled.cancel()
        _ = DispatchDeadlines().schedule(after: .milliseconds(200)) {
            fired.add(1, ordering: .relaxed)
            signal.finish()
        }
        for await _ in done {}
        #expect(fired.load(ordering: .relaxed) == 1)
    }

    @Test func aWaitingStreamIsCancelled() async throws {
        let (requests, open) = AsyncThrowingStream.makeStream(of: Int.self, throwing: (any Error).self)
        defer { open.finish() }
        let source = StreamEventSource(
            requests: RPCAsyncSequence(wrapping: requests), secrets: Signals(), identity: identity,
            firstRequestTimeout: .seconds(60), credentialExpiresIn: .seconds(60))
        let waiting = Task {
            var iterator = source.makeAsyncIterator()
            return try await iterator.next()
        }
        waiting.cancel()
        await #expect(throws: CancellationError.self) { _ = try await waiting.value }
        source.finish()
    }
}
