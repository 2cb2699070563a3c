/// `# HELP` text for every metric the agent exports. The metrics are recorded through
/// swift-metrics, which carries no help text, so the endpoint adds these lines before each
/// metric's `# TYPE` line. A test checks that every exported metric has one.
package enum MetricsHelp {
    static let text: [String: String] = [
        "sds_agent_build_info": "Always 1; labels: the version, commit and Swift version of this binary.",
        "sds_agent_refused_calls_total": "SDS calls refused, by gRPC status (code) and why (reason).",
        "sds_agent_certificates_issued_total": "Workload certificates issued, by kind: new (first request) or renewal.",
        "sds_agent_certificate_issue_failures_total": "Issuances or renewals that failed (the current certificate, if any, is still served).",
        "sds_agent_certificate_issue_seconds": "Time to generate a key, build a CSR and have it signed.",
        "sds_agent_cached_identities": "Identities with a cached certificate.",
        "sds_agent_certificate_expiry_seconds": "Seconds until the earliest cached workload certificate expires.",
        "sds_agent_ca_expiry_seconds": "Seconds until the CA certificate that signs (or, upstream, the earliest trusted root) expires.",
        "sds_agent_ca_reloads_total": "--ca-dir: changes of the CA files taken into use.",
        "sds_agent_ca_reload_failures_total": "--ca-dir: changes of the CA files refused (half-written or invalid); the old CA keeps signing.",
        "sds_agent_federated_bundle_reload_failures_total": "Changes of a --federated-bundle file refused (the previous roots stay).",
        "sds_agent_open_streams": "SDS streams open now, by api (sotw or delta).",
        "sds_agent_nacks_total": "Responses Envoy rejected (NACK), by api.",
        "sds_agent_open_connections": "Connections open on the SDS socket.",
        "sds_agent_closed_connections_total": "Connections the agent closed or that failed, by reason.",
        "sds_agent_tainted_leaves": "Certificates served now whose chain holds a CA certificate declared compromised (tainted-certs.pem); re-issued within --taint-reissue-window, so the goal is 0.",
        "sds_agent_ca_signer_tainted": "1 while the CA would sign under a tainted certificate (and so refuses to: replace it in the CA directory), else 0.",
        "sds_agent_taint_refused_total": "Taint files refused (not PEM, or naming a certificate outside the CA's hierarchy); the taint in force stays.",
        "sds_agent_crl_reloads_total": "Revocation lists (the CA directory's ca-crl.pem) accepted and pushed to every validation context.",
        "sds_agent_crl_refused_total": "Revocation lists refused (malformed, not signed by a CA of the hierarchy, older than the one in force, expired, or missing the signing CA's list); the one in force stays.",
        "sds_agent_upstream_ca_up": "1 while a replica of the upstream CA answers (its last call reached it), 0 once none does.",
        "sds_agent_upstream_ca_endpoint_up": "Per replica of the upstream CA (endpoint ADDRESS:PORT): 1 when its last call reached it, 0 when it did not.",
        "sds_agent_upstream_ca_requests_total": "Calls to the upstream CA, by result: ok, unavailable, refused, invalid_answer.",
        "sds_agent_ca_certificates_issued_total": "ca serve: certificates issued over the CSR API.",
        "sds_agent_ca_refused_requests_total": "ca serve: CSR API calls refused, by reason (token, impersonation, csr, ca).",
    ]

    /// `exposition` with a `# HELP` line before each `# TYPE` line of a metric that has text.
    package static func annotate(_ exposition: [UInt8]) -> [UInt8] {
        let text = String(decoding: exposition, as: UTF8.self)
        var out = ""
        out.reserveCapacity(text.utf8.count + 2048)
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("# TYPE ") {
                let name = line.dropFirst(7).split(separator: " ").first.map(String.init) ?? ""
                if let help = Self.text[name] { out += "# HELP \(name) \(help)\n" }
            }
            out += line
            out += "\n"
        }
        if out.hasSuffix("\n\n") { out.removeLast() }
        return Array(out.utf8)
    }
}
