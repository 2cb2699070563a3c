import FoundationEssentials
import Glibc
import JWTKit
import SDSModel

/// The public keys tokens are verified with, loaded from a JWKS document.
///
/// Every key is added with `isDefault: false`: jwt-kit would otherwise verify a token whose `kid`
/// is unknown with the default key. A key without a `kid` cannot be selected and is refused.
public struct VerificationKeySet: Sendable {
    let collection: JWTKeyCollection
    /// The key IDs in the set.
    public let keyIDs: Set<String>

    /// Loads a JWKS (`{"keys":[...]}`) from JSON.
    public init(jwksJSON: Data) async throws(KeySetError) {
        let jwks: JWKS
        do {
            jwks = try JSONDecoder().decode(JWKS.self, from: jwksJSON)
        } catch {
            // The decoder's own description is a dump of its coding path: say what was expected.
            throw KeySetError(message: "not a JWKS document (JSON with a \"keys\" list of JWKs)")
        }
        guard !jwks.keys.isEmpty else { throw KeySetError(message: "the JWKS has no keys") }
        let collection = JWTKeyCollection()
        var ids = Set<String>()
        for jwk in jwks.keys {
            guard let kid = jwk.keyIdentifier?.string else {
                throw KeySetError(message: "a JWKS key has no 'kid'")
            }
            do {
                try await collection.add(jwk: jwk, isDefault: false)
            } catch {
                throw KeySetError(message: "key '\(kid)' cannot be used: \(error)")
            }
            ids.insert(kid)
        }
        self.collection = collection
        self.keyIDs = ids
    }

    /// Loads a JWKS from a file.
    public init(jwksFile path: String) async throws(KeySetError) {
        let data: Data
        do {
            data = Data(try InputFile.bytes(path))
        } catch {
            throw KeySetError(message: "cannot read --jwks \(path): \(error.reason)")
        }
        do {
            try await self.init(jwksJSON: data)
        } catch {
            throw KeySetError(message: "\(path): \(error.message)")
        }
    }
}

/// A JWKS that cannot be used.
public struct KeySetError: Error, Sendable, CustomStringConvertible {
    /// What is wrong, in words.
    public var message: String
    public var description: String { message }
}
