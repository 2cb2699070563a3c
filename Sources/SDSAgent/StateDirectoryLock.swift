import CertificateAuthority
import FoundationEssentials
import Glibc
import SDSModel

/// One agent per state directory: an exclusive `flock` on `<dir>/agent.lock`, held while the
/// agent lives (the kernel drops it when the process exits, even after SIGKILL). A second agent
/// on the same directory would rotate and persist the same root behind the first one's back.
final class StateDirectoryLock: Sendable {
    private let fd: Int32

    /// Takes the lock, creating the directory (0700) if needed; fails naming the holder's pid.
    init(directory: String) throws {
        do {
            try RootCAStore.makeDirectory(directory, mode: 0o755)
        } catch {
            throw ConfigurationError(message: "--state-dir \(directory): \(error)")
        }
        let path = directory + "/agent.lock"
        // Held through a read-only descriptor: a file open for writing would keep the directory's
        // file system from being remounted read-only (an operator's choice the agent survives).
        let fd = open(path, O_RDONLY | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw ConfigurationError(message: "--state-dir \(directory): cannot open \(path): \(String(cString: strerror(errno)))")
        }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let holder = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmed
            close(fd)
            throw ConfigurationError(
                message: "--state-dir \(directory) is in use by another sds-agent (pid \(holder ?? "?")); each agent needs its own")
        }
        // Who holds it, for the next agent's message (best effort; the lock is what counts).
        let writer = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC)
        if writer >= 0 {
            let pid = Array("\(getpid())\n".utf8)
            _ = pid.withUnsafeBytes { write(writer, $0.baseAddress, $0.count) }
            close(writer)
        }
        self.fd = fd
    }

    deinit { close(fd) }
}

