import ArgumentParser
import FoundationEssentials
import Glibc
import SDSAgent

/// `sds-agent`: an Envoy SDS node agent issuing SPIFFE workload certificates.
///
/// Exit codes: 0 ok, 1 runtime or configuration failure (including a `check` that finds no
/// ready agent), 2 usage (a flag or value the command line cannot take).
@main
struct SDSAgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sds-agent",
        abstract: "Envoy SDS node agent: SPIFFE workload certificates for the sidecars on this node.",
        version: Build.description,
        subcommands: [Serve.self, Bootstrap.self, Check.self, Inspect.self, ConfigCommand.self, CA.self, Version.self]
    )

    /// ArgumentParser's `main`, with usage errors mapped to 2 instead of 64 (`EX_USAGE`), which
    /// probes and scripts would read as an unexplained failure.
    static func main() async {
        do {
            var arguments = joinNegativeValues(Array(CommandLine.arguments.dropFirst()))
            // `serve` and `ca serve` take settings from a file and the environment too, merged
            // under their flags.
            for (command, flags) in [(["serve"], ConfigSources.serveFlags), (["ca", "serve"], ConfigSources.caServeFlags)]
            where arguments.starts(with: command) {
                let own = Array(arguments.dropFirst(command.count))
                let (merged, sources) = try ConfigSources.merge(arguments: own, flags: flags)
                ConfigSources.effective = .init(
                    commandLine: own, merged: merged, sources: sources, flags: flags, command: command.joined(separator: " "))
                arguments = command + merged
            }
            var command = try parseAsRoot(arguments)
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            // A value from the environment or the file that does not parse is a configuration
            // error (exit 1, as any other), named by where it came from, not by a flag nobody typed.
            if let (origin, flag) = ConfigSources.origin(of: message(for: error)) {
                printToStandardError("sds-agent \(ConfigSources.effective.command): \(origin): \(ConfigSources.withoutFlag(message(for: error), flag: flag))")
                Glibc.exit(1)
            }
            let code = exitCode(for: error)
            var message = fullMessage(for: error)
            // A duration that does not parse: say what one looks like (ArgumentParser names only the flag).
            if let range = message.firstRange(of: " <duration>'") {
                message.insert(contentsOf: ": it must be \(DurationText.expected)", at: range.upperBound)
            }
            if code == .success {
                if !message.isEmpty { print(message) }
                Glibc.exit(0)
            }
            if !message.isEmpty { printToStandardError(message) }
            Glibc.exit(code == .validationFailure ? 2 : code.rawValue)
        }
    }
}

/// `--cert-ttl -5m` reads as a flag named `-5m` ("Missing value"): a value that starts with a
/// dash and a digit is joined to its flag (`--cert-ttl=-5m`), so the error says what is wrong.
func joinNegativeValues(_ arguments: [String]) -> [String] {
    var joined: [String] = []
    var index = 0
    while index < arguments.count {
        let argument = arguments[index]
        if argument.hasPrefix("--"), !argument.contains("="), index + 1 < arguments.count,
            let next = arguments[index + 1].dropFirst().first, arguments[index + 1].hasPrefix("-"), next.isNumber
        {
            joined.append(argument + "=" + arguments[index + 1])
            index += 2
        } else {
            joined.append(argument)
            index += 1
        }
    }
    return joined
}

/// `sds-agent version`: what `--version` prints.
struct Version: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the version, the commit and the Swift version it was built with.")

    func run() {
        print(Build.description)
    }
}

/// One line on standard error.
func printToStandardError(_ text: String) {
    let bytes = Array((text + "\n").utf8)
    _ = bytes.withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
}
