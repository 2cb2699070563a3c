import ArgumentParser
import EnvoyAPI
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SDSServer

/// `sds-agent check`: succeeds once an agent answers SDS calls on the socket.
///
/// It makes an unauthenticated FetchSecrets call: an `unauthenticated` answer proves the agent is
/// up and serving. For start ordering (start Envoy only after this succeeds) and exec probes.
struct Check: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Exit 0 once an sds-agent answers on the socket (retrying until --wait runs out).")

    @Option(help: "The agent's Unix socket.")
    var socket = "/var/run/sds-agent/sds.sock"

    @Option(help: "Keep trying for this long, e.g. 30s; 0s tries once.", transform: parseDuration)
    var wait: Duration = .zero

    func run() async throws {
        let clock = ContinuousClock()
        let deadline = clock.now + wait
        var lastError = "no attempt made"
        repeat {
            if FileManager.default.fileExists(atPath: socket) {
                do {
                    try await probe()
                    print("sds-agent is serving on \(socket)")
                    return
                } catch {
                    lastError = "\(error)"
                }
            } else {
                lastError = "\(socket) does not exist"
            }
            if clock.now < deadline { try await Task.sleep(for: .milliseconds(100)) }
        } while clock.now < deadline
        throw ValidationError("no sds-agent answering on \(socket): \(lastError)")
    }

    private func probe() async throws {
        try await withGRPCClient(
            transport: .http2NIOPosix(target: .unixDomainSocket(path: socket), transportSecurity: .plaintext)
        ) { client in
            let sds = Envoy_Service_Secret_V3_SecretDiscoveryService.Client(wrapping: client)
            var options = CallOptions.defaults
            options.timeout = .seconds(2)
            do {
                _ = try await sds.fetchSecrets(
                    Envoy_Service_Discovery_V3_DiscoveryRequest(), metadata: [CallerToken.probeHeader: "1"],
                    options: options)
            } catch let error as RPCError where error.code == .unauthenticated {
                return  // the agent answered, and refused an anonymous caller, as it should
            }
        }
    }
}
