/// What this binary is: `sds-agent version`, `--version`, and the `sds_agent_build_info` metric.
/// The commit is the executable's (`Build.commit`): only that small module is compiled again
/// when the release build writes it.
package enum BuildInfo {
    /// The release version.
    package static let version = "0.3.0"
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
    package static func description(commit: String) -> String { "sds-agent \(version) (commit \(commit), Swift \(swiftVersion))" }
}
