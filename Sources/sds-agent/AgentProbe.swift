import ArgumentParser
import EnvoyAPI
import FoundationEssentials
import Glibc
import GRPCCore
import GRPCNIOTransportHTTP2
import SDSModel
import SDSServer
import WorkloadServing

/// Asks an agent on a socket whether it serves: an unauthenticated FetchSecrets call, to which a
/// ready agent answers `unauthenticated` (or `permission_denied` when its peer policy refuses
/// the probe's uid), and an agent that cannot issue yet answers `unavailable` with the reason.
/// Used by `check` and `bootstrap --wait-for-agent`.
enum AgentProbe {
    /// Why the agent is not serving (what `check` prints before exiting 1).
    struct NotServing: Error, CustomStringConvertible {
        var description: String
    }

    /// Returns once a ready agent answers on `socket`, retrying for up to `wait`; throws
    /// ``NotServing`` otherwise.
    static func waitUntilServing(socket: String, wait: Duration) async throws {
        let clock = ContinuousClock()
        let deadline = clock.now + wait
        var lastError = "no attempt made"
        repeat {
            if let kind = FileKind.at(socket), kind != .socket {
                // A regular file or a directory will not become a socket: say so at once.
                throw NotServing(description: "\(socket) is not a socket (it is a \(kind == .directory ? "directory" : "file")): is --socket right?")
            }
            if FileKind.at(socket) == .socket {
                do {
                    try await probe(socket)
                    return
                } catch {
                    lastError = "\(error)"
                }
            } else {
                lastError = "\(socket) does not exist"
            }
            if clock.now < deadline { try await Task.sleep(for: .milliseconds(100)) }
        } while clock.now < deadline
        throw NotServing(description: "no ready sds-agent on \(socket) after \(wait): \(lastError)")
    }

    private static func probe(_ socket: String) async throws {
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
            } catch let error as RPCError where error.code == .unauthenticated || error.code == .permissionDenied {
                // The agent answered, and refused an anonymous caller (or, with --peer-allowed-uid,
                // a caller running as another user), as it should.
                return
            } catch let error as RPCError where error.code == .unavailable && error.message.hasPrefix("not ready") {
                throw NotServing(description: "the agent answers but is \(error.message)")
            }
        }
    }
}
