import Foundation
import KubernetesAPI
import SDSModel
import Synchronization
import TestSupport
import Testing
import WorkloadAuthentication

/// OIDC discovery and TokenReview against ``FakeAPIServer``: a local HTTPS server answering like
/// the Kubernetes API server (there is none on these machines). The client is the agent's real
/// one: real TLS against the server's own CA, the agent's bearer token, the real JSON shapes.
@Suite(.timeLimit(.minutes(1))) struct KubernetesAPIVerifierTests {
    static let agentToken = "agent-service-account-token"
    let k1 = TokenFactory(kid: "k1")
    let k2 = TokenFactory(kid: "k2")

    /// Runs `body` with a fake API server and a client configured for it; stops both after.
    func withAPI<Result>(
        _ handler: @escaping FakeAPIServer.Handler, _ body: (FakeAPIServer, KubernetesAPIClient) async throws -> Result
    ) async throws -> Result {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.agentToken.write(toFile: dir + "/token", atomically: true, encoding: .utf8)
        let server = try await FakeAPIServer(directory: dir, handler: handler)
        let client = try KubernetesAPIClient(configuration: .init(serverURL: server.url, caFile: server.caFile, tokenFile: dir + "/token"))
        do {
            let result = try await body(server, client)
            await client.shutdown()
            await server.stop()
            return result
        } catch {
            await client.shutdown()
            await server.stop()
            throw error
        }
    }

    /// What the fake serves for OIDC discovery: the key set can change, and the server can fail.
    final class Discovery: Sendable {
        let keys: Mutex<[TokenFactory]>
        let failing = Mutex(false)
        init(_ keys: [TokenFactory]) { self.keys = Mutex(keys) }

        func answer(_ request: FakeAPIServer.Request) -> FakeAPIServer.Response {
            guard request.authorization == "Bearer \(KubernetesAPIVerifierTests.agentToken)" else {
                return .json(["kind": "Status", "code": 401], status: 401)
            }
            if failing.withLock({ $0 }) { return .json(["kind": "Status", "code": 503], status: 503) }
            switch request.path {
            case "/.well-known/openid-configuration":
                return .json([
                    "issuer": TokenFactory.issuer, "jwks_uri": "https://172.18.0.2:6443/openid/v1/jwks",
                    "id_token_signing_alg_values_supported": ["ES256"],
                ])
            case "/openid/v1/jwks":
                let keys = self.keys.withLock { $0 }
                return FakeAPIServer.Response(body: keys[0].jwksJSON(including: Array(keys.dropFirst())))
            default:
                return .json(["kind": "Status", "code": 404], status: 404)
            }
        }
    }

    func verifier(_ source: any VerificationKeySource) -> KubernetesTokenVerifier {
        KubernetesTokenVerifier(
            configuration: .init(trustDomain: "cluster.local", issuers: [TokenFactory.issuer], audiences: [TokenFactory.audience]),
            keys: source)
    }

    func expectFailure(_ code: AuthenticationError.Code, _ call: () async throws(AuthenticationError) -> AuthenticatedCaller,
                       sourceLocation: SourceLocation = #_sourceLocation) async -> AuthenticationError? {
        do {
            let caller = try await call()
            Issue.record("accepted as \(caller.spiffeID)", sourceLocation: sourceLocation)
            return nil
        } catch {
            #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
            return error
        }
    }

    // MARK: OIDC discovery

    @Test func discoveryFetchesTheKeysWithTheAgentsTokenAndFollowsAKeyRotation() async throws {
        let discovery = Discovery([k1])
        try await withAPI(discovery.answer) { server, api in
            let source = OIDCDiscoveryKeySource(api: api, minimumRefreshInterval: .zero, logger: TestPKI.quietLogger)
            let verifier = verifier(source)
            _ = try await verifier.authenticate(token: k1.token())
            #expect(await source.fetchAttempts == 1)
            #expect(await source.discoveredIssuer == TokenFactory.issuer)
            // The jwks_uri's path is fetched from the API server itself, with the agent's token.
            #expect(server.requests.map(\.path) == ["/.well-known/openid-configuration", "/openid/v1/jwks"])
            #expect(server.requests.allSatisfy { $0.authorization == "Bearer \(Self.agentToken)" })

            // The API server starts signing with a new key: its kid is unknown, so the keys are
            // fetched again, and the token verifies.
            discovery.keys.withLock { $0 = [k1, k2] }
            let caller = try await verifier.authenticate(token: k2.token(namespace: "ops", serviceAccount: "robot"))
            #expect(caller.spiffeID.description == "spiffe://cluster.local/ns/ops/sa/robot")
            #expect(await source.fetchAttempts == 2)
        }
    }

    @Test func unknownKeyIDsRefetchAtMostOncePerInterval() async throws {
        let discovery = Discovery([k1])
        try await withAPI(discovery.answer) { _, api in
            let source = OIDCDiscoveryKeySource(api: api, minimumRefreshInterval: .seconds(60), logger: TestPKI.quietLogger)
            let verifier = verifier(source)
            let stranger = TokenFactory(kid: "k9")
            for _ in 0..<5 {
                _ = await expectFailure(.unknownKey) { () async throws(AuthenticationError) in
                    try await verifier.authenticate(token: stranger.token())
                }
            }
            #expect(await source.fetchAttempts == 1, "a flood of unknown kids must not flood the API server")
        }
    }

    @Test func anAPIServerOutageAtStartIsTransientAndOneLaterKeepsTheCachedKeys() async throws {
        let discovery = Discovery([k1])
        discovery.failing.withLock { $0 = true }
        try await withAPI(discovery.answer) { _, api in
            let source = OIDCDiscoveryKeySource(api: api, minimumRefreshInterval: .zero, logger: TestPKI.quietLogger)
            let verifier = verifier(source)
            let token = k1.token()
            let error = await expectFailure(.keysUnavailable) { () async throws(AuthenticationError) in
                try await verifier.authenticate(token: token)
            }
            #expect(error?.code.isTransient == true)

            discovery.failing.withLock { $0 = false }
            _ = try await verifier.authenticate(token: token)

            discovery.failing.withLock { $0 = true }
            await source.refresh(reason: "schedule")
            _ = try await verifier.authenticate(token: token)
            #expect(await source.fetchAttempts == 3)
        }
    }

    @Test func theClientTrustsOnlyTheConfiguredCA() async throws {
        try await withAPI(Discovery([k1]).answer) { server, _ in
            let other = TestPKI.temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: other) }
            // Another server's CA: the handshake with this one must fail.
            let stranger = try await FakeAPIServer(directory: other) { _ in .json([:]) }
            await stranger.stop()
            let client = try KubernetesAPIClient(
                configuration: .init(serverURL: server.url, caFile: stranger.caFile, tokenFile: nil, timeout: .seconds(2)))
            do {
                _ = try await client.get("/.well-known/openid-configuration")
                Issue.record("talked to a server its CA did not sign")
            } catch let error as KubernetesAPIError {
                #expect(error.isTransient)
            }
            await client.shutdown()
            #expect(server.requests.isEmpty)
        }
    }

    // MARK: TokenReview

    static func reviewed(_ status: [String: Any]) -> FakeAPIServer.Response {
        .json(["apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status], status: 201)
    }

    static var frontendUser: [String: Any] { [
        "username": "system:serviceaccount:demo:frontend", "uid": "sa-uid-1",
        "groups": ["system:serviceaccounts", "system:serviceaccounts:demo", "system:authenticated"],
        "extra": [
            "authentication.kubernetes.io/pod-name": ["frontend-7d9f"],
            "authentication.kubernetes.io/pod-uid": ["6f1a2b3c-4d5e-4f60-8a9b-0c1d2e3f4a5b"],
        ],
    ] }

    func reviewer(_ api: KubernetesAPIClient, now: @escaping @Sendable () -> Date = { Date() }) -> TokenReviewAuthenticator {
        TokenReviewAuthenticator(configuration: .init(trustDomain: "cluster.local", audiences: ["sds-agent"]), api: api, now: now)
    }

    @Test func aPositiveReviewIsCachedUntilTheTokenExpires() async throws {
        let clock = ManualClock()
        try await withAPI({ _ in Self.reviewed(["authenticated": true, "user": Self.frontendUser, "audiences": ["sds-agent"]]) }) { server, api in
            let reviewer = reviewer(api, now: { clock.now })
            let token = k1.token(now: clock.now, ttl: 120)
            let caller = try await reviewer.authenticate(token: token)
            #expect(caller.spiffeID.description == "spiffe://cluster.local/ns/demo/sa/frontend")
            #expect(caller.podUID == "6f1a2b3c-4d5e-4f60-8a9b-0c1d2e3f4a5b" && caller.podName == "frontend-7d9f")
            #expect(caller.serviceAccountUID == "sa-uid-1")
            #expect(caller.credentialExpiry.timeIntervalSince1970 == Double(Int(clock.now.timeIntervalSince1970) + 120))
            _ = try await reviewer.authenticate(token: token)
            #expect(await reviewer.reviewsSent == 1)

            let sent = try #require(server.requests.first)
            #expect(sent.method == "POST" && sent.path == "/apis/authentication.k8s.io/v1/tokenreviews")
            #expect(sent.authorization == "Bearer \(Self.agentToken)")
            let body = try #require(try JSONSerialization.jsonObject(with: sent.body) as? [String: Any])
            #expect(body["kind"] as? String == "TokenReview" && body["apiVersion"] as? String == "authentication.k8s.io/v1")
            let spec = try #require(body["spec"] as? [String: Any])
            #expect(spec["token"] as? String == token && spec["audiences"] as? [String] == ["sds-agent"])

            // Past the token's expiry the cache no longer vouches for it: asked again, and refused.
            clock.advance(121)
            _ = await expectFailure(.expired) { () async throws(AuthenticationError) in try await reviewer.authenticate(token: token) }
            #expect(await reviewer.reviewsSent == 2)
        }
    }

    @Test func aNegativeReviewIsRefusedWithTheAPIServersReasonAndNotCached() async throws {
        try await withAPI({ _ in Self.reviewed(["authenticated": false, "error": "token has been invalidated"]) }) { _, api in
            let reviewer = reviewer(api)
            let token = k1.token()
            for _ in 0..<2 {
                let error = await expectFailure(.reviewRejected) { () async throws(AuthenticationError) in
                    try await reviewer.authenticate(token: token)
                }
                #expect(error?.message.contains("token has been invalidated") == true)
                #expect(error.map { !$0.message.contains(token) } == true)
            }
            #expect(await reviewer.reviewsSent == 2)
        }
    }

    @Test func aReviewForAnotherAudienceIsRefused() async throws {
        try await withAPI({ _ in Self.reviewed(["authenticated": true, "user": Self.frontendUser, "audiences": ["https://kubernetes.default.svc"]]) }) { _, api in
            _ = await expectFailure(.reviewRejected) { () async throws(AuthenticationError) in
                try await reviewer(api).authenticate(token: k1.token())
            }
        }
    }

    @Test func anAPIServerErrorIsTransientAndNeverCachedAsSuccess() async throws {
        let failing = Mutex(true)
        let handler: FakeAPIServer.Handler = { _ in
            failing.withLock { $0 }
                ? .json(["kind": "Status", "code": 500], status: 500)
                : Self.reviewed(["authenticated": true, "user": Self.frontendUser, "audiences": ["sds-agent"]])
        }
        try await withAPI(handler) { _, api in
            let reviewer = reviewer(api)
            let token = k1.token()
            let error = await expectFailure(.reviewUnavailable) { () async throws(AuthenticationError) in
                try await reviewer.authenticate(token: token)
            }
            #expect(error?.code.isTransient == true)
            failing.withLock { $0 = false }
            _ = try await reviewer.authenticate(token: token)
            #expect(await reviewer.reviewsSent == 2)
        }
    }

    @Test func garbageIsRefusedWithoutAskingTheAPIServer() async throws {
        try await withAPI({ _ in Self.reviewed(["authenticated": true, "user": Self.frontendUser, "audiences": ["sds-agent"]]) }) { server, api in
            let reviewer = reviewer(api)
            _ = await expectFailure(.malformedToken) { () async throws(AuthenticationError) in
                try await reviewer.authenticate(token: "not.a.jwt")
            }
            #expect(server.requests.isEmpty)
        }
    }

    @Test func combinedVerifiersMustAllAgree() async throws {
        // Local signature is good, but the API server has revoked the token (its pod is gone).
        try await withAPI({ _ in Self.reviewed(["authenticated": false, "error": "pod frontend-7d9f not found"]) }) { _, api in
            let local = KubernetesTokenVerifier(
                configuration: .init(trustDomain: "cluster.local", issuers: [TokenFactory.issuer], audiences: [TokenFactory.audience]),
                keys: try await VerificationKeySet(jwksJSON: k1.jwksJSON()))
            let combined = CombinedAuthenticator([local, reviewer(api)])
            _ = await expectFailure(.reviewRejected) { () async throws(AuthenticationError) in
                try await combined.authenticate(token: k1.token())
            }
        }
    }
}
