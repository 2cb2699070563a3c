import ArgumentParser
import FoundationEssentials
import Glibc
import Logging
import SDSAgent
import Synchronization
import SDSModel

/// `serve`'s settings from a YAML file (`--config FILE`) and the environment (`SDS_AGENT_<FLAG>`),
/// merged into its command line so that one parser, one set of defaults and one set of checks
/// serve all three. Precedence: flags > environment > file > defaults.
///
/// A key is a long flag name without dashes (`trust-domain: cluster.local`); a repeatable flag
/// takes a sequence (file) or a comma-separated list (environment); a switch takes a boolean;
/// durations are strings (`"24h"`). For a repeatable flag the highest source that sets it wins
/// whole (the file's audiences do not add to the command line's).
///
/// Looked at first: apple/swift-configuration (readers over files, environment and arguments with
/// reload). Its model reads values key by key; ours must feed ArgumentParser, whose parsing and
/// checks are the contract, so the sources are merged as arguments and `YAMLNode` reads the file.
struct ConfigSources {
    /// Where one setting came from (for the start log).
    enum Source: String { case flag, environment, file }

    /// The flags of `serve`, by kind.
    struct Flags {
        var single: Set<String>
        var repeatable: Set<String>
        var switches: Set<String>
        var all: Set<String> { single.union(repeatable).union(switches) }
    }

    /// Read from `Serve`'s own definition, so a new flag is a config key and a variable at once.
    static let serveFlags = flags(of: Serve.self)
    /// `ca serve`'s, the same way: its `--config` and `SDS_AGENT_*` follow `serve`'s conventions.
    static let caServeFlags = flags(of: CAServe.self)

    /// The long options and switches of `command`, from ArgumentParser's own model of it (the
    /// JSON of `--experimental-dump-help`: each argument's kind and whether it repeats), not its
    /// help text. The library's `ToolInfoV0` types are not a product, so the few fields used are
    /// decoded here.
    static func flags(of command: any ParsableCommand.Type) -> Flags {
        struct ToolInfo: Decodable {
            struct Command: Decodable { var arguments: [Argument]? }
            struct Argument: Decodable {
                struct Name: Decodable {
                    var kind: String
                    var name: String
                }
                var kind: String
                var isRepeating: Bool
                var preferredName: Name?
            }
            var command: Command
        }
        var flags = Flags(single: [], repeatable: [], switches: [])
        guard let info = try? JSONDecoder().decode(ToolInfo.self, from: Data(command._dumpHelp().utf8)) else { return flags }
        for argument in info.command.arguments ?? [] {
            guard let name = argument.preferredName, name.kind == "long",
                !["help", "version", "config", "experimental-dump-help", "generate-completion-script"].contains(name.name)
            else { continue }
            switch argument.kind {
            case "flag": flags.switches.insert(name.name)
            case "option" where argument.isRepeating: flags.repeatable.insert(name.name)
            case "option": flags.single.insert(name.name)
            default: continue
            }
        }
        return flags
    }

    /// A setting that cannot be read; the message names the source, the key and the value.
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// What `serve` was started with: its own arguments, the merged ones, and each setting's source.
    struct Effective: Sendable {
        var commandLine: [String] = []
        var merged: [String] = []
        var sources: [String: Source] = [:]
        /// The command's flags (`serve`'s or `ca serve`'s).
        var flags = ConfigSources.serveFlags
        /// The command whose settings were merged (`serve` or `ca serve`), for messages.
        var command = "serve"

        /// Every setting not left at its default, with its values (URL credentials redacted).
        func values() -> [String: [String]] {
            var values: [String: [String]] = [:]
            var index = 0
            while index < merged.count {
                let argument = merged[index]
                index += 1
                guard argument.hasPrefix("--") else { continue }
                let body = argument.dropFirst(2)
                let key: String
                var value: String
                if let equals = body.firstIndex(of: "=") {
                    key = String(body[..<equals])
                    value = String(body[body.index(after: equals)...])
                } else {
                    key = String(body)
                    if flags.switches.contains(key) || index >= merged.count || merged[index].hasPrefix("--") {
                        value = "true"
                    } else {
                        value = merged[index]
                        index += 1
                    }
                }
                value = Self.redacted(value)
                if flags.repeatable.contains(key) {
                    values[key, default: []].append(value)
                } else {
                    values[key] = [value]
                }
            }
            return values
        }

        /// `key: value (source)` for every setting not left at its default; URL credentials redacted.
        func describe() -> Logger.Metadata {
            var metadata: Logger.Metadata = [:]
            for (key, list) in values() {
                let source = sources[key]?.rawValue ?? "flag"
                metadata[key] = "\(list.count == 1 ? list[0] : "[\(list.joined(separator: ", "))]") (\(source))"
            }
            return metadata
        }

        /// The settings whose values differ from `earlier`'s (set, changed or removed).
        func changedSettings(since earlier: Effective) -> Set<String> {
            let (now, before) = (values(), earlier.values())
            return Set(now.keys).union(before.keys).filter { now[$0] != before[$0] }
        }

        /// `https://user:secret@host` → `https://REDACTED@host`.
        static func redacted(_ value: String) -> String { URLText.redactingUserinfo(value) }
    }

    private static let effectiveState = Mutex(Effective())
    /// Set by `main` before `serve` runs.
    static var effective: Effective {
        get { effectiveState.withLock { $0 } }
        set { effectiveState.withLock { $0 = newValue } }
    }

    /// Where the value an ArgumentParser error `message` quotes came from, when that was the
    /// environment (`SDS_AGENT_CERT_TTL`) or the file (`--config FILE: cert-ttl`), with the flag.
    static func origin(of message: String) -> (origin: String, flag: String)? {
        let current = effective
        for (flag, source) in current.sources where source != .flag {
            guard message.contains("'--\(flag) <") || message.contains("'--\(flag)'") else { continue }
            switch source {
            case .environment: return (environmentName(flag), flag)
            case .file: return ("--config \(value(of: "config", in: current.commandLine) ?? "file"): \(flag)", flag)
            case .flag: continue
            }
        }
        return nil
    }

    /// ArgumentParser's message about `--flag` said of a value the flag did not carry:
    /// `The value 'x' is invalid for '--cert-ttl <duration>'` → `the value 'x' is invalid: it must be a duration …`.
    static func withoutFlag(_ message: String, flag: String) -> String {
        var text = message
        while let start = text.firstRange(of: " for '--\(flag)"),
            let end = text[start.upperBound...].firstIndex(of: "'")
        {
            text.removeSubrange(start.lowerBound...end)
        }
        if message.contains("<duration>") { text += ": it must be \(DurationText.expected)" }
        return text.prefix(1).lowercased() + text.dropFirst()
    }

    /// `SDS_AGENT_*` variables that name no setting (a typo would otherwise be silently ignored).
    static func unknownVariables(in environment: [String: String] = ProcessInfo.processInfo.environment, flags: Flags = serveFlags)
        -> [String]
    {
        let known = Set((flags.all.union(["config"])).map(environmentName))
        return environment.keys.filter { $0.hasPrefix("SDS_AGENT_") && !known.contains($0) }.sorted()
    }

    /// The environment variable for `flag`: `trust-domain` → `SDS_AGENT_TRUST_DOMAIN`.
    static func environmentName(_ flag: String) -> String {
        "SDS_AGENT_" + flag.uppercased().replacing("-", with: "_")
    }

    /// `arguments` (after the subcommand) with the file's and the environment's settings before
    /// them, and where each setting came from.
    static func merge(
        arguments: [String], environment: [String: String] = ProcessInfo.processInfo.environment, flags: Flags = serveFlags
    ) throws -> (arguments: [String], sources: [String: Source]) {
        var sources: [String: Source] = [:]
        for key in flagsGiven(in: arguments, flags: flags) { sources[key] = .flag }

        let configPath = value(of: "config", in: arguments) ?? environment[environmentName("config")]
        var fileSettings: [(String, [String])] = []
        if let configPath {
            fileSettings = try read(file: configPath, flags: flags)
        }
        var environmentSettings: [(String, [String])] = []
        for flag in flags.all.sorted() {
            guard let text = environment[environmentName(flag)] else { continue }
            environmentSettings.append((flag, try values(of: flag, environmentText: text, flags: flags)))
        }

        var prefix: [String] = []
        // The environment over the file, the command line over both: single values are given
        // lowest first (the parser keeps the last), repeatable ones only from the highest source.
        for (settings, source) in [(fileSettings, Source.file), (environmentSettings, .environment)] {
            for (flag, values) in settings {
                if flags.repeatable.contains(flag) || flags.switches.contains(flag) {
                    let higher = source == .file
                        ? sources[flag] != nil || environmentSettings.contains { $0.0 == flag }
                        : sources[flag] != nil
                    if higher { continue }
                }
                if sources[flag] != .flag { sources[flag] = source }
                if flags.switches.contains(flag) {
                    if values == ["true"] { prefix.append("--\(flag)") }
                } else {
                    // `--flag=` would read as a missing value: an empty one goes as its own argument.
                    for value in values { prefix += value.isEmpty ? ["--\(flag)", ""] : ["--\(flag)=\(value)"] }
                }
            }
        }
        return (prefix + arguments, sources)
    }

    /// The settings in a YAML file, as flag values.
    static func read(file path: String, flags: Flags) throws -> [(String, [String])] {
        let text: String
        do {
            text = try InputFile.text(path)
        } catch {
            throw Failure(description: "cannot read --config \(path): \(error.reason)")
        }
        let node: YAMLNode?
        do {
            node = try YAMLNode.parse(text)
        } catch {
            throw Failure(description: "config \(path): not YAML the agent reads: \(error)")
        }
        guard let node else { return [] }
        guard let mapping = node.mapping else {
            throw Failure(description: "config \(path): the top level must be a mapping of flag names to values (trust-domain: cluster.local)")
        }
        var settings: [(String, [String])] = []
        for entry in mapping {
            let (key, valueNode) = (entry.key, entry.value)
            guard flags.all.contains(key) else {
                let hint = flags.all.filter { $0.hasPrefix(String(key.prefix(4))) }.sorted().prefix(3)
                throw Failure(
                    description: "config \(path): unknown key '\(key)'; keys are serve's long flag names without dashes"
                        + (hint.isEmpty ? "" : " (did you mean \(hint.joined(separator: ", "))?)"))
            }
            let values = try values(of: key, node: valueNode, file: path, flags: flags)
            settings.append((key, pathSettings.contains(key) ? values.map { resolve($0, key: key, against: path) } : values))
        }
        return settings
    }

    /// The settings that name files or directories: relative in a config file, they are taken
    /// from the file's own directory (as a manifest or a Helm values file is read), not from the
    /// working directory the agent happened to start in.
    static let pathSettings: Set<String> = [
        "socket", "state-dir", "federated-bundle", "ca-dir", "ca-cert", "ca-key", "ca-bundle", "proc-root", "workload-socket",
        "attestation-policy", "upstream-ca-bundle", "upstream-ca-token-file", "admin-socket", "jwks", "kube-ca-file",
        "kube-token-file",
    ]

    /// `value` (a path, or `TD=PATH` for `federated-bundle`) made absolute against `file`'s directory.
    static func resolve(_ value: String, key: String, against file: String) -> String {
        if key == "federated-bundle", let equals = value.firstIndex(of: "=") {
            return String(value[...equals]) + resolve(String(value[value.index(after: equals)...]), key: "", against: file)
        }
        guard !value.isEmpty, !value.hasPrefix("/") else { return value }
        let directory = file.lastIndex(of: "/").map { String(file[..<$0]) } ?? "."
        let base = file.hasPrefix("/") ? (directory.isEmpty ? "/" : directory) : FileManager.default.currentDirectoryPath + "/" + directory
        return (base.hasSuffix("/") ? base : base + "/") + (value.hasPrefix("./") ? String(value.dropFirst(2)) : value)
    }

    private static func values(of key: String, node: YAMLNode, file: String, flags: Flags) throws -> [String] {
        func scalarText(_ node: YAMLNode) throws -> String {
            guard let scalar = node.scalar else {
                throw Failure(description: "config \(file): '\(key)' must be a single value, not a \(node.kind)")
            }
            return scalar
        }
        if flags.switches.contains(key) {
            guard let bool = node.bool else {
                throw Failure(description: "config \(file): '\(key)' is a switch: true or false, not '\(try scalarText(node))'")
            }
            return [bool ? "true" : "false"]
        }
        if flags.repeatable.contains(key) {
            if let sequence = node.sequence { return try sequence.map(scalarText) }
            return [try scalarText(node)]
        }
        return [try scalarText(node)]
    }

    private static func values(of key: String, environmentText text: String, flags: Flags) throws -> [String] {
        let name = environmentName(key)
        if flags.switches.contains(key) {
            switch text.lowercased() {
            case "true", "1", "yes": return ["true"]
            case "false", "0", "no", "": return ["false"]
            default: throw Failure(description: "\(name)='\(text.callerText(limit: 64))' is a switch: true or false")
            }
        }
        if flags.repeatable.contains(key) {
            return text.split(separator: ",").map { $0.trimmed }
        }
        return [text]
    }

    /// The long flags present in `arguments` (`--name value` or `--name=value`).
    static func flagsGiven(in arguments: [String], flags: Flags) -> Set<String> {
        Set(arguments.compactMap { argument -> String? in
            guard argument.hasPrefix("--") else { return nil }
            let name = String(argument.dropFirst(2).prefix(while: { $0 != "=" }))
            return flags.all.contains(name) ? name : nil
        })
    }

    /// The value of `--name VALUE` or `--name=VALUE` in `arguments`.
    static func value(of name: String, in arguments: [String]) -> String? {
        for (index, argument) in arguments.enumerated() {
            if argument == "--\(name)", index + 1 < arguments.count { return arguments[index + 1] }
            if argument.hasPrefix("--\(name)=") { return String(argument.dropFirst(name.count + 3)) }
        }
        return nil
    }
}

/// `sds-agent config check FILE`: the file's settings checked as `serve` would check them.
struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config", abstract: "Configuration files for serve.", subcommands: [ConfigCheck.self])
}

struct ConfigCheck: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check a serve --config file: keys, values and the configuration they make (with the environment and defaults). Exit 0 ok, 1 not.")

    @Argument(help: "The YAML file.")
    var file: String

    func run() async throws {
        do {
            let (arguments, _) = try ConfigSources.merge(arguments: ["--config", file])
            let serve: Serve
            do {
                serve = try Serve.parse(arguments)
            } catch {
                throw ConfigSources.Failure(description: "\(file): \(Serve.message(for: error))")
            }
            let configuration = try serve.makeConfiguration()
            try configuration.validate()
            try await configuration.checkInputs()
        } catch {
            printToStandardError("sds-agent config check: \(error)")
            throw ExitCode.failure
        }
        print("\(file): ok")
    }
}
