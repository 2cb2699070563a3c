import SDSModel
import Testing

/// The shared parsers of what flags and headers spell: `HOST:PORT`, name patterns, bearer tokens.
@Suite struct FlagTextTests {
    @Test(arguments: [
        ("istiod.istio-system.svc:15012", "istiod.istio-system.svc", 15012),
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("[::1]:9102", "::1", 9102),
        ("[fd00::5]:65535", "fd00::5", 65535),
    ])
    func parsesHostAndPort(_ text: String, _ host: String, _ port: Int) throws {
        let address = try #require(HostPort(text))
        #expect(address.host == host && address.port == port)
        #expect(HostPort(address.description) == address)
    }

    @Test(arguments: [
        "", "ca.example", "ca.example:", ":15012", "ca.example:0", "ca.example:65536", "ca.example:-1",
        "ca example:15012", "ca/example:15012", "ca.example:15012x", "[]:15012", "ca.example:\u{0661}",
    ])
    func refusesWhatIsNotHostAndPort(_ text: String) {
        #expect(HostPort(text) == nil)
    }

    @Test func anEmptyHostAndPortZeroOnlyWhereTheCallerSaysSo() throws {
        let any = try #require(HostPort(":0", emptyHost: "0.0.0.0", ports: 0...65535))
        #expect(any.host == "0.0.0.0" && any.port == 0 && any.description == "0.0.0.0:0")
        #expect(HostPort(":9102") == nil && HostPort("127.0.0.1:0") == nil)
        #expect(HostPort("[::]:9102", emptyHost: "0.0.0.0")?.description == "[::]:9102")
    }

    @Test func namePatternsAreExactOrAPrefixBeforeAStar() {
        #expect(NamePattern.matches("demo", "demo") && !NamePattern.matches("demo", "demo2"))
        #expect(NamePattern.matches("team-*", "team-a") && NamePattern.matches("team-*", "team-"))
        #expect(!NamePattern.matches("team-*", "tea") && NamePattern.matches("*", "anything"))
        #expect(!NamePattern.matches("de*mo", "demo"))  // only a final `*` is a wildcard
    }

    @Test(arguments: [
        ("Bearer abc.def", "abc.def"), ("bearer abc", "abc"), ("BEARER  abc ", "abc"), (" Bearer abc", "abc"),
        ("Basic abc", nil), ("Bearer ", nil), ("Bearer", nil), ("Bearerabc", nil), ("abc", nil),
    ] as [(String, String?)])
    func findsTheBearerToken(_ value: String, _ token: String?) {
        #expect(BearerToken.token(in: value) == token)
    }
}
