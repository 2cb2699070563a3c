import ArgumentParser

/// `sds-agent`: an Envoy SDS node agent issuing SPIFFE workload certificates.
@main
struct SDSAgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sds-agent",
        abstract: "Envoy SDS node agent: SPIFFE workload certificates for the sidecars on this node.",
        subcommands: [Serve.self, Bootstrap.self, Check.self, CA.self]
    )
}
