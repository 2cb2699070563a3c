import CertificateAuthority
import Crypto
import Foundation
import SDSModel
import TestSupport
import Testing

@Suite struct JWTAuthorityTests {
    let now = Date(timeIntervalSince1970: 1_800_000_000)
    let id = try! SPIFFEID(trustDomain: "cluster.local", namespace: "payments", serviceAccount: "api")

    func failure(_ body: () throws -> Void) -> String? {
        do {
            try body()
            return nil
        } catch {
            return (error as? JWTSVIDError)?.message ?? "\(error)"
        }
    }

    @Test func signsWhatItValidatesForTheAudienceAskedFor() throws {
        let authority = JWTAuthority(key: P256.Signing.PrivateKey(), trustDomain: "cluster.local")
        let (token, expiry) = try authority.sign(subject: id, audience: ["db", "cache"], ttl: .seconds(300), now: now)
        #expect(expiry == now.addingTimeInterval(300))
        let (subject, claims) = try authority.validateSVID(token, audience: "cache", now: now)
        #expect(subject == id)
        let object = try #require(try JSONSerialization.jsonObject(with: claims) as? [String: Any])
        #expect(object["sub"] as? String == id.description && object["aud"] as? [String] == ["db", "cache"])
        let headerData = try #require(Base64URL.decode(token.split(separator: ".")[0]).map { Data($0) })
        let header = try #require(try JSONSerialization.jsonObject(with: headerData) as? [String: String])
        #expect(header == ["alg": "ES256", "kid": authority.keyID, "typ": "JWT"])
    }

    @Test func refusesAnythingElse() throws {
        let authority = JWTAuthority(key: P256.Signing.PrivateKey(), trustDomain: "cluster.local")
        let stranger = JWTAuthority(key: P256.Signing.PrivateKey(), trustDomain: "cluster.local")
        let (token, _) = try authority.sign(subject: id, audience: ["db"], ttl: .seconds(300), now: now)
        #expect(failure { _ = try authority.validateSVID(token, audience: "other", now: now) }?.contains("audience") == true)
        #expect(failure { _ = try authority.validateSVID(token, audience: "db", now: now.addingTimeInterval(301)) } == "expired")
        #expect(failure { _ = try stranger.validateSVID(token, audience: "db", now: now) }?.contains("kid") == true)
        let parts = token.split(separator: ".").map(String.init)
        let forged = [parts[0], parts[1], String(parts[2].reversed())].joined(separator: ".")
        #expect(failure { _ = try authority.validateSVID(forged, audience: "db", now: now) } != nil)
        let none = Base64URL.encode(Data(#"{"alg":"none","kid":"\#(authority.keyID)"}"#.utf8))
        #expect(failure { _ = try authority.validateSVID("\(none).\(parts[1]).", audience: "db", now: now) }?.contains("ES256") == true)
        #expect(failure { _ = try authority.validateSVID("x.y", audience: "db", now: now) } != nil)
        let otherDomain = JWTAuthority(key: P256.Signing.PrivateKey(), trustDomain: "other.example")
        let (foreign, _) = try otherDomain.sign(subject: id, audience: ["db"], ttl: .seconds(300), now: now)
        #expect(failure { _ = try otherDomain.validateSVID(foreign, audience: "db", now: now) }?.contains("trust domain") == true)
    }

    @Test func theKeyIsKeptInTheStateDirectoryWithMode0600() throws {
        let directory = TestPKI.temporaryDirectory()
        let first = try JWTAuthority.loadOrCreate(stateDirectory: directory, trustDomain: "cluster.local")
        let again = try JWTAuthority.loadOrCreate(stateDirectory: directory, trustDomain: "cluster.local")
        #expect(first.keyID == again.keyID)
        let attributes = try FileManager.default.attributesOfItem(atPath: directory + "/" + JWTAuthority.keyFileName)
        #expect((attributes[.posixPermissions] as? NSNumber)?.intValue == 0o600)
        let jwks = try #require(try JSONSerialization.jsonObject(with: first.bundleJWKS()) as? [String: [[String: String]]])
        #expect(jwks["keys"]?.first?["kid"] == first.keyID && jwks["keys"]?.first?["use"] == "jwt-svid")
    }
}

