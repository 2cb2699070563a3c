import Crypto
import FoundationEssentials
import Glibc
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

    /// A token's SHA-256 as four words: hashed as 4 words, not byte by byte as `SHA256Digest` is.
    struct Key: Hashable, Sendable {
        var words: (UInt64, UInt64, UInt64, UInt64)

        static func == (a: Key, b: Key) -> Bool { a.words == b.words }
        func hash(into hasher: inout Hasher) {
            hasher.combine(words.0)
            hasher.combine(words.1)
            hasher.combine(words.2)
            hasher.combine(words.3)
        }
    }

    private struct State {
        var entries: [Key: Entry] = [:]
    }

    private let state = Mutex(State())
    private let capacity: Int

    init(capacity: Int = 10_000) { self.capacity = capacity }

    static func key(for token: String) -> Key {
        var token = token
        let digest = token.withUTF8 { SHA256.hash(data: UnsafeRawBufferPointer($0)) }
        return digest.withUnsafeBytes { bytes in
            Key(words: (bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self), bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
                        bytes.loadUnaligned(fromByteOffset: 16, as: UInt64.self), bytes.loadUnaligned(fromByteOffset: 24, as: UInt64.self)))
        }
    }

    func entry(for key: Key, now: Date) -> Entry? {
        state.withLock { state in
            guard let entry = state.entries[key] else { return nil }
            guard now < entry.validUntil else {
                state.entries[key] = nil
                return nil
            }
            return entry
        }
    }

    func insert(_ entry: Entry, for key: Key, now: Date) {
        state.withLock { state in
            if state.entries.count >= capacity {
                state.entries = state.entries.filter { now < $0.value.validUntil }
                // Still full of live tokens: make room for an eighth of the capacity at once, in
                // the dictionary's (hash, so arbitrary) order, rather than grow (a flood of
                // distinct valid tokens is bounded by what the API server signed). Once per
                // eighth: the sweep above is not paid on every insert of a full cache.
                if state.entries.count >= capacity {
                    for victim in Array(state.entries.keys.prefix(max(1, capacity / 8))) { state.entries[victim] = nil }
                }
            }
            state.entries[key] = entry
        }
    }

    var count: Int { state.withLock { $0.entries.count } }
}
