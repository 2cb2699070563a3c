import ArgumentParser
import FoundationEssentials
import SDSAgent
import SDSModel
import Synchronization

// The bridge between ArgumentParser's commands and ConfigSources (SDSAgent): which flags each
// command has, and the settings `main` merged for the command that runs.
extension ConfigSources {
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

    private static let effectiveState = Mutex(Effective(flags: serveFlags))
    /// Set by `main` before `serve` (or `ca serve`) runs.
    static var effective: Effective {
        get { effectiveState.withLock { $0 } }
        set { effectiveState.withLock { $0 = newValue } }
    }

    /// Where the value an ArgumentParser error `message` quotes came from, if not a flag.
    static func origin(of message: String) -> (origin: String, flag: String)? { origin(of: message, in: effective) }
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
            let (arguments, _) = try ConfigSources.merge(arguments: ["--config", file], flags: ConfigSources.serveFlags)
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
