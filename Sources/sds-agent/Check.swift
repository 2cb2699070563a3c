import ArgumentParser

/// `sds-agent check`: succeeds once an agent that can issue answers on the socket.
///
/// For start ordering (start Envoy only after this succeeds) and as an exec probe. Exit codes:
/// 0 ready, 1 not ready (or no agent), 2 usage; never 64, which kubelet would show as a mystery.
struct Check: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Exit 0 once an sds-agent that can issue answers on the socket (retrying until --wait runs out); 1 if not ready.")

    @Option(help: "The agent's Unix socket.")
    var socket = "/var/run/sds-agent/sds.sock"

    @Option(help: ArgumentHelp("Keep trying for this long, e.g. 30s; 0s tries once.", valueName: "duration"))
    var wait: Duration = .zero

    func run() async throws {
        do {
            try await AgentProbe.waitUntilServing(socket: socket, wait: wait)
        } catch {
            printToStandardError("sds-agent check: \(error)")
            throw ExitCode.failure
        }
        print("sds-agent is ready on \(socket)")
    }
}
