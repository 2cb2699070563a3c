/// What this binary is: `sds-agent version`, `--version`, and the `sds_agent_build_info` metric.
public enum BuildInfo {
    /// The release version.
    public static let version = "0.3.0"
    /// The git commit it was built from (`scripts/build-release.sh` writes it into
    /// `BuildCommit.swift` for the build; a plain `swift build` says "unknown").
    public static let commit = buildCommit
    /// The Swift compiler that built it.
    public static let swiftVersion: String = {
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
    public static var description: String { "sds-agent \(version) (commit \(commit), Swift \(swiftVersion))" }
}
