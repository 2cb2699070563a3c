import FoundationEssentials
import Logging
import SDSModel

/// What the cache needs to sign JWT-SVIDs (the agent's `JWTAuthority` conforms): the same key,
/// `kid` and claims as the Workload API's, so a server validates them with the JWT bundle it
/// already has.
public protocol JWTSVIDSigning: Sendable {
    func sign(subject: SPIFFEID, audience: [String], ttl: Duration, now: Date) async throws -> (token: String, expiry: Date)
}

/// A JWT-SVID held for SDS: one per identity and set of audiences.
struct JWTSVIDKey: Hashable {
    var identity: SPIFFEID
    var audiences: [String]
}

struct JWTSVIDEntry {
    var secret: JWTSVIDSecret
    /// Signed again from then on: half its lifetime, less up to a tenth of it (jitter, so the
    /// tokens of a node's pods do not all come due in the same second).
    var refreshAt: Date
    /// The last time a stream resolved it: one that no stream asks for any more is not refreshed.
    var lastAsked: Date
}

extension SecretCache {
    /// Most JWT-SVIDs held for one identity (distinct audience sets); the one asked for least
    /// recently makes room.
    static let maximumJWTSVIDsPerIdentity = 32

    /// The JWT-SVID of `identity` for `audiences`, signing one when none is held (or it is
    /// about to expire). The caller authenticated `identity`.
    public func jwtSVID(for identity: SPIFFEID, audiences: [String]) async throws(SecretError) -> JWTSVIDSecret {
        guard jwtSigner != nil else {
            throw SecretError(.unsupported, message: "JWT-SVIDs need the agent's own CA: with --upstream-ca there is no JWT key every node shares")
        }
        let key = JWTSVIDKey(identity: identity, audiences: audiences)
        let now = self.now()
        if let entry = jwtSVIDs[key], entry.secret.expiry > now.addingTimeInterval(1) {
            jwtSVIDs[key]?.lastAsked = now
            return entry.secret
        }
        let secret = try await signJWTSVID(key, now: now, lastAsked: now)
        logger.info(
            "JWT-SVID issued for SDS",
            metadata: ["spiffe_id": "\(identity)", "audience": .list(audiences), "expires": "\(secret.expiry.formatted(.iso8601))"])
        return secret
    }

    /// Signs `key`'s JWT-SVID and holds it, asked for last at `lastAsked` (a new key makes room
    /// under the per-identity limit; a refresh replaces its own entry).
    private func signJWTSVID(_ key: JWTSVIDKey, now: Date, lastAsked: Date) async throws(SecretError) -> JWTSVIDSecret {
        guard let jwtSigner else { throw SecretError(.unsupported, message: "no JWT key") }
        let ttl = configuration.jwtSVIDTTL
        let signed: (token: String, expiry: Date)
        do {
            signed = try await jwtSigner.sign(subject: key.identity, audience: key.audiences, ttl: ttl, now: now)
        } catch {
            throw SecretError(.failed, message: "cannot sign a JWT-SVID: \(error)", cause: error)
        }
        let secret = JWTSVIDSecret(spiffeID: key.identity, audiences: key.audiences, token: signed.token, issuedAt: now, expiry: signed.expiry)
        // A signer's expiry at or before `now` (a stepped clock) must not make an empty range.
        let lifetime = max(0, signed.expiry.timeIntervalSince(now))
        let refreshAt = now.addingTimeInterval(lifetime / 2 - Double.random(in: 0...(lifetime / 10)))
        if jwtSVIDs[key] == nil {
            let held = jwtSVIDs.filter { $0.key.identity == key.identity }
            if held.count >= Self.maximumJWTSVIDsPerIdentity, let oldest = held.min(by: { $0.value.lastAsked < $1.value.lastAsked }) {
                jwtSVIDs[oldest.key] = nil
            }
        }
        jwtSVIDs[key] = JWTSVIDEntry(secret: secret, refreshAt: refreshAt, lastAsked: lastAsked)
        return secret
    }

    /// Signs again every JWT-SVID due (half its lifetime) that a stream asked for within its
    /// lifetime, and signals its identity's streams, which resolve and push it; drops the rest
    /// once expired.
    func refreshJWTSVIDs(now: Date) async {
        let lifetime = configuration.jwtSVIDTTL.timeInterval
        var changed = Set<SPIFFEID>()
        for (key, entry) in jwtSVIDs where now >= entry.refreshAt {
            guard now.timeIntervalSince(entry.lastAsked) < lifetime else {
                if entry.secret.expiry <= now { jwtSVIDs[key] = nil }
                continue
            }
            do {
                let secret = try await signJWTSVID(key, now: now, lastAsked: entry.lastAsked)
                changed.insert(key.identity)
                logger.debug(
                    "JWT-SVID refreshed", metadata: ["spiffe_id": "\(key.identity)", "expires": "\(secret.expiry.formatted(.iso8601))"])
            } catch {
                jwtSVIDs[key]?.refreshAt = now.addingTimeInterval(5)
                logger.error("JWT-SVID refresh failed; the current one is served until it expires", metadata: ["error": "\(error.message)"])
            }
        }
        for identity in changed { updates.certificateChanged(for: identity) }
    }

    /// JWT-SVIDs held now (for tests).
    public var jwtSVIDCount: Int { jwtSVIDs.count }
}
