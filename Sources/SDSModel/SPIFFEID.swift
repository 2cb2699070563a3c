/// A SPIFFE ID: `spiffe://<trust-domain>/<path>`.
///
/// Workload identities have the Kubernetes form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
/// Parsing follows the SPIFFE ID specification: lowercase trust domain of `[a-z0-9.-_]`, a path of
/// non-empty segments of `[A-Za-z0-9.-_]`, no query, fragment, port or user info.
public struct SPIFFEID: Hashable, Sendable, CustomStringConvertible, Comparable {
    /// The trust domain, e.g. `cluster.local`.
    public let trustDomain: String
    /// The path including its leading `/`, or the empty string for the trust domain's own ID.
    public let path: String

    /// Parses and validates a SPIFFE ID.
    public init(parsing string: String) throws(SPIFFEIDError) {
        let scheme = "spiffe://"
        guard string.hasPrefix(scheme) else { throw SPIFFEIDError("missing 'spiffe://' scheme", string) }
        let rest = string.dropFirst(scheme.count)
        let trustDomain: Substring
        let path: Substring
        if let slash = rest.firstIndex(of: "/") {
            trustDomain = rest[..<slash]
            path = rest[slash...]
        } else {
            trustDomain = rest
            path = ""
        }
        try self.init(trustDomain: String(trustDomain), path: String(path))
    }

    /// Creates an ID from a trust domain and a path (empty, or starting with `/`).
    public init(trustDomain: String, path: String) throws(SPIFFEIDError) {
        guard Self.isValidTrustDomain(trustDomain) else {
            throw SPIFFEIDError("invalid trust domain (lowercase letters, digits, '.', '-', '_'; at most 255)", trustDomain)
        }
        if !path.isEmpty {
            guard path.hasPrefix("/") else { throw SPIFFEIDError("path must start with '/'", path) }
            let segments = path.dropFirst().split(separator: "/", omittingEmptySubsequences: false)
            for segment in segments {
                guard !segment.isEmpty, segment != ".", segment != "..",
                    segment.utf8.allSatisfy(Self.isPathByte)
                else { throw SPIFFEIDError("invalid path segment '\(segment)'", path) }
            }
        }
        guard "spiffe://".utf8.count + trustDomain.utf8.count + path.utf8.count <= 2048 else {
            throw SPIFFEIDError("longer than 2048 bytes", trustDomain + path)
        }
        self.trustDomain = trustDomain
        self.path = path
    }

    /// The Kubernetes workload ID `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>`.
    public init(trustDomain: String, namespace: String, serviceAccount: String) throws(SPIFFEIDError) {
        guard KubernetesName.isValid(namespace) else { throw SPIFFEIDError("invalid namespace", namespace) }
        guard KubernetesName.isValid(serviceAccount) else {
            throw SPIFFEIDError("invalid service account name", serviceAccount)
        }
        try self.init(trustDomain: trustDomain, path: "/ns/\(namespace)/sa/\(serviceAccount)")
    }

    /// The ID of the trust domain itself, `spiffe://<trustDomain>`.
    public var trustDomainID: SPIFFEID {
        // Safe: `trustDomain` was validated when `self` was made.
        try! SPIFFEID(trustDomain: self.trustDomain, path: "")
    }

    public var description: String { "spiffe://\(trustDomain)\(path)" }

    public static func < (lhs: SPIFFEID, rhs: SPIFFEID) -> Bool { lhs.description < rhs.description }

    /// Whether `name` is a valid trust domain name.
    public static func isValidTrustDomain(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 255
            && name.utf8.allSatisfy { byte in
                (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
                    || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
                    || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_")
            }
    }

    private static func isPathByte(_ byte: UInt8) -> Bool {
        (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
            || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
            || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
            || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_")
    }
}

/// Why a string is not a valid SPIFFE ID.
public struct SPIFFEIDError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What is wrong, in words.
    public let reason: String
    /// The offending input.
    public let input: String

    init(_ reason: String, _ input: some StringProtocol) {
        self.reason = reason
        self.input = String(input)
    }

    public var description: String { "invalid SPIFFE ID '\(input)': \(reason)" }
}

/// Kubernetes object names as used for namespaces and service accounts (RFC 1123 subdomain).
public enum KubernetesName {
    /// Lowercase alphanumerics, '-' and '.', starting and ending alphanumeric, at most 253 bytes.
    public static func isValid(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard let first = bytes.first, let last = bytes.last, bytes.count <= 253 else { return false }
        func isAlnum(_ b: UInt8) -> Bool {
            (b >= UInt8(ascii: "a") && b <= UInt8(ascii: "z")) || (b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9"))
        }
        return isAlnum(first) && isAlnum(last)
            && bytes.allSatisfy { isAlnum($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: ".") }
    }
}

extension SPIFFEID {
    /// The namespace and service account of a Kubernetes workload ID (`/ns/NS/sa/SA`), each a
    /// valid Kubernetes name; nil for any other path.
    public var kubernetesServiceAccount: (namespace: String, serviceAccount: String)? {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 5, parts[0].isEmpty, parts[1] == "ns", parts[3] == "sa",
            KubernetesName.isValid(String(parts[2])), KubernetesName.isValid(String(parts[4]))
        else { return nil }
        return (String(parts[2]), String(parts[4]))
    }
}
