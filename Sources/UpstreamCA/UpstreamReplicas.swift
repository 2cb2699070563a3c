import CertificateAuthority
import CoreMetrics
import FoundationEssentials
import Glibc
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import NIOCore
import NIOPosix
import SDSModel
import TLSLinks
import Synchronization
import X509

/// The replicas of the upstream CA: one gRPC client per address, from `--upstream-ca`'s list of
/// `HOST:PORT` (an IP address is one replica; a DNS name, such as a headless Service, is one
/// replica per address it resolves to, resolved again every ``resolveInterval``).
///
/// Calls go round-robin over the replicas last seen answering; a call that fails transiently is
/// tried at once on the next one (``UpstreamCA/issue(csr:for:ttl:credential:)``). Each replica
/// keeps its own reachability (`sds_agent_upstream_ca_endpoint_up{endpoint}`); the CA is
/// reachable while one of them is.
final class UpstreamReplicas: Sendable {
    /// One address of the CA, with its own connection, TLS check and reachability.
    final class Replica: Sendable {
        /// `ADDRESS:PORT` (or the configured `HOST:PORT` while a name does not resolve).
        let endpoint: String
        /// The configured `HOST:PORT` it came from.
        let configured: HostPort
        let client: GRPCClient<HTTP2ClientTransport.Posix>
        let verifier: UpstreamServerVerifier
        private let state = Mutex<Bool?>(nil)
        private let gauge: Gauge

        init(endpoint: String, configured: HostPort, client: GRPCClient<HTTP2ClientTransport.Posix>, verifier: UpstreamServerVerifier, metrics: any MetricsFactory) {
            self.endpoint = endpoint
            self.configured = configured
            self.client = client
            self.verifier = verifier
            self.gauge = Gauge(label: "sds_agent_upstream_ca_endpoint_up", dimensions: [("endpoint", endpoint)], factory: metrics)
        }

        /// Whether its last call reached it (nil before the first).
        var reachable: Bool? { state.withLock { $0 } }

        /// Records a call's outcome; returns the previous state.
        @discardableResult
        func mark(_ reachable: Bool) -> Bool? {
            gauge.record(reachable ? 1 : 0)
            return state.withLock { state in
                defer { state = reachable }
                return state
            }
        }
    }

    private struct State {
        var replicas: [Replica] = []
        var next = 0
        /// The roots of the CA's last answer, trusted for its TLS beside the bundle's.
        var answered: [Certificate] = []
    }

    let configuration: UpstreamCA.Configuration
    private let roots: [Certificate]
    private let logger: Logger
    private let metrics: any MetricsFactory
    private let now: @Sendable () -> Date
    private let state: Mutex<State>
    /// How often DNS names are resolved again (a replica set that scales or moves).
    let resolveInterval: Duration
    /// The key exchange of every connection to a replica, logged, counted and held to `--tls-policy`.
    private let report: KeyExchangeReport

    init(
        configuration: UpstreamCA.Configuration, roots: [Certificate], logger: Logger, metrics: any MetricsFactory,
        now: @escaping @Sendable () -> Date, resolveInterval: Duration = .seconds(30)
    ) throws(UpstreamCAError) {
        self.configuration = configuration
        self.roots = roots
        self.logger = logger
        self.metrics = metrics
        self.now = now
        self.resolveInterval = resolveInterval
        self.report = KeyExchangeReport(link: "upstream_ca", policy: configuration.tlsPolicy, logger: logger, metrics: metrics)
        state = Mutex(State())
        var replicas: [Replica] = []
        for endpoint in configuration.endpoints {
            // IP addresses now; names once `run` resolves them (a dialled name until then).
            replicas.append(try makeReplica(endpoint, address: Self.isIPAddress(endpoint.host) ? endpoint.host : nil))
        }
        state.withLock { $0.replicas = replicas }
    }

    /// Every replica now.
    var all: [Replica] { state.withLock { $0.replicas } }

    /// The CA is reachable while a replica is; unreachable once every replica failed; nil before
    /// any answer.
    var reachable: Bool? {
        let states = all.map(\.reachable)
        if states.contains(true) { return true }
        if !states.isEmpty, states.allSatisfy({ $0 == false }) { return false }
        return nil
    }

    /// The next replica to try, round-robin, skipping `tried`: one last seen answering (or not yet
    /// called) first, else any other; nil once every replica was tried.
    func next(excluding tried: Set<String>) -> Replica? {
        state.withLock { state in
            let count = state.replicas.count
            guard count > 0 else { return nil }
            let start = state.next % count
            let order = (0..<count).map { state.replicas[(start + $0) % count] }.filter { !tried.contains($0.endpoint) }
            guard let pick = order.first(where: { $0.reachable != false }) ?? order.first else { return nil }
            state.next = (state.replicas.firstIndex { $0 === pick } ?? start) + 1
            return pick
        }
    }

    /// Keeps every replica's connection, resolving names again every ``resolveInterval`` on
    /// `clock`: a new address gets a replica, a gone one is closed.
    func run(clock: any Clock<Duration>) async {
        await withDiscardingTaskGroup { group in
            var running = Set<ObjectIdentifier>()
            let named = configuration.endpoints.filter { !Self.isIPAddress($0.host) }
            while !Task.isCancelled {
                if !named.isEmpty { await resolve(named) }
                for replica in all where running.insert(ObjectIdentifier(replica)).inserted {
                    group.addTask { try? await replica.client.runConnections() }
                }
                do {
                    try await clock.sleep(for: resolveInterval)
                } catch {
                    break
                }
            }
            for replica in all { replica.client.beginGracefulShutdown() }
        }
    }

    /// Trusts the roots of the CA's last answer for every replica's TLS, now and later.
    func trust(answered roots: [Certificate]) {
        let replicas = state.withLock { state in
            state.answered = roots
            return state.replicas
        }
        for replica in replicas { replica.verifier.trust(answered: roots) }
    }

    /// Closes every connection; calls in flight finish first.
    func shutdown() {
        for replica in all { replica.client.beginGracefulShutdown() }
    }

    /// Resolves each name; replaces its replicas when the addresses changed. A name that does not
    /// resolve keeps the replicas it has.
    private func resolve(_ names: [HostPort]) async {
        for name in names {
            let addresses = await Self.addresses(of: name.host)
            guard !addresses.isEmpty else {
                logger.warning("upstream CA: the name does not resolve now; keeping its replicas", metadata: ["ca": "\(name)"])
                continue
            }
            let wanted = Set(addresses.map { HostPort(host: $0, port: name.port).description })
            let current = all.filter { $0.configured == name }
            let have = Set(current.map(\.endpoint))
            guard wanted != have else { continue }
            var fresh: [Replica] = []
            for address in addresses where !have.contains(HostPort(host: address, port: name.port).description) {
                if let replica = try? makeReplica(name, address: address) { fresh.append(replica) }
            }
            let gone = current.filter { !wanted.contains($0.endpoint) }
            state.withLock { state in
                state.replicas.removeAll { replica in gone.contains { $0 === replica } }
                state.replicas += fresh
            }
            for replica in gone { replica.client.beginGracefulShutdown() }
            logger.notice(
                "upstream CA: replicas of the name changed",
                metadata: ["ca": "\(name)", "endpoints": .list(all.filter { $0.configured == name }.map(\.endpoint))])
        }
    }

    /// A client for `configured`, dialling `address` (a resolved address of a name, or the name
    /// itself when nil). The certificate is checked for `--upstream-ca-server-name`, else the
    /// configured host, whatever address was dialled.
    private func makeReplica(_ configured: HostPort, address: String?) throws(UpstreamCAError) -> Replica {
        let target: any ResolvableTarget
        let dialled = address ?? configured.host
        if dialled.contains(":") {
            target = .ipv6(address: dialled, port: configured.port)
        } else if Self.isIPAddress(dialled) {
            target = .ipv4(address: dialled, port: configured.port)
        } else {
            target = .dns(host: dialled, port: configured.port)
        }
        let referenceName = configuration.serverName ?? configured.host
        let verifier = UpstreamServerVerifier(roots: roots, referenceName: referenceName, now: now)
        verifier.trust(answered: state.withLock { $0.answered })
        let bundle = configuration.serverBundleFile
        do {
            let transport = try HTTP2ClientTransport.Posix(
                target: target,
                transportSecurity: .tls { tls in
                    tls.trustRoots = .certificates([.file(path: bundle, format: .pem)])
                    tls.serverCertificateVerification = .fullVerification
                    // Our own check replaces BoringSSL's: the configured name is the only identity.
                    tls.customVerificationCallback = verifier.callback
                },
                config: .defaults { config in
                    // Back soon after an outage: the default backoff grows to two minutes.
                    config.backoff = .init(initial: .milliseconds(250), max: .seconds(5), multiplier: 1.6, jitter: 0.2)
                    config.connection.maxIdleTime = .seconds(24 * 3600)
                    // A name other than the address: verified in the certificate and sent as SNI.
                    if !Self.isIPAddress(referenceName) { config.http2.authority = referenceName }
                    // Before the TLS handler: the key exchange read from the ServerHello, held to the policy.
                    config.channelDebuggingCallbacks.onCreateTCPConnection = { [report, policy = configuration.tlsPolicy] channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(
                                KeyExchangeGuard(role: .client, policy: policy, report: report), position: .first)
                        }
                    }
                })
            return Replica(
                endpoint: HostPort(host: dialled, port: configured.port).description, configured: configured,
                client: GRPCClient(transport: transport), verifier: verifier, metrics: metrics)
        } catch {
            throw UpstreamCAError("cannot set up the client for \(configured): \(error)")
        }
    }

    /// The IPv4 and IPv6 addresses of `host` (getaddrinfo on NIO's thread pool: a slow resolver
    /// must not hold a thread of the cooperative pool), sorted; empty when it does not resolve.
    static func addresses(of host: String) async -> [String] {
        let lookup: @Sendable () -> [String] = {
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            var list: UnsafeMutablePointer<addrinfo>?
            guard getaddrinfo(host, nil, &hints, &list) == 0, let first = list else { return [] }
            defer { freeaddrinfo(list) }
            var found = Set<String>()
            var entry: UnsafeMutablePointer<addrinfo>? = first
            while let current = entry {
                var buffer = [CChar](repeating: 0, count: Int(NI_MAXHOST))
                if getnameinfo(current.pointee.ai_addr, current.pointee.ai_addrlen, &buffer, socklen_t(buffer.count), nil, 0, NI_NUMERICHOST) == 0 {
                    found.insert(String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
                }
                entry = current.pointee.ai_next
            }
            return found.sorted()
        }
        return (try? await NIOThreadPool.singleton.runIfActive(lookup)) ?? []
    }

    /// An IPv4 or IPv6 literal (the same test the serving certificate uses for IP SANs).
    static func isIPAddress(_ text: String) -> Bool { SigningAuthority.addressBytes(text) != nil }
}
