import ArgumentParser
import FoundationEssentials
import Glibc
import SDSAgent
import SDSModel

/// `sds-agent bootstrap`: renders the Envoy sidecar bootstrap template.
struct Bootstrap: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Render envoy-bootstrap/envoy-sidecar.yaml for one sidecar (see envoy-bootstrap/README.md).")

    @Option(help: "Template file.")
    var template = "envoy-bootstrap/envoy-sidecar.yaml"
    @Option(help: "Where to write the bootstrap ('-' for standard output).")
    var output = "-"
    @Option(help: "The agent's Unix socket.")
    var socket = "/var/run/sds-agent/sds.sock"
    @Option(help: "Service-account token file sent with every SDS stream.")
    var tokenFile = "/var/run/secrets/sds-agent/token"
    @Option(help: "gRPC metadata key for the token (must match the agent's --token-header).")
    var tokenHeader = Defaults.Tokens.header
    @Option(help: "Envoy node id (e.g. the pod name).")
    var nodeId: String
    @Option(help: "Envoy node cluster (e.g. the service name).")
    var nodeCluster: String
    @Option(help: "Admin port on 127.0.0.1.")
    var adminPort = 15000
    @Option(help: "Address of the inbound mTLS listener.")
    var inboundAddress = "0.0.0.0"
    @Option(help: "Port of the inbound mTLS listener.")
    var inboundPort = 15006
    @Option(help: "The local app's port on 127.0.0.1.")
    var appPort = 8080
    @Option(help: "Port of the outbound plain-HTTP listener on 127.0.0.1.")
    var outboundPort = 15001
    @Option(help: "Upstream's address (its inbound mTLS listener).")
    var upstreamAddress = "127.0.0.1"
    @Option(help: "Upstream's port (its inbound mTLS listener).")
    var upstreamPort = 15006
    @Option(help: "SPIFFE ID allowed to call this workload (repeatable; 'spiffe://td/ns/x/*' matches a prefix).")
    var allowId: [String] = []
    @Option(help: "SPIFFE ID the upstream must present (repeatable; prefix form as for --allow-id).")
    var upstreamId: [String] = []
    @Option(help: "Validation context name: ROOTCA or spiffe://<trust-domain>.")
    var validationContextName = Defaults.Names.rootCA
    @Option(help: "Workload certificate secret name.")
    var workloadSecretName = Defaults.Names.workloadSecret
    @Option(help: "How long Envoy waits for its secrets; 0s waits for as long as it takes.")
    var initialFetchTimeout = "0s"

    @Option(help: "Requests per upstream connection before a new connection (and TLS handshake).")
    var upstreamMaxRequestsPerConnection = 1000
    @Option(help: "SDS API type: GRPC (state of the world) or DELTA_GRPC (incremental).")
    var sdsApiType = "GRPC"
    @Option(help: ArgumentHelp(
        "TLS key exchange both sides offer: pqc (X25519MLKEM768 first, then X25519, P-256, P-384; TLS 1.3 upstream) or classical (X25519, P-256, P-384).",
        valueName: "pqc|classical"))
    var keyExchange: SidecarBootstrap.KeyExchange = .pqc
    @Option(help: ArgumentHelp(
        "Audience of a JWT-SVID the outbound listener adds to every request (Envoy's credential injector, secret jwt-svid:AUDIENCE; repeatable for several audiences in one token).",
        valueName: "audience"))
    var jwtSvidAudience: [String] = []

    @Option(help: ArgumentHelp("First wait (up to this long, e.g. 120s) until the agent answers on --socket: a sidecar's start gate.", valueName: "duration"))
    var waitForAgent: Duration?

    func run() async throws {
        if let waitForAgent {
            try await AgentProbe.waitUntilServing(socket: socket, wait: waitForAgent)
        }
        var bootstrap = SidecarBootstrap(
            sdsSocket: socket, tokenFile: tokenFile, nodeID: nodeId, nodeCluster: nodeCluster, adminPort: adminPort,
            inboundPort: inboundPort, appPort: appPort, outboundPort: outboundPort, upstreamAddress: upstreamAddress,
            upstreamPort: upstreamPort, inboundAllowedIDs: allowId, upstreamIDs: upstreamId)
        bootstrap.tokenHeader = tokenHeader
        bootstrap.inboundAddress = inboundAddress
        bootstrap.validationContextName = validationContextName
        bootstrap.workloadSecretName = workloadSecretName
        bootstrap.initialFetchTimeout = initialFetchTimeout
        bootstrap.upstreamMaxRequestsPerConnection = upstreamMaxRequestsPerConnection
        bootstrap.sdsAPIType = sdsApiType
        bootstrap.keyExchange = keyExchange
        bootstrap.jwtSVIDAudiences = jwtSvidAudience
        // A value the bootstrap cannot take is a usage error (exit 2, as for every command); a
        // file that cannot be read or written is one line and exit 1.
        func fail(_ message: String) -> ExitCode {
            printToStandardError("sds-agent bootstrap: \(message)")
            return ExitCode.failure
        }
        let text: String
        do {
            text = try InputFile.text(template)
        } catch {
            throw fail("cannot read --template \(template): \(error.reason)")
        }
        let rendered: String
        do {
            rendered = try bootstrap.render(template: text)
        } catch {
            throw ValidationError(error.message)
        }
        if output == "-" {
            print(rendered, terminator: "")
        } else {
            do {
                try AtomicFile.write(rendered, to: output, mode: 0o644)
            } catch {
                throw fail("cannot write --output \(output): \(error.reason)")
            }
        }
    }
}

extension SidecarBootstrap.KeyExchange: ExpressibleByArgument {}
