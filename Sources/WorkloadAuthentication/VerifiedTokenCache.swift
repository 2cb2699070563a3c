import Crypto
#if canImport(FoundationEssentials)
import FoundationEssentials
import Glibc
#else
import Foundation
#endif
import Synchronization

/// Tokens whose signature has been verified, so a repeated token (every SDS stream an Envoy
/// opens carries the same token until kubelet replaces it) costs no signature check.
///
/// Keyed by the SHA-256 of the token (the token itself is not kept), bounded, kept until the
/// token's `exp` (plus the clock skew) and never holding a failure. A hit still runs every
/// claim check against the current time and configuration, and still needs the token's key in
/// the current key set: a key removed from the JWKS stops its tokens at once.
final class VerifiedTokenCache: Sendable {
    struct Entry: Sendable {
        var claims: ServiceAccountClaims
        var keyID: String
        var validUntil: Date
    }

    private struct State {
        var entries: [SHA256Digest: Entry] = [:]
    }

    private let state = Mutex(State())
    private let capacity: Int

    init(capacity: Int = 10_000) { self.capacity = capacity }

    static func key(for token: String) -> SHA256Digest { SHA256.hash(data: Data(token.utf8)) }

    func entry(for key: SHA256Digest, now: Date) -> Entry? {
        state.withLock { state in
            guard let entry = state.entries[key] else { return nil }
            guard now < entry.validUntil else {
                state.entries[key] = nil
                return nil
            }
            return entry
        }
    }

    func insert(_ entry: Entry, for key: SHA256Digest, now: Date) {
        state.withLock { state in
            if state.entries.count >= capacity {
                state.entries = state.entries.filter { now < $0.value.validUntil }
            }
            // Still full of live tokens: make room at random rather than grow (a flood of distinct
            // valid tokens is bounded by what the API server signed).
            while state.entries.count >= capacity, let victim = state.entries.keys.randomElement() {
                state.entries[victim] = nil
            }
            state.entries[key] = entry
        }
    }

    var count: Int { state.withLock { $0.entries.count } }
}
