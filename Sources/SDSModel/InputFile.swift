import FoundationEssentials
import Glibc

/// Reads the files an operator names (keys, certificates, policies, templates), with a reason in
/// words when it cannot: `no such file`, `permission denied`, `is a directory, not a file`, `the
/// path is empty`. Foundation's errors printed as `CocoaError(code: … rawValue: 260, userInfo: …)`
/// dumps, and an empty path read the working directory.
public enum InputFile {
    /// Files larger than this are refused (no input of ours comes near it).
    public static let maximumBytes = 16 << 20

    /// The bytes of the file at `path`.
    public static func bytes(_ path: String) throws(InputFileError) -> [UInt8] {
        guard !path.isEmpty else { throw InputFileError(reason: "the path is empty") }
        if FileKind.at(path) == .directory { throw InputFileError(reason: "is a directory, not a file") }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw InputFileError(reason: reason(errno)) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw InputFileError(reason: reason(errno))
            }
            if count == 0 { return bytes }
            bytes += chunk[..<count]
            guard bytes.count <= maximumBytes else { throw InputFileError(reason: "is larger than \(maximumBytes) bytes") }
        }
    }

    /// The text of the file at `path` (UTF-8; an invalid sequence is refused).
    public static func text(_ path: String) throws(InputFileError) -> String {
        let bytes = try bytes(path)
        guard let text = String(validating: bytes, as: UTF8.self) else { throw InputFileError(reason: "is not UTF-8 text") }
        return text
    }

    /// Nil when `path` names a directory that can be listed; else why not, in words.
    public static func directoryProblem(_ path: String) -> String? {
        guard !path.isEmpty else { return "the path is empty" }
        switch FileKind.at(path) {
        case .directory?: return access(path, R_OK | X_OK) == 0 ? nil : "permission denied"
        case nil: return "no such directory"
        default: return "is a file, not a directory"
        }
    }

    static func reason(_ code: Int32) -> String {
        switch code {
        case ENOENT: "no such file"
        case EACCES, EPERM: "permission denied"
        case EISDIR: "is a directory, not a file"
        case ENOTDIR: "a component of the path is not a directory"
        case ELOOP: "too many symbolic links"
        default: String(cString: strerror(code))
        }
    }
}

/// A file that cannot be read; ``reason`` says why in words (the caller names the file and flag).
public struct InputFileError: Error, Sendable, CustomStringConvertible {
    public var reason: String
    public init(reason: String) { self.reason = reason }
    public var description: String { reason }
}
