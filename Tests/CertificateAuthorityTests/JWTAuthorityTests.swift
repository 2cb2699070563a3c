import CertificateAuthority
import Crypto
import Foundation
import SDSModel
import TestSupport
import Testing

@Suite struct JWTAuthorityTests {
    let now = Date(timeIntervalSince1970: 1_800_000_000)
    let id = try! SPIFFEID(trustDomain: "cluster.local", namespace: "payments", serviceAccount: "api")

    func failure(_ body: () async throws -> Void) async -> String? {
        do {
            try await body()
            return nil
        } catch {
            return (error as? JWTSVIDError)?.message ?? "\(error)"
        }
    }

    @Test func signsWhatItValidatesForTheAudienceAskedFor() async throws {
        let authority = try await JWTAuthority(key: P256.Signing.PrivateKey(), trustDomain: "cluster.local")
        let (token, expiry) = try await authority.sign(subject: id, audience: ["db", "cache"], ttl: .seconds(300), now: now)
        #expect(expiry == now.addingTimeInterval(300))
        let (subject, claims) = try await authority.validateSVID(token, audience: "cache", now: now)
        #expect(subject == id)
        let object = try #require(try JSONSerialization.jsonObject(with: claims) as? [String: Any])
        #expect(object["sub"] as? String == id.description && object["aud"] as? [String] == ["db", "cache"])
        let headerData = try #require(Base64URL.decode(token.split(separator: ".")[0]).map { Data($0) })
        let header = try #require(try JSONSerialization.jsonObject(with: headerData) as? [String: String])
        #expect(header == ["alg": "ES256", "kid": authority.keyID, "typ": "JWT"])
    }

    @Test func refusesAnythingElse() async throws {
        let authority = try await JWTAuthority(key: P256.Signing.PrivateKey(), trustDomain: "cluster.local")
        let stranger = try await JWTAuthority(key: P256.Signing.PrivateKey(), trustDomain: "cluster.local")
        let (token, _) = try await authority.sign(subject: id, audience: ["db"], ttl: .seconds(300), now: now)
        #expect(await failure { _ = try await authority.validateSVID(token, audience: "other", now: now) }?.contains("audience") == true)
        #expect(await failure { _ = try await authority.validateSVID(token, audience: "db", now: now.addingTimeInterval(301)) } == "expired")
        #expect(await failure { _ = try await stranger.validateSVID(token, audience: "db", now: now) }?.contains("kid") == true)
        let parts = token.split(separator: ".").map(String.init)
        let forged = [parts[0], parts[1], String(parts[2].reversed())].joined(separator: ".")
        #expect(await failure { _ = try await authority.validateSVID(forged, audience: "db", now: now) } != nil)
        let none = Base64URL.encode(Data(#"{"alg":"none","kid":"\#(authority.keyID)"}"#.utf8))
        #expect(await failure { _ = try await authority.validateSVID("\(none).\(parts[1]).", audience: "db", now: now) }?.contains("ES256") == true)
        #expect(await failure { _ = try await authority.validateSVID("x.y", audience: "db", now: now) } != nil)
        let otherDomain = try await JWTAuthority(key: P256.Signing.PrivateKey(), trustDomain: "other.example")
        let (foreign, _) = try await otherDomain.sign(subject: id, audience: ["db"], ttl: .seconds(300), now: now)
        #expect(await failure { _ = try await otherDomain.validateSVID(foreign, audience: "db", now: now) }?.contains("trust domain") == true)
    }

    @Test func theKeyIsKeptInTheStateDirectoryWithMode0600() async throws {
        let directory = TestPKI.temporaryDirectory()
        let first = try await JWTAuthority.loadOrCreate(stateDirectory: directory, trustDomain: "cluster.local")
        let again = try await JWTAuthority.loadOrCreate(stateDirectory: directory, trustDomain: "cluster.local")
        #expect(first.keyID == again.keyID)
        let attributes = try FileManager.default.attributesOfItem(atPath: directory + "/" + JWTAuthority.keyFileName)
        #expect((attributes[.posixPermissions] as? NSNumber)?.intValue == 0o600)
        let jwks = try #require(try JSONSerialization.jsonObject(with: first.bundleJWKS()) as? [String: [[String: String]]])
        #expect(jwks["keys"]?.first?["kid"] == first.keyID && jwks["keys"]?.first?["use"] == "jwt-svid")
    }
}

