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

    /// `--kube-api-server https://user:s3cret@…` was redacted in the configuration line but
    /// printed in clear in the OIDC discovery error line.
    @Test func credentialsInTheAPIServerURLReachNoErrorOrLogLine() async throws {
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try TestPKI.authority().certificate.pem().write(toFile: dir + "/ca.pem", atomically: true, encoding: .utf8)
        let api = try KubernetesAPIClient(
            configuration: .init(serverURL: "https://user:s3cret@127.0.0.1:9", caFile: dir + "/ca.pem", tokenFile: nil, timeout: .seconds(2)))
        #expect(api.configuration.displayURL == "https://REDACTED@127.0.0.1:9")
        do throws(KubernetesAPIError) {
            _ = try await api.get("/.well-known/openid-configuration")
            Issue.record("nothing listens on port 9")
        } catch {
            #expect(error.message.contains("REDACTED@127.0.0.1:9") && !error.message.contains("s3cret"), "\(error.message)")
        }
        await api.shutdown()
        #expect(URLText.redactingUserinfo("https://a:b@h/x@y") == "https://REDACTED@h/x@y")
        #expect(URLText.redactingUserinfo("https://h/x@y") == "https://h/x@y")
    }

    /// A refresh that hangs at the API server: a token with an unknown `kid` waits about
    /// ``OIDCDiscoveryKeySource/unknownKeyWait``, not the fetch timeout, and cancelling the
    /// refresh loop (shutdown) ends it at once.
    @Test func aHangingRefreshHoldsNeitherCallersNorShutdown() async throws {
        let hanging = try HangingListener()
        let dir = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.agentToken.write(toFile: dir + "/token", atomically: true, encoding: .utf8)
        try TestPKI.authority().certificate.pem().write(toFile: dir + "/ca.pem", atomically: true, encoding: .utf8)
        let api = try KubernetesAPIClient(
            configuration: .init(serverURL: "https://127.0.0.1:\(hanging.port)", caFile: dir + "/ca.pem", tokenFile: dir + "/token", timeout: .seconds(6)))
        let source = OIDCDiscoveryKeySource(api: api, minimumRefreshInterval: .zero, logger: TestPKI.quietLogger)

        let asked = ContinuousClock.now
        #expect(await source.keys(afterUnknownKeyID: "k9") == nil)
        #expect(asked.duration(to: .now) < OIDCDiscoveryKeySource.unknownKeyWait + .seconds(2), "held for the fetch timeout")

        // The refresh loop of a fresh source, its first fetch hanging; then shutdown.
        let looping = OIDCDiscoveryKeySource(api: api, minimumRefreshInterval: .zero, logger: TestPKI.quietLogger)
        let started = ContinuousClock.now
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await looping.run() }
            let deadline = ContinuousClock.now + .seconds(5)
            while await looping.fetchAttempts < 1, ContinuousClock.now < deadline { await Task.yield() }
            #expect(await looping.fetchAttempts == 1)
            group.cancelAll()
        }
        #expect(started.duration(to: .now) < .seconds(8), "shutdown waited for the hanging fetch")
        await api.shutdown()
    }

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

    /// The refresh loop on a test clock: it retries after 1 s while the API server is down at
    /// start, then refreshes once per interval, and never sooner; no real wait.
    @Test(.timeLimit(.minutes(1))) func theRefreshLoopRetriesThenKeepsItsIntervalOnItsClock() async throws {
        let discovery = Discovery([k1])
        discovery.failing.withLock { $0 = true }
        try await withAPI(discovery.answer) { _, api in
            let clock = TestClock()
            let source = OIDCDiscoveryKeySource(
                api: api, refreshInterval: .seconds(3600), minimumRefreshInterval: .seconds(30), clock: clock, logger: TestPKI.quietLogger)
            let loop = Task { await source.run() }
            defer { loop.cancel() }
            #expect(await clock.sleeping(within: .seconds(20)))
            #expect(await source.fetchAttempts == 1 && !source.hasKeys)

            discovery.failing.withLock { $0 = false }
            clock.advance(by: .seconds(1))  // the first retry, 1 s after a failure at start
            #expect(await clock.sleeping(within: .seconds(20)))
            #expect(await source.fetchAttempts == 2 && source.hasKeys)

            clock.advance(by: .seconds(3599))
            #expect(await clock.sleeping(within: .seconds(20)))
            #expect(await source.fetchAttempts == 2, "refreshed before its interval")
            clock.advance(by: .seconds(1))
            #expect(await clock.sleeping(within: .seconds(20)))
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

/// A TCP port that accepts connections (the kernel's backlog) and never answers: an API server
/// that hangs mid-handshake.
final class HangingListener {
    let fd: Int32
    let port: Int
    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                bind(fd, pointer, length) == 0 && listen(fd, 16) == 0 && getsockname(fd, pointer, &length) == 0
            }
        }
        guard bound else {
            close(fd)
            throw POSIXError(.EADDRNOTAVAIL)
        }
        self.fd = fd
        port = Int(UInt16(bigEndian: address.sin_port))
    }
    deinit { close(fd) }
}
