// swift-tools-version:6.0
// Builds the two protoc plugins that scripts/generate-protos.sh needs.
// Only a developer who changes Protos/ builds this (it takes minutes); CI never does.
import PackageDescription

let package = Package(
    name: "protoc-plugins",
    dependencies: [
        .package(url: "https://github.com/apple/swift-protobuf.git", exact: "1.39.0"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", exact: "2.4.1"),
    ],
    targets: [
        // SwiftPM needs one target of its own; the products we build come from the dependencies.
        .target(name: "Placeholder", path: "Placeholder")
    ]
)
