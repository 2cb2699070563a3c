/// What this binary is: `sds-agent version`, `--version`, and the `sds_agent_build_info` metric.
package enum BuildInfo {
    /// The release version.
    package static let version = "0.3.0"
    /// The git commit it was built from (`scripts/build-release.sh` writes it into
    /// `BuildCommit.swift` for the build; a plain `swift build` says "unknown").
    package static let commit = buildCommit
    /// The Swift compiler that built it.
    package static let swiftVersion: String = {
        #if compiler(>=6.4)
            return "6.4 or later"
        #elseif compiler(>=6.3)
            return "6.3"
        #elseif compiler(>=6.2)
            return "6.2"
        #else
            return "6.1 or earlier"
        #endif
    }()

    /// One line for humans: `sds-agent 0.3.0 (commit abc1234, Swift 6.3)`.
    package static var description: String { "sds-agent \(version) (commit \(commit), Swift \(swiftVersion))" }
}
