import FoundationEssentials
import Glibc
import SDSModel
import SDSServer
import SecretCache
import UpstreamCA
import SwiftASN1
import X509
import CertificateAuthority

/// What `sds-agent inspect` shows: the node's analogue of `istioctl proxy-config secret`.
/// The agent encodes it on its admin socket; the command decodes it and prints a table or the JSON.
package struct Inspection: Codable, Sendable, Equatable {
    package struct Agent: Codable, Sendable, Equatable {
        package var version: String
        package var pid: Int32
        package var socket: String
        package var trustDomain: String
        /// `embedded`, `files` or `upstream HOST:PORT`.
        package var ca: String
        package var ready: Bool
        package var notReadyReason: String?
        /// Upstream mode: each replica of the CA and whether its last call reached it (nil before
        /// the first).
        package var upstreamEndpoints: [UpstreamEndpoint]?
    }

    package struct UpstreamEndpoint: Codable, Sendable, Equatable {
        package var endpoint: String
        package var reachable: Bool?
    }

    package struct Identity: Codable, Sendable, Equatable {
        package var spiffeID: String
        package var serial: String?
        package var notBefore: Date?
        package var notAfter: Date?
        package var renewAt: Date?
        package var failures: Int
        package var issuing: Bool
        package var streams: Int
        /// Streams per pod (`namespace/name`).
        package var pods: [String: Int]
        /// Its chain holds a certificate declared compromised (re-issued within the taint window).
        package var tainted: Bool? = nil
    }

    package struct Root: Codable, Sendable, Equatable {
        package var subject: String
        package var serial: String
        package var notAfter: Date
    }

    package struct Bundle: Codable, Sendable, Equatable {
        /// The names it is served under.
        package var names: [String]
        package var version: String
        package var roots: [Root]
    }

    package var agent: Agent
    package var identities: [Identity]
    package var trustBundles: [Bundle]

    static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return encoder
    }()

    package static func decode(_ data: Data) throws -> Inspection {
        let decoder = JSONDecoder()
        // The inverse of `.convertToSnakeCase` for our names (`spiffe_id` → `spiffeID`).
        decoder.keyDecodingStrategy = .custom { path in
            let key = path.last?.stringValue ?? ""
            let parts = key.split(separator: "_")
            let camel = (parts.first.map(String.init) ?? "")
                + parts.dropFirst().map { $0 == "id" ? "ID" : $0.prefix(1).uppercased() + $0.dropFirst() }.joined()
            return AnyCodingKey(camel)
        }
        decoder.dateDecodingStrategy = .iso8601
        return try decoder.decode(Inspection.self, from: data)
    }

    package func json() -> Data { (try? Self.encoder.encode(self)) ?? Data("{}".utf8) }

    /// Builds the report from the cache, the open streams and the served bundle.
    static func make(
        agent: Agent, cache: SecretCache, streams: [SPIFFEID: OpenStreams.Entry], bundle: TrustBundle, bundleNames: [String],
        tainted: Set<SPIFFEID> = []
    ) async -> Inspection {
        var identities: [Identity] = await cache.report().map { report in
            let open = streams[report.spiffeID]
            return Identity(
                spiffeID: report.spiffeID.description, serial: report.serialNumberHex, notBefore: report.notBefore,
                notAfter: report.notAfter, renewAt: report.renewAt, failures: report.failures, issuing: report.issuing,
                streams: open?.streams ?? 0, pods: open?.pods ?? [:], tainted: tainted.contains(report.spiffeID) ? true : nil)
        }
        // Streams of identities not (or no longer) cached still show.
        for (identity, open) in streams where !identities.contains(where: { $0.spiffeID == identity.description }) {
            identities.append(
                Identity(spiffeID: identity.description, failures: 0, issuing: false, streams: open.streams, pods: open.pods))
        }
        let roots = ((try? PEMDocument.parseMultiple(pemString: bundle.rootsPEM)) ?? []).compactMap { try? Certificate(pemDocument: $0) }
        return Inspection(
            agent: agent, identities: identities.sorted { $0.spiffeID < $1.spiffeID },
            trustBundles: [
                Bundle(
                    names: bundleNames, version: bundle.version,
                    roots: roots.map { Root(subject: "\($0.subject)", serial: $0.serialNumber.hexString, notAfter: $0.notValidAfter) })
            ])
    }

    /// The human table.
    package func table() -> String {
        func date(_ value: Date?) -> String { value.map { $0.formatted(.iso8601) } ?? "-" }
        var lines = [
            "\(agent.version) pid \(agent.pid) socket \(agent.socket) trust domain \(agent.trustDomain) CA \(agent.ca)",
            agent.ready ? "ready" : "NOT READY: \(agent.notReadyReason ?? "-")",
        ]
        for upstream in agent.upstreamEndpoints ?? [] {
            lines.append("  upstream CA replica \(upstream.endpoint): \(upstream.reachable.map { $0 ? "answers" : "DOES NOT ANSWER" } ?? "not called yet")")
        }
        lines.append("")
        let header = ["IDENTITY", "SERIAL", "NOT AFTER", "RENEW AT", "STREAMS", "PODS"]
        var rows = [header]
        for identity in identities {
            let pods = identity.pods.sorted { $0.key < $1.key }.map { $0.value > 1 ? "\($0.key) (\($0.value))" : $0.key }
            rows.append([
                identity.spiffeID,
                (identity.serial ?? (identity.issuing ? "(issuing)" : "-")) + (identity.tainted == true ? " (TAINTED)" : ""),
                date(identity.notAfter),
                identity.failures > 0 ? "\(date(identity.renewAt)) (\(identity.failures) failed)" : date(identity.renewAt),
                "\(identity.streams)", pods.isEmpty ? "-" : pods.joined(separator: ", "),
            ])
        }
        let widths = header.indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
        for row in rows {
            lines.append(row.indices.map { $0 == row.count - 1 ? row[$0] : row[$0] + String(repeating: " ", count: max(0, widths[$0] - row[$0].count)) }
                .joined(separator: "  "))
        }
        if identities.isEmpty { lines.append("(no identity cached)") }
        for bundle in trustBundles {
            lines.append("")
            lines.append("TRUST BUNDLE \(bundle.names.joined(separator: ", ")) (version \(bundle.version))")
            for root in bundle.roots {
                lines.append("  root \(root.serial)  not after \(date(root.notAfter))  \(root.subject)")
            }
            if bundle.roots.isEmpty { lines.append("  (no root yet)") }
        }
        return lines.joined(separator: "\n") + "\n"
    }
}

private struct AnyCodingKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(_ string: String) { stringValue = string }
    init?(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}

extension Agent {
    /// What `sds-agent inspect` shows.
    package func inspection() async -> Inspection {
        let ca =
            configuration.upstreamCA.map { "upstream \($0.endpointsText)" }
            ?? (configuration.caCertificateFile != nil ? "files" : "embedded")
        let reason = readiness.notReadyReason
        return await Inspection.make(
            agent: .init(
                version: BuildInfo.version, pid: getpid(), socket: configuration.socketPath,
                trustDomain: configuration.trustDomain, ca: ca, ready: reason == nil, notReadyReason: reason,
                upstreamEndpoints: issuance.upstream?.endpoints.map { .init(endpoint: $0.endpoint, reachable: $0.reachable) }),
            cache: cache, streams: service.openStreams.snapshot, bundle: await cache.trustBundle(),
            bundleNames: configuration.effectiveValidationContextNames.sorted(),
            tainted: issuance.tainted.isEmpty ? [] : await cache.identities { [issuance] in issuance.isTainted($0) })
    }
}
