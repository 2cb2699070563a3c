import FoundationEssentials

/// Polls files every `interval` of `clock` and reports the ones whose contents changed since the
/// last poll (a Kubernetes Secret or ConfigMap update, an atomic symlink swap, is one change). The
/// one poller of operator files (`--ca-dir`, `--federated-bundle`); tests drive it on a manual clock.
package struct FileWatch<C: Clock<Duration>>: Sendable {
    package let paths: [String]
    package let clock: C
    package var interval: Duration = .seconds(2)

    package init(paths: [String], clock: C, interval: Duration = .seconds(2)) {
        self.paths = paths
        self.clock = clock
        self.interval = interval
    }

    /// Until cancelled: every poll runs `tick` (work that is due on time), then `changed` with the
    /// paths that changed, in `paths`' order, when any did.
    package func run(tick: () async -> Void = {}, changed: ([String]) async -> Void) async {
        var seen = contents()
        while !Task.isCancelled {
            do {
                try await clock.sleep(for: interval)
            } catch {
                return
            }
            await tick()
            let current = contents()
            let differ = paths.filter { current[$0] != seen[$0] }
            seen = current
            if !differ.isEmpty { await changed(differ) }
        }
    }

    /// The files' contents (they are small; comparing them is exact); nil for a missing file.
    private func contents() -> [String: Data?] {
        Dictionary(paths.map { ($0, FileManager.default.contents(atPath: $0)) }, uniquingKeysWith: { first, _ in first })
    }
}
