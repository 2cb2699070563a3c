import CentralCA
import CertificateAuthority
import Crypto
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import IstioAPI
import MetricsTestKit
import SDSModel
import SecretCache
import Synchronization
import TestSupport
import Testing
import UpstreamCA
import WorkloadAuthentication
import X509

/// The upstream CA client against the central CA's service, over real gRPC, TLS and TCP on
/// loopback; and the client's checks of what a CA answers.
@Suite(.timeLimit(.minutes(1))) struct UpstreamCATests {
    let tokens = TokenFactory()

    /// Records what nodes may act for whom.
    struct Nodes: NodeAuthorizer {
        let allowed: Set<String>
        func authorize(caller: AuthenticatedCaller, toActAs namespace: String, _ serviceAccount: String)
            async throws(NodeAuthorizationError)
        {
            guard allowed.contains("\(namespace)/\(serviceAccount)") else {
                throw NodeAuthorizationError("no pod of \(namespace)/\(serviceAccount) runs on node test")
            }
        }
    }

    final class Changes: Sendable {
        let seen = Mutex<[IssuerChange]>([])
        func record(_ change: IssuerChange) { seen.withLock { $0.append(change) } }
        var count: Int { seen.withLock { $0.count } }
    }

    /// Serves `ca` on 127.0.0.1 with a TLS certificate it issues, and runs `body` with an upstream
    /// client pointed at it.
    func withCentralCA<Result: Sendable>(
        ca: EmbeddedCA = TestPKI.ca(), mode: UpstreamCA.CredentialMode = .forward, tokenFile: String? = nil,
        trusted: Set<String> = [], maxTTL: Duration = .seconds(7200), changes: Changes = Changes(),
        servingNames: [String] = ["127.0.0.1"], serverName: String? = nil, clientRoots: [Certificate]? = nil,
        _ body: @Sendable @escaping (UpstreamCA) async throws -> Result
    ) async throws -> Result {
        let keys = try await VerificationKeySet(jwksJSON: tokens.jwksJSON())
        let authenticator = KubernetesTokenVerifier(
            configuration: .init(trustDomain: "cluster.local", issuers: [TokenFactory.issuer], audiences: [TokenFactory.audience]),
            keys: keys)
        let service = IstioCertificateService(
            configuration: .init(
                trustDomain: "cluster.local", defaultTTL: .seconds(3600), maxTTL: maxTTL, trustedNodeAccounts: trusted),
            authenticator: authenticator, ca: ca, nodes: Nodes(allowed: ["demo/backend"]), logger: TestPKI.quietLogger)
        let (chain, key) = try ca.activeAuthority.issueServingCertificate(names: servingNames, ttl: .seconds(3600), now: Date())
        let transport = HTTP2ServerTransport.Posix(
            address: .ipv4(host: "127.0.0.1", port: 0),
            transportSecurity: .tls(
                certificateChain: try chain.map { .bytes(Array(try $0.serializeAsPEM().pemString.utf8), format: .pem) },
                privateKey: .bytes(Array(try key.serializeAsPEM().pemString.utf8), format: .pem)))
        let directory = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let bundle = directory + "/root.pem"
        try (clientRoots ?? ca.roots).map { try $0.serializeAsPEM().pemString }.joined(separator: "\n").write(toFile: bundle, atomically: true, encoding: .utf8)

        return try await withGRPCServer(transport: transport, services: [service]) { _ in
            let address = try #require(try await transport.listeningAddress.ipv4)
            let upstream = try UpstreamCA(
                configuration: .init(
                    host: "127.0.0.1", port: address.port, serverBundleFile: bundle, serverName: serverName, credentialMode: mode, tokenFile: tokenFile,
                    trustDomain: "cluster.local", issueDeadline: .seconds(3), bundleCacheFile: directory + "/kept.pem"),
                logger: TestPKI.quietLogger, onChange: changes.record)
            return try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await upstream.run() }
                defer {
                    upstream.shutdown()
                    group.cancelAll()
                }
                return try await body(upstream)
            }
        }
    }

    func credential(_ serviceAccount: String = "frontend") -> CallerCredential {
        CallerCredential(token: tokens.token(serviceAccount: serviceAccount), expiry: Date().addingTimeInterval(3600))
    }

    @Test func aCacheOnTheUpstreamCAServesTheCallersIdentityAndLearnsTheRoots() async throws {
        let ca = TestPKI.ca()
        let changes = Changes()
        try await withCentralCA(ca: ca, changes: changes) { upstream in
            let cache = SecretCache(issuer: upstream, configuration: .init(certificateTTL: .seconds(600)), logger: TestPKI.quietLogger)
            let identity = TestPKI.identity("demo", "frontend")
            let secret = try await cache.workloadSecret(for: identity, credential: credential())
            let leaf = try Certificate(pemEncoded: secret.certificateChainPEM)
            #expect(try leaf.extensions.subjectAlternativeNames.map(Array.init) == [.uniformResourceIdentifier(identity.description)])
            #expect(leaf.notValidAfter.timeIntervalSince(leaf.notValidBefore) <= 661, "the TTL asked for")
            let bundle = await cache.trustBundle()
            #expect(bundle.rootsPEM == (await ca.trustBundle()).rootsPEM)
            #expect(changes.count == 1, "the first roots are a bundle change")
            #expect(upstream.isReachable == true)
        }
    }

    @Test func theCallersTokenDecidesTheIdentityAndRefusalsAreRefusals() async throws {
        try await withCentralCA { upstream in
            let key = P256.Signing.PrivateKey()
            let asked = TestPKI.identity("demo", "backend")
            let csr = try SecretCache.makeCSR(for: asked, key: key)
            // The frontend's token asking for the backend's identity: the CA signs the frontend,
            // and the client refuses an answer that is not what it asked for.
            do throws(IssuanceError) {
                _ = try await upstream.issue(csr: csr, for: asked, ttl: .seconds(600), credential: credential("frontend"))
                Issue.record("accepted a certificate for another identity")
            } catch {
                #expect(error.code == .verificationFailed)
            }
            // A forged token: the CA refuses, and the refusal is not transient.
            let forged = CallerCredential(token: TokenFactory().token(), expiry: Date().addingTimeInterval(3600))
            do throws(IssuanceError) {
                _ = try await upstream.issue(csr: csr, for: asked, ttl: .seconds(600), credential: forged)
                Issue.record("a forged token was accepted")
            } catch {
                #expect(error.code == .callerRefused && error.code.isRefusal && !error.code.isTransient)
            }
            // No token to forward: unavailable at once (the next stream brings one), no CA call.
            do throws(IssuanceError) {
                _ = try await upstream.issue(csr: csr, for: asked, ttl: .seconds(600), credential: nil)
                Issue.record("issued without a token")
            } catch {
                #expect(error.code == .unavailable)
            }
        }
    }

    @Test func nodeModeImpersonatesOnlyWhatTheCATrustsTheNodeFor() async throws {
        let directory = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tokenFile = directory + "/agent.token"
        try tokens.token(namespace: "sds-system", serviceAccount: "sds-agent").write(toFile: tokenFile, atomically: true, encoding: .utf8)
        try await withCentralCA(mode: .node, tokenFile: tokenFile, trusted: ["sds-system/sds-agent"]) { upstream in
            let cache = SecretCache(issuer: upstream, configuration: .init(certificateTTL: .seconds(600)), logger: TestPKI.quietLogger)
            let backend = try await cache.workloadSecret(for: TestPKI.identity("demo", "backend"), credential: nil)
            #expect(backend.spiffeID == TestPKI.identity("demo", "backend"))
            do throws(SecretError) {
                _ = try await cache.workloadSecret(for: TestPKI.identity("demo", "stranger"), credential: nil)
                Issue.record("a node got an identity with no pod on it")
            } catch {
                #expect(error.code == .refused)
            }
        }
    }

    @Test func anUnreachableCAIsUnavailableWithinTheDeadline() async throws {
        let directory = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let bundle = directory + "/root.pem"
        try TestPKI.authority().certificate.serializeAsPEM().pemString.write(toFile: bundle, atomically: true, encoding: .utf8)
        // A port nothing listens on (bound, then closed).
        let upstream = try UpstreamCA(
            configuration: .init(
                host: "127.0.0.1", port: 9, serverBundleFile: bundle, trustDomain: "cluster.local",
                callTimeout: .milliseconds(500), issueDeadline: .seconds(2)),
            logger: TestPKI.quietLogger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await upstream.run() }
            let started = ContinuousClock.now
            let identity = TestPKI.identity()
            let csr = try SecretCache.makeCSR(for: identity, key: P256.Signing.PrivateKey())
            do throws(IssuanceError) {
                _ = try await upstream.issue(csr: csr, for: identity, ttl: .seconds(600), credential: credential())
                Issue.record("issued with no CA")
            } catch {
                #expect(error.code == .unavailable)
            }
            #expect(started.duration(to: .now) < .seconds(4))
            #expect(upstream.isReachable == false)
            // Before any answer the bundle is empty, after waiting at most the deadline.
            #expect(await upstream.trustBundle().isEmpty)
            upstream.shutdown()
            group.cancelAll()
        }
    }

    /// swift-nio-ssl alone accepted any SAN, the dialled IP included: a configured name must be
    /// the only reference identity, and a refusal says why in words.
    @Test func theConfiguredServerNameIsTheOnlyIdentityAccepted() async throws {
        let identity = TestPKI.identity()
        let csr = try SecretCache.makeCSR(for: identity, key: P256.Signing.PrivateKey())
        // The CA's certificate names the address it is dialled at, but not the configured name.
        try await withCentralCA(servingNames: ["127.0.0.1"], serverName: "wrong.example") { upstream in
            do throws(IssuanceError) {
                _ = try await upstream.issue(csr: csr, for: identity, ttl: .seconds(600), credential: credential())
                Issue.record("connected to a CA whose certificate does not name wrong.example")
            } catch {
                #expect(error.code == .unavailable)
                #expect(error.message.contains("name does not match") && error.message.contains("wrong.example"), "\(error.message)")
            }
        }
        // The same certificate with the name in it: accepted.
        try await withCentralCA(servingNames: ["127.0.0.1", "ca.example"], serverName: "ca.example") { upstream in
            _ = try await upstream.issue(csr: csr, for: identity, ttl: .seconds(600), credential: credential())
        }
        // No name configured: the dialled address is the identity, as before.
        try await withCentralCA(servingNames: ["127.0.0.1"]) { upstream in
            _ = try await upstream.issue(csr: csr, for: identity, ttl: .seconds(600), credential: credential())
        }
        // A bundle that does not hold the CA's root: "not trusted", not "unreachable".
        try await withCentralCA(clientRoots: [TestPKI.authority().certificate]) { upstream in
            do throws(IssuanceError) {
                _ = try await upstream.issue(csr: csr, for: identity, ttl: .seconds(600), credential: credential())
                Issue.record("trusted a CA outside --upstream-ca-bundle")
            } catch {
                #expect(error.code == .unavailable)
                #expect(error.message.contains("certificate not trusted"), "\(error.message)")
            }
        }
    }

    // MARK: - What a CA answers

    /// A leaf for `identity` and `key`, signed by `issuer`, with the extensions a careless or
    /// hostile CA might give it.
    func leaf(
        for identity: SPIFFEID, key: P256.Signing.PrivateKey, issuer: SigningAuthority, notAfter: Date? = nil,
        @ExtensionsBuilder extensions: () throws -> Result<Certificate.Extensions, any Error>
    ) throws -> Certificate {
        var all = try Certificate.Extensions(builder: extensions)
        try all.append(Critical(SubjectAlternativeNames([.uniformResourceIdentifier(identity.description)])).makeCertificateExtension())
        return try Certificate(
            version: .v3, serialNumber: CertificateProfile.serialNumber(), publicKey: Certificate.PublicKey(key.publicKey),
            notValidBefore: Date().addingTimeInterval(-60), notValidAfter: notAfter ?? Date().addingTimeInterval(600),
            issuer: issuer.certificate.subject, subject: DistinguishedName(), extensions: all, issuerPrivateKey: issuer.privateKey)
    }

    func answer(_ certificates: [[Certificate]]) throws -> [String] {
        try certificates.map { try $0.map { try $0.serializeAsPEM().pemString + "\n" }.joined() }
    }

    @Test func answersThatAreNotTheChainAskedForAreRefused() async throws {
        let directory = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let root = TestPKI.authority()
        let intermediate = TestPKI.intermediate(under: root)
        try root.certificate.serializeAsPEM().pemString.write(toFile: directory + "/b.pem", atomically: true, encoding: .utf8)
        let upstream = try UpstreamCA(
            configuration: .init(host: "127.0.0.1", port: 9, serverBundleFile: directory + "/b.pem", trustDomain: "cluster.local"),
            logger: TestPKI.quietLogger)
        let identity = TestPKI.identity("demo", "frontend")
        let key = P256.Signing.PrivateKey()
        let ca = EmbeddedCA(authority: intermediate, trustDomain: "cluster.local", logger: TestPKI.quietLogger)
        let chain = try await ca.issue(csr: try SecretCache.makeCSR(for: identity, key: key), for: identity, ttl: .seconds(600))
        let publicKey = Certificate.PublicKey(key.publicKey)

        // The good answer: leaf, intermediate, root.
        let good = try await upstream.verify(answer: try answer([[chain[0]], [intermediate.certificate], [root.certificate]]), for: identity, key: publicKey)
        #expect(good.chain == [chain[0], intermediate.certificate] && good.roots == [root.certificate])
        // Several PEM blocks in one element are read too (istiod's root bundle).
        let bundled = try await upstream.verify(answer: try answer([[chain[0], intermediate.certificate], [root.certificate, TestPKI.authority().certificate]]), for: identity, key: publicKey)
        #expect(bundled.roots.count == 2)

        let other = TestPKI.authority()
        let refused: [(String, [String], SPIFFEID, Certificate.PublicKey)] = [
            ("a chain of one", try answer([[chain[0]]]), identity, publicKey),
            ("another identity", try answer([[chain[0]], [intermediate.certificate], [root.certificate]]), TestPKI.identity("demo", "backend"), publicKey),
            ("another key", try answer([[chain[0]], [intermediate.certificate], [root.certificate]]), identity, Certificate.PublicKey(P256.Signing.PrivateKey().publicKey)),
            ("another root", try answer([[chain[0]], [intermediate.certificate], [other.certificate]]), identity, publicKey),
            ("the intermediate missing", try answer([[chain[0]], [root.certificate]]), identity, publicKey),
            ("not PEM", ["garbage", "more garbage"], identity, publicKey),
        ]
        // The leaf profile, checked as strictly as our own CA's output (ztunnel's third line of
        // defence against a confused deputy).
        let badLeaves: [(String, Certificate)] = [
            ("a CA:TRUE leaf", try leaf(for: identity, key: key, issuer: intermediate) {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: nil))
                Critical(KeyUsage(digitalSignature: true, keyCertSign: true))
            }),
            ("a leaf that may sign certificates", try leaf(for: identity, key: key, issuer: intermediate) {
                Critical(KeyUsage(digitalSignature: true, keyCertSign: true))
            }),
            ("a leaf that may sign CRLs", try leaf(for: identity, key: key, issuer: intermediate) {
                Critical(KeyUsage(digitalSignature: true, cRLSign: true))
            }),
            ("a leaf for code signing", try leaf(for: identity, key: key, issuer: intermediate) {
                try ExtendedKeyUsage([.serverAuth, .clientAuth, .codeSigning])
            }),
            ("a leaf outliving its intermediate", try leaf(for: identity, key: key, issuer: intermediate, notAfter: intermediate.certificate.notValidAfter.addingTimeInterval(3600)) {
                Critical(KeyUsage(digitalSignature: true))
            }),
        ]
        for (what, bad) in badLeaves {
            let text = try answer([[bad], [intermediate.certificate], [root.certificate]])
            do throws(IssuanceError) {
                _ = try await upstream.verify(answer: text, for: identity, key: publicKey)
                Issue.record("accepted \(what)")
            } catch {
                #expect(error.code == .verificationFailed, "\(what)")
            }
        }
        // istiod's own profile (keyEncipherment on an EC key) is accepted from upstream.
        let istiodLike = try leaf(for: identity, key: key, issuer: intermediate) {
            Critical(KeyUsage(digitalSignature: true, keyEncipherment: true))
            try ExtendedKeyUsage([.serverAuth, .clientAuth])
            Critical(BasicConstraints.notCertificateAuthority)
        }
        _ = try await upstream.verify(answer: try answer([[istiodLike], [intermediate.certificate], [root.certificate]]), for: identity, key: publicKey)
        for (what, text, asked, key) in refused {
            do throws(IssuanceError) {
                _ = try await upstream.verify(answer: text, for: asked, key: key)
                Issue.record("accepted \(what)")
            } catch {
                #expect(error.code == .verificationFailed, "\(what)")
            }
        }
    }
}

/// `ca serve` answers a caller's bad CSR with a status message whose caller text is escaped.
@Suite struct CentralCAStatusTests {
    /// The agent's reachability probe was counted at the CA as a refused CSR
    /// (`refused_requests_total{reason="token"}`); a call with no token and no probe header still is.
    @Test func anAgentsProbeIsNotARefusedCSR() async throws {
        let metrics = TestMetrics()
        let service = IstioCertificateService(
            configuration: .init(trustDomain: "cluster.local", defaultTTL: .seconds(600), maxTTL: .seconds(600)),
            authenticator: KubernetesTokenVerifier(
                configuration: .init(trustDomain: "cluster.local", issuers: [TokenFactory.issuer], audiences: [TokenFactory.audience]),
                keys: try await VerificationKeySet(jwksJSON: TokenFactory().jwksJSON())),
            ca: TestPKI.ca(), nodes: nil, logger: TestPKI.quietLogger, metrics: metrics)
        func call(_ metadata: Metadata) async -> RPCError.Code? {
            do {
                _ = try await service.createCertificate(
                    request: ServerRequest(metadata: metadata, message: Istio_V1_Auth_IstioCertificateRequest()),
                    context: ServerContext(
                        descriptor: Istio_V1_Auth_IstioCertificateService.Method.CreateCertificate.descriptor,
                        remotePeer: "in-process:test", localPeer: "in-process:test", cancellation: .init()))
                return nil
            } catch let error as RPCError {
                return error.code
            } catch {
                return .unknown
            }
        }
        var probe = Metadata()
        probe.addString("1", forKey: IstioCertificateService.probeHeader)
        #expect(await call(probe) == .unauthenticated)
        let refused = try metrics.expectCounter("sds_agent_ca_refused_requests_total", [("reason", "token")])
        #expect(refused.totalValue == 0)
        #expect(await call(Metadata()) == .unauthenticated)
        #expect(refused.totalValue == 1)
    }

    @Test func aCSRLabelWithControlCharactersComesBackEscaped() async throws {
        let tokens = TokenFactory()
        let keys = try await VerificationKeySet(jwksJSON: tokens.jwksJSON())
        let service = IstioCertificateService(
            configuration: .init(trustDomain: "cluster.local", defaultTTL: .seconds(600), maxTTL: .seconds(600)),
            authenticator: KubernetesTokenVerifier(
                configuration: .init(trustDomain: "cluster.local", issuers: [TokenFactory.issuer], audiences: [TokenFactory.audience]),
                keys: keys),
            ca: TestPKI.ca(), nodes: nil, logger: TestPKI.quietLogger)
        var message = Istio_V1_Auth_IstioCertificateRequest()
        // A PEM label is echoed by the parser's error ("incorrect discriminator ..."): here it holds
        // a terminal escape and a bell.
        message.csr = "-----BEGIN EVIL\u{1B}[31mLABEL\u{7}-----\nAAAA\n-----END EVIL\u{1B}[31mLABEL\u{7}-----\n"
        var metadata = Metadata()
        metadata.addString("Bearer \(tokens.token())", forKey: "authorization")
        do {
            _ = try await service.createCertificate(
                request: ServerRequest(metadata: metadata, message: message),
                context: ServerContext(
                    descriptor: Istio_V1_Auth_IstioCertificateService.Method.CreateCertificate.descriptor,
                    remotePeer: "in-process:test", localPeer: "in-process:test", cancellation: .init()))
            Issue.record("accepted a broken CSR")
        } catch let error as RPCError {
            #expect(error.code == .invalidArgument)
            #expect(error.message.contains("incorrect discriminator EVIL"), "the label is quoted: \(error.message)")
            #expect(!error.message.contains("\u{1B}") && !error.message.contains("\u{7}"), "\(error.message)")
        }
    }
}
