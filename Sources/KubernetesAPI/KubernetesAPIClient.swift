import AsyncHTTPClient
import FoundationEssentials
import Glibc
import NIOCore
import NIOHTTP1
import NIOSSL
import SDSModel
import TLSLinks

/// A small HTTPS client for the Kubernetes API server: GET and POST of JSON, authenticated with
/// the agent's own service-account token and trusting only the cluster's CA.
///
/// The token file is read for every request: kubelet replaces the projected token before it
/// expires, and a client holding the old one would start failing an hour later.
public final class KubernetesAPIClient: Sendable {
    /// Where the API server is and how to talk to it.
    public struct Configuration: Sendable {
        /// Base URL, e.g. `https://10.96.0.1:443`.
        public var serverURL: String
        /// PEM file with the CA(s) that sign the API server's certificate.
        public var caFile: String
        /// File with the bearer token (the agent's own service-account token); nil for none.
        public var tokenFile: String?
        /// Limit for one request, connect to last byte.
        public var timeout: Duration
        /// Largest response body accepted.
        public var maxResponseBytes: Int
        /// Which key exchanges its TLS takes (`--tls-policy`).
        public var tlsPolicy: TLSPolicy = Defaults.Links.tlsPolicy

        /// The in-cluster defaults: the API server from `KUBERNETES_SERVICE_HOST`/`_PORT`, the
        /// service account's mounted CA and token.
        public static let serviceAccountDirectory = "/var/run/secrets/kubernetes.io/serviceaccount"

        public init(
            serverURL: String, caFile: String = Self.serviceAccountDirectory + "/ca.crt",
            tokenFile: String? = Self.serviceAccountDirectory + "/token", timeout: Duration = .seconds(10),
            maxResponseBytes: Int = 1 << 20
        ) {
            self.serverURL = serverURL.hasSuffix("/") ? String(serverURL.dropLast()) : serverURL
            self.caFile = caFile
            self.tokenFile = tokenFile
            self.timeout = timeout
            self.maxResponseBytes = maxResponseBytes
        }

        /// ``serverURL`` as it may be logged: credentials in it redacted.
        public var displayURL: String { URLText.redactingUserinfo(serverURL) }

        /// The API server URL the pod environment names, if any.
        public static func inClusterServerURL(environment: [String: String] = ProcessInfo.processInfo.environment) -> String? {
            guard let host = environment["KUBERNETES_SERVICE_HOST"], !host.isEmpty else { return nil }
            let port = environment["KUBERNETES_SERVICE_PORT"] ?? "443"
            return host.contains(":") ? "https://[\(host)]:\(port)" : "https://\(host):\(port)"
        }
    }

    public let configuration: Configuration
    private let http: HTTPClient
    /// For watches: no read timeout (a quiet watch sends nothing for minutes); the server ends it.
    private let streamingHTTP: HTTPClient

    /// Loads the CA file; fails with a message naming it.
    public init(configuration: Configuration) throws(KubernetesAPIError) {
        guard configuration.serverURL.hasPrefix("https://") else {
            throw KubernetesAPIError(message: "API server URL '\(configuration.displayURL)' is not https://", isTransient: false)
        }
        let roots: [NIOSSLCertificate]
        do {
            roots = try NIOSSLCertificate.fromPEMFile(configuration.caFile)
        } catch {
            throw KubernetesAPIError(message: "cannot load the API server CA from \(configuration.caFile): \(error)", isTransient: false)
        }
        guard !roots.isEmpty else {
            throw KubernetesAPIError(message: "\(configuration.caFile) holds no certificate", isTransient: false)
        }
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .certificates(roots)
        tls.minimumTLSVersion = configuration.tlsPolicy == .pqc ? .tlsv13 : .tlsv12
        tls.curves = configuration.tlsPolicy.curves
        let timeout = TimeAmount.nanoseconds(Int64(configuration.timeout.components.seconds) * 1_000_000_000)
        var httpConfiguration = HTTPClient.Configuration(
            tlsConfiguration: tls, redirectConfiguration: .disallow,
            timeout: .init(connect: timeout, read: timeout))
        httpConfiguration.httpVersion = .http1Only
        self.configuration = configuration
        self.http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: httpConfiguration)
        var streamingConfiguration = httpConfiguration
        streamingConfiguration.timeout = .init(connect: timeout, read: nil)
        self.streamingHTTP = HTTPClient(eventLoopGroupProvider: .singleton, configuration: streamingConfiguration)
    }

    /// GET `path` (e.g. `/openid/v1/jwks`); the body of a 200 answer.
    public func get(_ path: String) async throws(KubernetesAPIError) -> Data {
        try await send(method: .GET, path: path, json: nil)
    }

    /// POST `json` to `path`; the body of a 200 or 201 answer.
    public func post(_ path: String, json: Data) async throws(KubernetesAPIError) -> Data {
        try await send(method: .POST, path: path, json: json)
    }

    /// GET `path` as a stream of newline-separated JSON documents (a watch), handing each line to
    /// `onLine` as it arrives; returns when the server ends the response. Lines are bounded by
    /// ``Configuration/maxResponseBytes``; `deadline` bounds the whole response.
    public func streamLines(
        _ path: String, deadline: Duration, onLine: (Data) async -> Void
    ) async throws(KubernetesAPIError) {
        let what = "GET \(configuration.displayURL)\(path)"
        do {
            let request = try makeRequest(method: .GET, path: path, json: nil)
            let response = try await streamingHTTP.execute(request, timeout: .seconds(deadline.components.seconds))
            guard response.status.code == 200 else {
                let body = try await response.body.collect(upTo: 4096)
                let transient = response.status.code >= 500 || response.status.code == 429
                throw KubernetesAPIError(
                    message: "\(what): HTTP \(response.status.code) \(String(buffer: body).prefix(300))", isTransient: transient)
            }
            var pending = Data()
            for try await chunk in response.body {
                pending.append(contentsOf: chunk.readableBytesView)
                while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                    let line = pending[pending.startIndex..<newline]
                    if !line.isEmpty { await onLine(Data(line)) }
                    pending.removeSubrange(pending.startIndex...newline)
                }
                guard pending.count <= configuration.maxResponseBytes else {
                    throw KubernetesAPIError(message: "\(what): a line longer than \(configuration.maxResponseBytes) bytes", isTransient: true)
                }
            }
            if !pending.isEmpty { await onLine(pending) }
        } catch let error as KubernetesAPIError {
            throw error
        } catch {
            throw KubernetesAPIError(message: "\(what): \(error)", isTransient: true)
        }
    }

    /// Closes the connection pools.
    /// Closes the clients, waiting at most a second: AsyncHTTPClient's shutdown waits for a
    /// connection still being set up (a TLS handshake with an API server that hangs, up to the
    /// request timeout), which would hold the agent's SIGTERM past its grace period.
    public func shutdown() async {
        let (http, streamingHTTP) = (self.http, self.streamingHTTP)
        await waitAtMost(.seconds(1)) {
            try? await http.shutdown()
            try? await streamingHTTP.shutdown()
        }
    }

    private func makeRequest(method: HTTPMethod, path: String, json: Data?) throws(KubernetesAPIError) -> HTTPClientRequest {
        var request = HTTPClientRequest(url: configuration.serverURL + path)
        request.method = method
        request.headers.add(name: "Accept", value: "application/json")
        if let json {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: json))
        }
        if let tokenFile = configuration.tokenFile {
            guard let token = try? String(contentsOfFile: tokenFile, encoding: .utf8).trimmed, !token.isEmpty
            else {
                throw KubernetesAPIError(message: "cannot read the agent's own token from \(tokenFile)", isTransient: true)
            }
            request.headers.add(name: "Authorization", value: "Bearer \(token)")
        }
        return request
    }

    private func send(method: HTTPMethod, path: String, json: Data?) async throws(KubernetesAPIError) -> Data {
        let request = try makeRequest(method: method, path: path, json: json)
        let what = "\(method) \(configuration.displayURL)\(path)"
        do {
            let response = try await http.execute(request, timeout: .seconds(configuration.timeout.components.seconds))
            let body = try await response.body.collect(upTo: configuration.maxResponseBytes)
            guard (200...201).contains(response.status.code) else {
                let detail = String(buffer: body).prefix(300)
                // 5xx and 429 may pass; 4xx (bad token, missing RBAC) will not without a change.
                let transient = response.status.code >= 500 || response.status.code == 429
                throw KubernetesAPIError(message: "\(what): HTTP \(response.status.code) \(detail)", isTransient: transient)
            }
            return Data(body.readableBytesView)
        } catch let error as KubernetesAPIError {
            throw error
        } catch {
            throw KubernetesAPIError(message: "\(what): \(error)", isTransient: true)
        }
    }
}

/// A failed API call; `isTransient` when retrying later may succeed (network, 5xx).
public struct KubernetesAPIError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public var isTransient: Bool
    public init(message: String, isTransient: Bool) {
        self.message = message
        self.isTransient = isTransient
    }
    public var description: String { message }
}
