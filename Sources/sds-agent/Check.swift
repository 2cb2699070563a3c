import ArgumentParser

/// `sds-agent check`: succeeds once an agent answers SDS calls on the socket.
///
/// For start ordering (start Envoy only after this succeeds) and as an exec probe.
struct Check: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Exit 0 once an sds-agent answers on the socket (retrying until --wait runs out).")

    @Option(help: "The agent's Unix socket.")
    var socket = "/var/run/sds-agent/sds.sock"

    @Option(help: "Keep trying for this long, e.g. 30s; 0s tries once.", transform: parseDuration)
    var wait: Duration = .zero

    func run() async throws {
        try await AgentProbe.waitUntilServing(socket: socket, wait: wait)
        print("sds-agent is serving on \(socket)")
    }
}
