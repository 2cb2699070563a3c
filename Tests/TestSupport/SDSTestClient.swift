import EnvoyAPI
import GRPCCore

public typealias DiscoveryRequest = Envoy_Service_Discovery_V3_DiscoveryRequest
public typealias DiscoveryResponse = Envoy_Service_Discovery_V3_DiscoveryResponse
public typealias EnvoySecret = Envoy_Extensions_TransportSockets_Tls_V3_Secret

/// Drives one StreamSecrets call request by request, as Envoy would.
public struct SDSStreamSession {
    let requests: AsyncStream<DiscoveryRequest>.Continuation
    var responses: RPCAsyncSequence<DiscoveryResponse, any Error>.AsyncIterator

    /// Sends a request on the stream.
    public func send(_ request: DiscoveryRequest) { requests.yield(request) }

    /// The next response, or nil when the server ended the stream.
    public mutating func next() async throws -> DiscoveryResponse? { try await responses.next() }

    /// Half-closes the stream from the client side.
    public func finish() { requests.finish() }
}

public enum SDSTestClient {
    public static let secretTypeURL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

    /// Metadata carrying `token` the way Envoy's file-based call credentials do.
    public static func metadata(token: String?, header: String = "istio_sds_credentials_header-bin") -> Metadata {
        var metadata = Metadata()
        if let token { metadata.addBinary(Array(token.utf8), forKey: header) }
        return metadata
    }

    /// A request like Envoy's: names, the Secret type URL, and optionally version/nonce/error.
    public static func request(_ names: [String], version: String = "", nonce: String = "", error: String? = nil, node: Bool = false)
        -> DiscoveryRequest
    {
        var request = DiscoveryRequest()
        request.resourceNames = names
        request.typeURL = secretTypeURL
        request.versionInfo = version
        request.responseNonce = nonce
        if node {
            request.node.id = "test-node"
            request.node.cluster = "test-cluster"
        }
        if let error {
            request.errorDetail.code = 13
            request.errorDetail.message = error
        }
        return request
    }

    /// Opens a StreamSecrets call with `metadata` and runs `body` with it.
    public static func withStream<Transport: ClientTransport, Result: Sendable>(
        _ client: Envoy_Service_Secret_V3_SecretDiscoveryService.Client<Transport>, metadata: Metadata,
        options: CallOptions = .defaults, _ body: @Sendable @escaping (inout SDSStreamSession) async throws -> Result
    ) async throws -> Result {
        let (stream, continuation) = AsyncStream.makeStream(of: DiscoveryRequest.self)
        let request = StreamingClientRequest<DiscoveryRequest>(metadata: metadata) { writer in
            for await message in stream { try await writer.write(message) }
        }
        return try await client.streamSecrets(request: request, options: options) { response in
            var session = SDSStreamSession(requests: continuation, responses: try response.messages.makeAsyncIterator())
            defer { continuation.finish() }
            return try await body(&session)
        }
    }

    /// Decodes the Secrets in a response.
    public static func secrets(in response: DiscoveryResponse) throws -> [EnvoySecret] {
        try response.resources.map { try EnvoySecret(unpackingAny: $0) }
    }
}
