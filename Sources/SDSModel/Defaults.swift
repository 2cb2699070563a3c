/// Every default the agent's settings share, written once and read by the flags, the
/// configuration types and the components alike (a default in two places drifts).
public enum Defaults {
    /// Names Envoy asks for.
    public enum Names {
        /// The workload certificate (Istio's name).
        public static let workloadSecret = "default"
        /// The trust bundle (Istio's name); `spiffe://<trust-domain>` is served as well.
        public static let rootCA = "ROOTCA"
        /// Every trust domain's roots for Envoy's SPIFFE validator (SPIRE's name).
        public static let allBundles = "ALL"
    }

    /// How callers present and we accept their tokens.
    public enum Tokens {
        /// The gRPC metadata key of the raw token: what Envoy's file-based call credentials send
        /// (Istio's header name); `authorization: Bearer` is accepted as well.
        public static let header = "istio_sds_credentials_header-bin"
        /// The audience of the tokens `serve` accepts.
        public static let audience = "sds-agent"
        /// The audience istiod and `ca serve` accept (Istio's default).
        public static let istioCAAudience = "istio-ca"
        /// Clock skew tolerated on `exp`, `nbf`, `iat`.
        public static let clockSkew: Duration = .seconds(30)
        /// A stream ends this long before the token it was opened with expires.
        public static let expiryMargin: Duration = .seconds(30)
        /// Lifetime of the JWT-SVIDs the agent signs, for the Workload API and SDS (`--jwt-svid-ttl`).
        public static let jwtSVIDTTL: Duration = .seconds(300)
    }

    /// Certificates and the CA.
    public enum Certificates {
        /// A workload certificate's lifetime.
        public static let ttl: Duration = .seconds(24 * 3600)
        /// The longest lifetime `ca serve` grants (istiod's default maximum).
        public static let maxTTL: Duration = .seconds(90 * 24 * 3600)
        /// A generated root's lifetime.
        public static let caTTL: Duration = .seconds(365 * 24 * 3600)
        /// After a root rotation starts, how long old and new roots are both sent before the new
        /// one signs: longer than the time every client takes to fetch the new bundle.
        public static let caActivationDelay: Duration = .seconds(30)
        /// After a CA certificate is declared compromised, the window over which every leaf under
        /// it is re-issued (each at a random moment in it, so the CA is not asked for all at once).
        public static let taintReissueWindow: Duration = .seconds(30)
        /// How long a tainted root stays in the bundle after the taint, at least (once no leaf the
        /// agent serves chains to it): other nodes' leaves under it are re-issued meanwhile.
        public static let taintRootGrace: Duration = .seconds(120)
    }

    /// Bounds on streams and connections.
    /// The agent's own TLS links (the upstream CA, `ca serve`, the API server).
    public enum Links {
        /// `--tls-policy`: what both ends agree on (X25519MLKEM768 first).
        public static let tlsPolicy = TLSPolicy.default
    }

    public enum Limits {
        /// Concurrent SDS streams on one connection (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`).
        public static let streamsPerConnection = 100
    }
}
