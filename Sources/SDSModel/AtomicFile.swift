import FoundationEssentials
import Glibc

/// The one way files are written: through a temporary file created with the final mode (a key
/// is never readable by others, even for a moment), synced, renamed into place, and the
/// directory synced, so a crash leaves the old file or the new one, never half of one.
public enum AtomicFile {
    /// Writes `text` to `path` with file mode `mode`.
    public static func write(_ text: String, to path: String, mode: mode_t) throws(InputFileError) {
        guard !path.isEmpty else { throw InputFileError(reason: "the path is empty") }
        if FileKind.at(path) == .directory { throw InputFileError(reason: "is a directory, not a file") }
        let temporary = path + ".tmp"
        unlink(temporary)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        guard fd >= 0 else { throw InputFileError(reason: "cannot create \(temporary): \(InputFile.reason(errno))") }
        defer { close(fd) }
        fchmod(fd, mode)  // the umask may have narrowed it; make it exactly `mode`
        let bytes = Array(text.utf8)
        var written = 0
        while written < bytes.count {
            let count = bytes[written...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else {
                let reason = count == 0 ? "short write" : InputFile.reason(errno)
                unlink(temporary)  // a half-written file must not stay behind (a full disk, say)
                throw InputFileError(reason: "cannot write \(temporary): \(reason)")
            }
            written += count
        }
        guard fsync(fd) == 0 else {
            let reason = InputFile.reason(errno)
            unlink(temporary)
            throw InputFileError(reason: "cannot write \(temporary): \(reason)")
        }
        guard rename(temporary, path) == 0 else {
            let reason = InputFile.reason(errno)
            unlink(temporary)
            throw InputFileError(reason: "cannot rename \(temporary) to \(path): \(reason)")
        }
        // The rename itself survives a crash only once the directory is on disk.
        let slash = path.lastIndex(of: "/")
        let directoryPath = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        let directory = open(directoryPath, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if directory >= 0 {
            fsync(directory)
            close(directory)
        }
    }
}
