import Crypto
import Foundation
import SDSModel
import TestSupport
import Testing
import WorkloadAuthentication

@Suite struct KubernetesTokenVerifierTests {
    let signer = TokenFactory(kid: "k1")
    let now = Date(timeIntervalSince1970: 1_800_000_000)

    func verifier(
        keys: [TokenFactory]? = nil, skew: Duration = .seconds(30),
        _ configure: (inout KubernetesTokenVerifier.Configuration) -> Void = { _ in }
    ) async throws -> KubernetesTokenVerifier {
        let set = try await VerificationKeySet(jwksJSON: signer.jwksJSON(including: keys ?? []))
        let now = self.now
        var configuration = KubernetesTokenVerifier.Configuration(
            trustDomain: "cluster.local", issuers: [TokenFactory.issuer], audiences: [TokenFactory.audience], clockSkew: skew)
        configure(&configuration)
        return KubernetesTokenVerifier(configuration: configuration, keys: set, now: { now })
    }

    func claims(_ edit: (inout [String: Any]) -> Void = { _ in }) -> [String: Any] {
        var c = TokenFactory.claims(namespace: "demo", serviceAccount: "frontend", now: now)
        edit(&c)
        return c
    }

    func expectRejected(_ token: String, _ code: AuthenticationError.Code, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let verifier = try await verifier()
        do {
            let caller = try await verifier.authenticate(token: token)
            Issue.record("accepted a bad token as \(caller.spiffeID)", sourceLocation: sourceLocation)
        } catch {
            #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
            #expect(!error.message.contains(token), "the error must never echo the token", sourceLocation: sourceLocation)
        }
    }

    @Test func acceptsABoundTokenAndMapsItToTheSPIFFEID() async throws {
        let caller = try await verifier().authenticate(token: signer.sign(claims: claims()))
        #expect(caller.spiffeID.description == "spiffe://cluster.local/ns/demo/sa/frontend")
        #expect(caller.namespace == "demo" && caller.serviceAccount == "frontend")
        #expect(caller.podName == "frontend-abcde")
        #expect(caller.credentialExpiry == now.addingTimeInterval(3600))
        #expect(caller.keyID == "k1")
    }

    @Test func fallsBackToSubWithoutTheKubernetesClaim() async throws {
        let token = signer.sign(claims: claims { $0["kubernetes.io"] = nil; $0["sub"] = "system:serviceaccount:ops:robot" })
        let caller = try await verifier().authenticate(token: token)
        #expect(caller.spiffeID.description == "spiffe://cluster.local/ns/ops/sa/robot")
    }

    @Test func toleratesClockSkewWithinTheLimit() async throws {
        let token = signer.sign(claims: claims { $0["exp"] = Int(now.timeIntervalSince1970) - 10 })
        _ = try await verifier(skew: .seconds(30)).authenticate(token: token)
    }

    @Test func expired() async throws {
        try await expectRejected(signer.sign(claims: claims { $0["exp"] = Int(now.timeIntervalSince1970) - 31 }), .expired)
    }

    @Test func boundTokenWithoutExp() async throws {
        try await expectRejected(signer.sign(claims: claims { $0["exp"] = nil }), .expired)
    }

    /// The claims of a pre-1.24 secret-based token: no exp, no aud, flat claims.
    static var legacyClaims: [String: Any] { [
        "iss": "kubernetes/serviceaccount", "sub": "system:serviceaccount:ops:robot",
        "kubernetes.io/serviceaccount/namespace": "ops",
        "kubernetes.io/serviceaccount/secret.name": "robot-token-x1y2z",
        "kubernetes.io/serviceaccount/service-account.name": "robot",
        "kubernetes.io/serviceaccount/service-account.uid": "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e",
    ] }

    @Test func legacyTokenIsRefusedByDefault() async throws {
        try await expectRejected(signer.sign(claims: Self.legacyClaims), .legacyToken)
    }

    @Test func legacyTokenWhenExplicitlyAllowed() async throws {
        let verifier = try await verifier {
            $0.issuers = ["kubernetes/serviceaccount"]
            $0.allowLegacyTokens = true
            $0.legacyReauthenticationInterval = .seconds(600)
        }
        let caller = try await verifier.authenticate(token: signer.sign(claims: Self.legacyClaims))
        #expect(caller.spiffeID.description == "spiffe://cluster.local/ns/ops/sa/robot")
        #expect(caller.serviceAccountUID == "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e")
        #expect(caller.podUID == nil)
        // Streams bound to it end, and re-verify it, after the re-authentication interval.
        #expect(caller.credentialExpiry == now.addingTimeInterval(600))
    }

    @Test func boundTokenClaimsAreExposed() async throws {
        let token = signer.sign(claims: claims { c in
            c["kubernetes.io"] = [
                "namespace": "demo", "serviceaccount": ["name": "frontend", "uid": "sa-uid-1"],
                "pod": ["name": "frontend-7d9f", "uid": "pod-uid-1"],
            ]
        })
        let caller = try await verifier().authenticate(token: token)
        #expect(caller.podName == "frontend-7d9f" && caller.podUID == "pod-uid-1")
        #expect(caller.serviceAccountUID == "sa-uid-1")
    }

    @Test func maximumTokenAge() async throws {
        let verifier = try await verifier { $0.maxTokenAge = .seconds(3600) }
        let t = Int(now.timeIntervalSince1970)
        _ = try await verifier.authenticate(token: signer.sign(claims: claims { $0["iat"] = t - 3600; $0["nbf"] = t - 3600 }))
        let cases: [(String, (inout [String: Any]) -> Void)] = [("old", { $0["iat"] = t - 3700 }), ("no iat", { $0["iat"] = nil })]
        for (label, edit) in cases {
            do {
                _ = try await verifier.authenticate(token: signer.sign(claims: claims(edit)))
                Issue.record("accepted a token with \(label)")
            } catch {
                #expect(error.code == .tooOld, "\(label): \(error)")
            }
        }
    }

    @Test func notYetValid() async throws {
        try await expectRejected(signer.sign(claims: claims { $0["nbf"] = Int(now.timeIntervalSince1970) + 120 }), .notYetValid)
    }

    @Test func wrongIssuer() async throws {
        try await expectRejected(signer.sign(claims: claims { $0["iss"] = "https://evil.example" }), .wrongIssuer)
    }

    @Test func wrongAudience() async throws {
        try await expectRejected(signer.sign(claims: claims { $0["aud"] = ["kubernetes"] }), .wrongAudience)
    }

    @Test func audienceAsAString() async throws {
        let token = signer.sign(claims: claims { $0["aud"] = TokenFactory.audience })
        _ = try await verifier().authenticate(token: token)
    }

    @Test func unknownKeyID() async throws {
        try await expectRejected(signer.sign(claims: claims(), header: ["alg": "ES256", "kid": "nope"]), .unknownKey)
    }

    @Test func missingKeyID() async throws {
        try await expectRejected(signer.sign(claims: claims(), header: ["alg": "ES256"]), .unknownKey)
    }

    @Test func wrongKeyUnderAKnownKeyID() async throws {
        let impostor = TokenFactory(kid: "k1")
        try await expectRejected(impostor.sign(claims: claims()), .badSignature)
    }

    @Test func algNone() async throws {
        let token = TokenFactory.signingInput(header: ["alg": "none", "kid": "k1"], claims: claims()) + "."
        try await expectRejected(token, .malformedToken)
        let unsigned = TokenFactory.signingInput(header: ["alg": "none", "kid": "k1"], claims: claims()) + ".e30"
        try await expectRejected(unsigned, .disallowedAlgorithm)
    }

    @Test func hmacSignedWithThePublicKey() async throws {
        let input = TokenFactory.signingInput(header: ["alg": "HS256", "kid": "k1"], claims: claims())
        let secret = SymmetricKey(data: Data(signer.key.publicKey.pemRepresentation.utf8))
        let mac = HMAC<SHA256>.authenticationCode(for: Data(input.utf8), using: secret)
        try await expectRejected(input + "." + TokenFactory.base64URL(Data(mac)), .disallowedAlgorithm)
    }

    @Test func tamperedPayload() async throws {
        let token = signer.sign(claims: claims())
        var parts = token.split(separator: ".").map(String.init)
        parts[1] = TokenFactory.signingInput(header: [:], claims: claims { $0["kubernetes.io"] = nil; $0["sub"] = "system:serviceaccount:kube-system:admin" })
            .split(separator: ".")[1].description
        try await expectRejected(parts.joined(separator: "."), .badSignature)
    }

    @Test func subAndKubernetesClaimDisagree() async throws {
        try await expectRejected(signer.sign(claims: claims { $0["sub"] = "system:serviceaccount:other:frontend" }), .missingClaims)
    }

    @Test func noKubernetesClaimAndASubThatIsNoServiceAccount() async throws {
        try await expectRejected(signer.sign(claims: claims { $0["kubernetes.io"] = nil; $0["sub"] = "admin@example.com" }), .missingClaims)
    }

    @Test func garbledKubernetesClaim() async throws {
        try await expectRejected(signer.sign(claims: claims { $0["kubernetes.io"] = ["namespace": "demo"] }), .missingClaims)
        try await expectRejected(signer.sign(claims: claims { $0["kubernetes.io"] = "demo" }), .malformedToken)
    }

    @Test(arguments: ["", "abc", "a.b", "a.b.c.d", "!!!.???.***", "eyJhbGciOiJFUzI1NiJ9.bm90IGpzb24.c2ln"])
    func malformed(_ token: String) async throws {
        let verifier = try await verifier()
        await #expect(throws: AuthenticationError.self) { try await verifier.authenticate(token: token) }
    }

    @Test func oversized() async throws {
        try await expectRejected(signer.sign(claims: claims { $0["padding"] = String(repeating: "x", count: 20_000) }), .tokenTooLarge)
    }

    @Test func keySetRefusesAKeyWithoutKid() async {
        var jwk = signer.jwk
        jwk["kid"] = nil
        let json = try! JSONSerialization.data(withJSONObject: ["keys": [jwk]])
        await #expect(throws: KeySetError.self) { try await VerificationKeySet(jwksJSON: json) }
    }
}
