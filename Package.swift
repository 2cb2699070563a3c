// swift-tools-version:6.1
import PackageDescription

// Linux only: the agent runs on Kubernetes nodes and uses Glibc, SO_PEERCRED and /proc; nothing
// here builds or tests another platform, so no platform is claimed.
let package = Package(
    name: "sds-agent",
    products: [
        .executable(name: "sds-agent", targets: ["sds-agent"])
    ],
    dependencies: [
        .package(url: "https://github.com/grpc/grpc-swift-2.git", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", from: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-asn1.git", from: "1.7.4"),
        .package(url: "https://github.com/vapor/jwt-kit.git", from: "5.8.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.3"),
        .package(url: "https://github.com/apple/swift-nio-http2.git", from: "1.46.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        // Already in the graph through grpc-swift-nio-transport: `ca serve` swaps its TLS
        // certificate after a root rotation through its CertificateReloader protocol.
        .package(url: "https://github.com/apple/swift-nio-extras.git", from: "1.35.2"),
    ],
    targets: [
        // Executable: parses the command line, bootstraps logging, runs the agent. Thin.
        .executableTarget(
            name: "sds-agent",
            dependencies: [
                "SDSAgent", "SDSModel", "SDSServer", "SecretCache", "WorkloadAuthentication", "EnvoyAPI", "KubernetesAPI",
                "UpstreamCA", "WorkloadServing", "TokenKeys",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            linkerSettings: [
                // The image ships this binary stripped. Swift links executables with every symbol
                // exported (`--export-dynamic`): 5 MB of dynamic symbol table that stripping keeps
                // and nothing looks up. Relative relocations packed as RELR (glibc 2.36+; the
                // image's Ubuntu 24.04 has 2.39): 2.6 MB of `.rela.dyn` become a few KB.
                .unsafeFlags(
                    ["-Xlinker", "--no-export-dynamic"],
                    .when(platforms: [.linux])),
                // The Swift runtime and Foundation linked statically into this binary alone (the
                // image has no Swift runtime), at link time only: SwiftPM's --static-swift-stdlib
                // also compiles every module against the static resource directory, which has no
                // Swift Testing, so the tests could not share the release build with the image.
                // The static FoundationEssentials' own dependencies, which the dynamic modules we
                // compile against do not name for the linker.
                .unsafeFlags(
                    ["-static-stdlib", "-l_FoundationCollections", "-l_FoundationCShims"],
                    .when(platforms: [.linux], configuration: .release)),
            ]
        ),
        // Composition root: validated configuration -> components, the UDS listener, the ServiceGroup.
        .target(
            name: "SDSAgent",
            dependencies: [
                "SDSModel", "SDSServer", "SecretCache", "CertificateAuthority", "WorkloadAuthentication", "KubernetesAPI",
                "UpstreamCA", "CentralCA", "IstioAPI", "WorkloadAPI", "SPIFFEAPI", "WorkloadServing", "TLSLinks",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOCertificateReloading", package: "swift-nio-extras"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The SDS gRPC service, the per-stream state machine and the Envoy proto builders.
        .target(
            name: "SDSServer",
            dependencies: [
                "SDSModel", "EnvoyAPI", "WorkloadServing", "WorkloadAuthentication",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // What every service on the agent's sockets shares: admission of callers, the seams they
        // serve from (secrets, federated bundles; providers conform in the composition root), and
        // how a failure becomes a status.
        .target(
            name: "WorkloadServing",
            dependencies: [
                "SDSModel", "WorkloadAuthentication",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The SPIFFE Workload API on the peer-attested socket (X.509- and JWT-SVIDs, bundles).
        .target(
            name: "WorkloadAPI",
            dependencies: [
                "SDSModel", "WorkloadServing", "SPIFFEAPI",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Identities' current secrets: local key generation, CSR, issuance through the CA seam.
        .target(
            name: "SecretCache",
            dependencies: [
                "SDSModel", "CertificateAuthority",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // CertificateIssuer protocol and the embedded CA (root generation, persistence, signing).
        // PKCS#11's C interface as p11-kit ships it (types and constants; modules are loaded with
        // dlopen at run time). C because no Swift package speaks PKCS#11.
        .systemLibrary(name: "CPKCS11", pkgConfig: "p11-kit-1", providers: [.apt(["libp11-kit-dev"])]),
        // CA keys in a PKCS#11 token: swift-certificates' custom private key over C_Sign.
        .target(
            name: "TokenKeys",
            dependencies: [
                "CPKCS11", "SDSModel",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ]
        ),
        .target(
            name: "CertificateAuthority",
            dependencies: [
                "SDSModel", "TokenKeys",
                .product(name: "JWTKit", package: "jwt-kit"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // Caller authentication: Kubernetes service-account JWT verification (JWKS file, OIDC
        // discovery, TokenReview), authorization and peer policies.
        .target(
            name: "WorkloadAuthentication",
            dependencies: [
                "SDSModel", "KubernetesAPI",
                .product(name: "JWTKit", package: "jwt-kit"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // HTTPS to the Kubernetes API server with the agent's own token and the cluster CA.
        .target(
            name: "KubernetesAPI",
            dependencies: [
                "SDSModel", "TLSLinks",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        // The agent's own TLS links held to --tls-policy: the key exchange read from the wire.
        .target(
            name: "TLSLinks",
            dependencies: [
                "SDSModel",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // A remote CA behind Istio's CSR API (istiod, istio-csr, `sds-agent ca serve`): the
        // CertificateIssuer seam's second implementation, a gRPC client over TLS.
        .target(
            name: "UpstreamCA",
            dependencies: [
                "SDSModel", "CertificateAuthority", "IstioAPI", "TLSLinks",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                // The CA's TLS certificate is verified by our own callback (RFC 6125 names).
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOCore", package: "swift-nio"),
                // getaddrinfo for the replicas of a name, on NIO's thread pool.
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // `sds-agent ca serve`: Istio's CSR API in front of the embedded CA, with istiod's rules.
        .target(
            name: "CentralCA",
            dependencies: [
                "SDSModel", "CertificateAuthority", "IstioAPI", "WorkloadAuthentication", "KubernetesAPI",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Small shared value types.
        .target(name: "SDSModel", dependencies: [.product(name: "Logging", package: "swift-log")]),
        // Generated from Protos/ by scripts/generate-protos.sh. Do not edit.
        .target(
            name: "EnvoyAPI",
            dependencies: [
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
            ],
            exclude: ["PROTOS.sha256"]
        ),
        // Generated from Protos/security/ (Istio's CA API) by scripts/generate-protos.sh. Do not edit.
        .target(
            name: "IstioAPI",
            dependencies: [
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
            ]
        ),

        // Generated from Protos/spiffe/ (the SPIFFE Workload API) by scripts/generate-protos.sh. Do not edit.
        .target(
            name: "SPIFFEAPI",
            dependencies: [
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
            ]
        ),

        .testTarget(name: "SDSModelTests", dependencies: ["SDSModel"]),
        .testTarget(
            name: "TLSLinksTests",
            dependencies: [
                "TLSLinks", "SDSModel", "TestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .testTarget(
            name: "WorkloadAuthenticationTests",
            dependencies: [
                "WorkloadAuthentication", "KubernetesAPI", "TestSupport", .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .testTarget(
            name: "CertificateAuthorityTests",
            dependencies: [
                "CertificateAuthority", "TestSupport",
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .testTarget(
            name: "SecretCacheTests",
            dependencies: [
                "SecretCache", "TestSupport", .product(name: "X509", package: "swift-certificates"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
            ]
        ),
        .testTarget(
            name: "SDSServerTests",
            dependencies: [
                "SDSServer", "SDSModel", "EnvoyAPI", "TestSupport", "SecretCache", "WorkloadAuthentication", "CertificateAuthority",
                "WorkloadServing", "SDSAgent",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCInProcessTransport", package: "grpc-swift-2"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .testTarget(
            name: "UpstreamCATests",
            dependencies: [
                "UpstreamCA", "CentralCA", "CertificateAuthority", "SecretCache", "WorkloadAuthentication", "SDSModel", "TestSupport",
                "IstioAPI",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
            ]
        ),
        .testTarget(
            name: "SDSAgentTests",
            dependencies: [
                "SDSAgent", "SDSModel", "SDSServer", "SecretCache", "WorkloadAuthentication", "EnvoyAPI", "TestSupport",
                "CertificateAuthority", .product(name: "X509", package: "swift-certificates"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ]
        ),
        // Measures a real sds-agent process over its socket (scripts/bench.sh); not shipped.
        .executableTarget(
            name: "sds-agent-bench",
            dependencies: [
                "EnvoyAPI", "TestSupport", "SDSAgent", "IstioAPI", "CertificateAuthority", "SDSModel",
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
            ],
            path: "Benchmarks/sds-agent-bench"
        ),
        // Fuzz targets (scripts/fuzz.sh builds them with libFuzzer; a plain build replays the corpus).
        .executableTarget(
            name: "sds-agent-fuzz",
            dependencies: [
                "SDSAgent", "SDSModel", "SDSServer", "CertificateAuthority", "WorkloadAuthentication", "EnvoyAPI", "TestSupport",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ],
            path: "Fuzz/sds-agent-fuzz"
        ),
        // PKI and token fixtures built in code, shared by the test targets.
        .target(
            name: "TestSupport",
            dependencies: [
                "SDSModel", "CertificateAuthority", "EnvoyAPI", "SDSServer",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            path: "Tests/TestSupport"
        ),
    ],
    swiftLanguageModes: [.v6]
)

// The shipped modules import FoundationEssentials, not Foundation (whose ICU data is most of a
// static binary): with member import visibility, a Foundation-only API used by mistake through a
// dependency's import is a compile error, not a silent link of Foundation.
let shipped: Set<String> = [
    "sds-agent", "SDSAgent", "SDSServer", "SecretCache", "CertificateAuthority", "WorkloadAuthentication", "KubernetesAPI",
    "UpstreamCA", "CentralCA", "SDSModel", "WorkloadAPI", "WorkloadServing", "TokenKeys", "TLSLinks",
]
for target in package.targets where shipped.contains(target.name) {
    target.swiftSettings = (target.swiftSettings ?? []) + [.enableUpcomingFeature("MemberImportVisibility")]
}

// The libFuzzer build (scripts/fuzz.sh sets SDS_FUZZ=1): our own modules get libFuzzer's coverage
// and the fuzz driver links its runtime. The dependencies keep the release build's objects, in
// the same scratch, so the fuzz build recompiles only this package's modules.
if Context.environment["SDS_FUZZ"] == "1" {
    for target in package.targets where shipped.contains(target.name) || target.name == "sds-agent-fuzz" {
        target.swiftSettings = (target.swiftSettings ?? []) + [.unsafeFlags(["-sanitize=fuzzer"]), .define("FUZZING")]
    }
    for target in package.targets where target.name == "sds-agent-fuzz" {
        // lld: gold fails on the fuzzer runtime's objects (an internal error in its DWARF reader).
        target.linkerSettings = [.unsafeFlags(["-sanitize=fuzzer", "-use-ld=lld"])]
    }
}
