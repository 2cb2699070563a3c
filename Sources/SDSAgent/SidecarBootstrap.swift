import CertificateAuthority
import SDSModel
import FoundationEssentials
import Glibc

/// Fills `envoy-bootstrap/envoy-sidecar.yaml` for one Envoy sidecar.
///
/// Each property is one `{{PLACEHOLDER}}` of the template. SPIFFE ID lists become
/// `match_typed_subject_alt_names` matchers: an entry ending in `/*` matches by prefix, any other
/// entry exactly; an empty list accepts any identity that chains to the trust bundle.
package struct SidecarBootstrap: Sendable {
    /// The agent's Unix socket.
    package var sdsSocket: String
    /// The projected service-account token file Envoy sends with every SDS stream.
    package var tokenFile: String
    /// gRPC metadata key for the token.
    package var tokenHeader: String = Defaults.Tokens.header
    /// Envoy's node id (e.g. the pod name).
    package var nodeID: String
    /// Envoy's node cluster (e.g. the service name).
    package var nodeCluster: String
    /// Admin port on 127.0.0.1.
    package var adminPort: Int
    /// Address of the inbound mTLS listener.
    package var inboundAddress: String = "0.0.0.0"
    /// Port of the inbound mTLS listener.
    package var inboundPort: Int
    /// The local app's port on 127.0.0.1, behind the inbound listener.
    package var appPort: Int
    /// Port of the outbound plain-HTTP listener on 127.0.0.1.
    package var outboundPort: Int
    /// Host name or address of the upstream's inbound mTLS listener.
    package var upstreamAddress: String
    /// Port of the upstream's inbound mTLS listener.
    package var upstreamPort: Int
    /// SPIFFE IDs allowed to call this workload (inbound).
    package var inboundAllowedIDs: [String]
    /// SPIFFE IDs the upstream may present (outbound).
    package var upstreamIDs: [String]
    /// Name of the validation context secret: `ROOTCA` or `spiffe://<trust-domain>`.
    package var validationContextName: String = Defaults.Names.rootCA
    /// Name of the workload certificate secret.
    package var workloadSecretName: String = Defaults.Names.workloadSecret
    /// How long Envoy waits for SDS before serving without the secret; `0s` waits forever.
    package var initialFetchTimeout: String = "0s"
    /// Requests per upstream connection before Envoy opens a new one (and a new TLS handshake).
    package var upstreamMaxRequestsPerConnection: Int = 1000
    /// `GRPC` (state of the world) or `DELTA_GRPC` (incremental) for the SDS source.
    package var sdsAPIType: String = "GRPC"
    /// Which key exchanges both TLS contexts offer.
    package var keyExchange: KeyExchange = .pqc
    /// Audiences of the JWT-SVID the outbound listener injects (`jwt-svid:AUD[,AUD...]`); none: no injector.
    package var jwtSVIDAudiences: [String] = []

    /// The TLS key exchanges the sidecar offers.
    package enum KeyExchange: String, Sendable, CaseIterable {
        /// Hybrid post-quantum `X25519MLKEM768` first, then the classical groups; TLS 1.3 on the
        /// upstream side (Envoy's client side otherwise stops at TLS 1.2, which has no hybrid group).
        case pqc
        /// `X25519`, `P-256` and `P-384` only, each side's TLS versions Envoy's defaults.
        case classical

        static let classicalCurves = #"["X25519", "P-256", "P-384"]"#
        static let pqcCurves = #"["X25519MLKEM768", "X25519", "P-256", "P-384"]"#

        var inbound: String {
            switch self {
            case .pqc: "{ ecdh_curves: \(Self.pqcCurves) }"
            case .classical: "{ ecdh_curves: \(Self.classicalCurves) }"
            }
        }

        var upstream: String {
            switch self {
            case .pqc: "{ tls_maximum_protocol_version: TLSv1_3, ecdh_curves: \(Self.pqcCurves) }"
            case .classical: "{ ecdh_curves: \(Self.classicalCurves) }"
            }
        }
    }

    package init(
        sdsSocket: String, tokenFile: String, nodeID: String, nodeCluster: String, adminPort: Int, inboundPort: Int,
        appPort: Int, outboundPort: Int, upstreamAddress: String, upstreamPort: Int, inboundAllowedIDs: [String],
        upstreamIDs: [String]
    ) {
        self.sdsSocket = sdsSocket
        self.tokenFile = tokenFile
        self.nodeID = nodeID
        self.nodeCluster = nodeCluster
        self.adminPort = adminPort
        self.inboundPort = inboundPort
        self.appPort = appPort
        self.outboundPort = outboundPort
        self.upstreamAddress = upstreamAddress
        self.upstreamPort = upstreamPort
        self.inboundAllowedIDs = inboundAllowedIDs
        self.upstreamIDs = upstreamIDs
    }

    private var strings: [String: String] {
        [
            "SDS_SOCKET": sdsSocket, "TOKEN_FILE": tokenFile, "TOKEN_HEADER": tokenHeader, "NODE_ID": nodeID,
            "NODE_CLUSTER": nodeCluster, "INBOUND_ADDRESS": inboundAddress, "UPSTREAM_ADDRESS": upstreamAddress,
            "VALIDATION_CONTEXT_NAME": validationContextName, "WORKLOAD_SECRET_NAME": workloadSecretName,
            "INITIAL_FETCH_TIMEOUT": initialFetchTimeout, "SDS_API_TYPE": sdsAPIType,
        ]
    }

    private var ports: [String: Int] {
        ["ADMIN_PORT": adminPort, "INBOUND_PORT": inboundPort, "APP_PORT": appPort, "OUTBOUND_PORT": outboundPort, "UPSTREAM_PORT": upstreamPort]
    }

    /// The placeholder values, keyed by placeholder name.
    package func values() throws(ConfigurationError) -> [String: String] {
        try checkShapes()
        try checkWhatEnvoyRefuses()
        guard let timeout = DurationText.parse(initialFetchTimeout) else {
            throw ConfigurationError(message: "--initial-fetch-timeout '\(initialFetchTimeout)' is not \(DurationText.expected)")
        }
        var values = strings
        // Envoy's protobuf Duration in YAML is seconds with an `s` ("300s", "0.500s"), never "5m".
        let milliseconds = timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000
        values["INITIAL_FETCH_TIMEOUT"] =
            milliseconds % 1000 == 0 ? "\(milliseconds / 1000)s" : "\(milliseconds / 1000)." + String(String(milliseconds % 1000 + 1000).dropFirst()) + "s"
        for (name, port) in ports { values[name] = String(port) }
        values["UPSTREAM_MAX_REQUESTS_PER_CONNECTION"] = String(upstreamMaxRequestsPerConnection)
        values["INBOUND_SAN_MATCHERS"] = try Self.sanMatchers(inboundAllowedIDs)
        values["UPSTREAM_SAN_MATCHERS"] = try Self.sanMatchers(upstreamIDs)
        values["INBOUND_TLS_PARAMS"] = keyExchange.inbound
        values["UPSTREAM_TLS_PARAMS"] = keyExchange.upstream
        values["OUTBOUND_CREDENTIAL_INJECTOR"] = try credentialInjector()
        return values
    }

    /// Every value has a shape YAML and Envoy can take: no quote or newline, ports, the API type.
    private func checkShapes() throws(ConfigurationError) {
        for (name, value) in strings {
            guard !value.isEmpty, !value.contains(where: { $0 == "\"" || $0 == "\\" || $0.isNewline || $0 == "{" || $0 == "}" })
            else { throw ConfigurationError(message: "bootstrap value \(name) '\(value)' is empty or has a quote, backslash, brace or newline") }
        }
        for (name, port) in ports where !(1...65535).contains(port) {
            throw ConfigurationError(message: "bootstrap value \(name) \(port) is not a TCP port")
        }
        guard ["GRPC", "DELTA_GRPC"].contains(sdsAPIType) else {
            throw ConfigurationError(message: "SDS API type must be GRPC or DELTA_GRPC, not \(sdsAPIType)")
        }
        guard upstreamMaxRequestsPerConnection >= 1 else {
            throw ConfigurationError(message: "upstream max requests per connection must be at least 1")
        }
    }

    /// What Envoy itself would refuse, and values it accepts that can never work: each refused
    /// here with a sentence (exit 1, no file written).
    private func checkWhatEnvoyRefuses() throws(ConfigurationError) {
        // What Envoy itself would refuse, refused here with a sentence (exit 1, no file written).
        guard SigningAuthority.addressBytes(inboundAddress) != nil else {
            throw ConfigurationError(
                message: "--inbound-address '\(inboundAddress)' is not an IP address (a listener binds an IPv4 or IPv6 literal, e.g. 0.0.0.0)")
        }
        let isName = upstreamAddress.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { label in
            !label.isEmpty && label.count <= 63 && label.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }
        }
        guard SigningAuthority.addressBytes(upstreamAddress) != nil || isName else {
            throw ConfigurationError(message: "--upstream-address '\(upstreamAddress)' is neither an IP address nor a DNS name")
        }
        // Values Envoy accepts but that can never work: refused here, with the reason.
        let maxSocketPath = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1
        guard sdsSocket.utf8.count <= maxSocketPath else {
            throw ConfigurationError(message: "--socket is \(sdsSocket.utf8.count) bytes; a Unix socket path has at most \(maxSocketPath)")
        }
        guard tokenHeader.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }) else {
            throw ConfigurationError(message: "--token-header '\(tokenHeader)' is not a gRPC metadata key (letters, digits, '-', '_', '.')")
        }
        if validationContextName.hasPrefix("spiffe://") {
            guard (try? SPIFFEID(parsing: validationContextName))?.path.isEmpty == true else {
                throw ConfigurationError(
                    message: "--validation-context-name '\(validationContextName)' is not spiffe://<trust-domain> (lowercase letters, digits, '.', '-', '_')")
            }
        }
        guard workloadSecretName != validationContextName, workloadSecretName != "*", validationContextName != "*" else {
            throw ConfigurationError(message: "--workload-secret-name and --validation-context-name must be two names, neither '*'")
        }
        let listening = [("--admin-port", adminPort), ("--inbound-port", inboundPort), ("--outbound-port", outboundPort), ("--app-port", appPort)]
        for (index, (flag, port)) in listening.enumerated() {
            if let other = listening[..<index].first(where: { $0.1 == port }) {
                throw ConfigurationError(.conflictingSettings, message: "\(flag) and \(other.0) are both \(port): each listener needs its own port")
            }
        }
    }

    /// Replaces every `{{NAME}}` in `template`; fails on a placeholder it has no value for.
    package func render(template: String) throws(ConfigurationError) -> String {
        let values = try values()
        var output = ""
        var rest = template[...]
        while let open = rest.firstRange(of: "{{") {
            output += rest[..<open.lowerBound]
            guard let close = rest[open.upperBound...].firstRange(of: "}}") else {
                throw ConfigurationError(message: "template has an unclosed '{{'")
            }
            let name = String(rest[open.upperBound..<close.lowerBound])
            guard let value = values[name] else {
                throw ConfigurationError(message: "template placeholder {{\(name)}} has no value")
            }
            output += value
            rest = rest[close.upperBound...]
        }
        return output + rest
    }

    /// The credential injector filter (one YAML flow mapping, a list item) whose generic
    /// credential is the agent's `jwt-svid:AUD` secret over the same SDS source; empty for none.
    func credentialInjector() throws(ConfigurationError) -> String {
        guard !jwtSVIDAudiences.isEmpty else { return "" }
        let name = JWTSVIDName.prefix + jwtSVIDAudiences.joined(separator: ",")
        if case .failure(let reason) = JWTSVIDName.audiences(in: name) {
            throw ConfigurationError(message: "--jwt-svid-audience: \(reason.message)")
        }
        guard !jwtSVIDAudiences.contains(where: { $0.contains("\"") || $0.contains("\\") }) else {
            throw ConfigurationError(message: "--jwt-svid-audience may not hold a quote or a backslash")
        }
        // The header's value is the whole secret ("Bearer <JWT-SVID>"); no request leaves without it.
        return """
            - { name: envoy.filters.http.credential_injector, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector, \
            overwrite: true, allow_request_without_credential: false, credential: { name: envoy.http.injected_credentials.generic, typed_config: { \
            "@type": type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic, \
            credential: { name: "\(name)", sds_config: *sds_agent } } } } }
            """
    }

    /// A YAML flow list of URI SAN matchers.
    static func sanMatchers(_ ids: [String]) throws(ConfigurationError) -> String {
        let matchers = try ids.map { id throws(ConfigurationError) -> String in
            // A SPIFFE ID, or one followed by `/*` (a prefix): `*` nowhere else, a lowercase trust
            // domain, a path (a bare `spiffe://td` matches no workload).
            let exact = id.hasSuffix("/*") ? String(id.dropLast(2)) : id
            guard let parsed = try? SPIFFEID(parsing: exact), !parsed.path.isEmpty else {
                throw ConfigurationError(
                    message: "'\(id)' is not a SPIFFE ID such as spiffe://cluster.local/ns/NS/sa/SA (lowercase trust domain; '/*' only at the end)")
            }
            if id.hasSuffix("/*") {
                return "{san_type: URI, matcher: {prefix: \"\(id.dropLast())\"}}"
            }
            return "{san_type: URI, matcher: {exact: \"\(id)\"}}"
        }
        return "[" + matchers.joined(separator: ", ") + "]"
    }
}
