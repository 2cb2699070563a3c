import FoundationEssentials
import Glibc
import Logging
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
package struct ConfigSources {
    /// Where one setting came from (for the start log).
    package enum Source: String, Sendable { case flag, environment, file }

    /// The flags of `serve`, by kind.
    package struct Flags: Sendable {
        package var single: Set<String>
        package var repeatable: Set<String>
        package var switches: Set<String>
        package var all: Set<String> { single.union(repeatable).union(switches) }

        package init(single: Set<String>, repeatable: Set<String>, switches: Set<String>) {
            self.single = single
            self.repeatable = repeatable
            self.switches = switches
        }
    }

    /// A setting that cannot be read; the message names the source, the key and the value.
    package struct Failure: Error, CustomStringConvertible {
        package var description: String
        package init(description: String) { self.description = description }
    }

    /// What `serve` was started with: its own arguments, the merged ones, and each setting's source.
    package struct Effective: Sendable {
        package var commandLine: [String] = []
        package var merged: [String] = []
        package var sources: [String: Source] = [:]
        /// The command's flags (`serve`'s or `ca serve`'s).
        package var flags = Flags(single: [], repeatable: [], switches: [])
        /// The command whose settings were merged (`serve` or `ca serve`), for messages.
        package var command = "serve"

        package init(
            commandLine: [String] = [], merged: [String] = [], sources: [String: Source] = [:],
            flags: Flags = Flags(single: [], repeatable: [], switches: []), command: String = "serve"
        ) {
            self.commandLine = commandLine
            self.merged = merged
            self.sources = sources
            self.flags = flags
            self.command = command
        }

        /// Every setting not left at its default, with its values (URL credentials redacted).
        package func values() -> [String: [String]] {
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
        package func describe() -> Logger.Metadata {
            var metadata: Logger.Metadata = [:]
            for (key, list) in values() {
                let source = sources[key]?.rawValue ?? "flag"
                metadata[key] = "\(list.count == 1 ? list[0] : "[\(list.joined(separator: ", "))]") (\(source))"
            }
            return metadata
        }

        /// The settings whose values differ from `earlier`'s (set, changed or removed).
        package func changedSettings(since earlier: Effective) -> Set<String> {
            let (now, before) = (values(), earlier.values())
            return Set(now.keys).union(before.keys).filter { now[$0] != before[$0] }
        }

        /// `https://user:secret@host` → `https://REDACTED@host`.
        /// And a PKCS#11 URI's `pin-value=` → `pin-value=REDACTED`.
        package static func redacted(_ value: String) -> String { PKCS11URI.redactingPIN(URLText.redactingUserinfo(value)) }
    }

    /// Where the value an ArgumentParser error `message` quotes came from, when that was the
    /// environment (`SDS_AGENT_CERT_TTL`) or the file (`--config FILE: cert-ttl`), with the flag.
    package static func origin(of message: String, in effective: Effective) -> (origin: String, flag: String)? {
        for (flag, source) in effective.sources where source != .flag {
            guard message.contains("'--\(flag) <") || message.contains("'--\(flag)'") else { continue }
            switch source {
            case .environment: return (environmentName(flag), flag)
            case .file: return ("--config \(value(of: "config", in: effective.commandLine) ?? "file"): \(flag)", flag)
            case .flag: continue
            }
        }
        return nil
    }

    /// ArgumentParser's message about `--flag` said of a value the flag did not carry:
    /// `The value 'x' is invalid for '--cert-ttl <duration>'` → `the value 'x' is invalid: it must be a duration …`.
    package static func withoutFlag(_ message: String, flag: String) -> String {
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
    package static func unknownVariables(in environment: [String: String] = ProcessInfo.processInfo.environment, flags: Flags)
        -> [String]
    {
        let known = Set((flags.all.union(["config"])).map(environmentName))
        return environment.keys.filter { $0.hasPrefix("SDS_AGENT_") && !known.contains($0) }.sorted()
    }

    /// The environment variable for `flag`: `trust-domain` → `SDS_AGENT_TRUST_DOMAIN`.
    package static func environmentName(_ flag: String) -> String {
        "SDS_AGENT_" + flag.uppercased().replacing("-", with: "_")
    }

    /// `arguments` (after the subcommand) with the file's and the environment's settings before
    /// them, and where each setting came from.
    package static func merge(
        arguments: [String], environment: [String: String] = ProcessInfo.processInfo.environment, flags: Flags
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
    package static func read(file path: String, flags: Flags) throws -> [(String, [String])] {
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
    package static let pathSettings: Set<String> = [
        "socket", "state-dir", "federated-bundle", "ca-dir", "ca-cert", "ca-key", "ca-bundle", "proc-root", "workload-socket",
        "attestation-policy", "upstream-ca-bundle", "upstream-ca-token-file", "admin-socket", "jwks", "kube-ca-file",
        "kube-token-file",
    ]

    /// `value` (a path, or `TD=PATH` for `federated-bundle`) made absolute against `file`'s directory.
    package static func resolve(_ value: String, key: String, against file: String) -> String {
        if key == "federated-bundle", let equals = value.firstIndex(of: "=") {
            return String(value[...equals]) + resolve(String(value[value.index(after: equals)...]), key: "", against: file)
        }
        // A key in a PKCS#11 token (`ca-key: "pkcs11:…"`) is no path.
        guard !value.isEmpty, !value.hasPrefix("/"), !PKCS11URI.isURI(value) else { return value }
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
    package static func flagsGiven(in arguments: [String], flags: Flags) -> Set<String> {
        Set(arguments.compactMap { argument -> String? in
            guard argument.hasPrefix("--") else { return nil }
            let name = String(argument.dropFirst(2).prefix(while: { $0 != "=" }))
            return flags.all.contains(name) ? name : nil
        })
    }

    /// The value of `--name VALUE` or `--name=VALUE` in `arguments`.
    package static func value(of name: String, in arguments: [String]) -> String? {
        for (index, argument) in arguments.enumerated() {
            if argument == "--\(name)", index + 1 < arguments.count { return arguments[index + 1] }
            if argument.hasPrefix("--\(name)=") { return String(argument.dropFirst(name.count + 3)) }
        }
        return nil
    }
}

