import Logging
import SDSModel
import Synchronization

/// The keys of a JWKS file, reloadable (SIGHUP): a file that no longer reads or parses keeps the
/// keys in use, and the reason is logged.
public final class JWKSFileKeySource: VerificationKeySource {
    private let path: String
    private let keys: Mutex<VerificationKeySet>

    /// Loads `path`; fails with a message naming it.
    public init(path: String) async throws(KeySetError) {
        self.path = path
        keys = Mutex(try await VerificationKeySet(jwksFile: path))
    }

    /// The key IDs in use.
    public var keyIDs: Set<String> { keys.withLock { $0.keyIDs } }

    public func currentKeys() async -> VerificationKeySet? { keys.withLock { $0 } }
    public func keys(afterUnknownKeyID keyID: String) async -> VerificationKeySet? { keys.withLock { $0 } }

    /// Reads the file again; on failure the keys in use stay and the error says why.
    @discardableResult
    public func reload(logger: Logger) async -> Bool {
        do {
            let fresh = try await VerificationKeySet(jwksFile: path)
            let before = keys.withLock { state -> Set<String> in
                defer { state = fresh }
                return state.keyIDs
            }
            logger.notice(
                "JWKS reloaded", metadata: ["jwks": "\(path)", "key_ids": .list(fresh.keyIDs.sorted()), "changed": "\(before != fresh.keyIDs)"])
            return true
        } catch {
            logger.error("JWKS reload failed; keeping the keys in use", metadata: ["jwks": "\(path)", "error": "\(error.message)"])
            return false
        }
    }
}
