import Glibc

/// What a path names, from `stat(2)` (or `lstat(2)`), without Foundation.
public enum FileKind: Sendable, Equatable {
    case directory, socket, regular, other

    /// The kind of file at `path`, or nil when there is none (or it cannot be seen).
    public static func at(_ path: String, followingLinks: Bool = true) -> FileKind? {
        var info = stat()
        guard (followingLinks ? stat(path, &info) : lstat(path, &info)) == 0 else { return nil }
        switch info.st_mode & S_IFMT {
        case S_IFDIR: return .directory
        case S_IFSOCK: return .socket
        case S_IFREG: return .regular
        default: return .other
        }
    }
}
