import SDSAgent

/// This binary's build: the version (``BuildInfo``) and the commit it was built from
/// (`scripts/build-release.sh` writes it into `BuildCommit.swift` for the build; a plain
/// `swift build` says "unknown").
enum Build {
    static let commit = buildCommit
    /// `sds-agent 0.3.0 (commit abc1234, Swift 6.3)`.
    static var description: String { BuildInfo.description(commit: commit) }
}
