import SDSModel
import Testing

@Suite struct SPIFFEIDTests {
    @Test func formsTheKubernetesWorkloadID() throws {
        let id = try SPIFFEID(trustDomain: "cluster.local", namespace: "demo", serviceAccount: "frontend")
        #expect(id.description == "spiffe://cluster.local/ns/demo/sa/frontend")
        #expect(id.trustDomainID.description == "spiffe://cluster.local")
    }

    @Test(arguments: ["spiffe://cluster.local/ns/a/sa/b", "spiffe://example.org", "spiffe://td_1.x-y/p.a_t-h"])
    func parsesValidIDsAndPrintsThemBack(_ text: String) throws {
        #expect(try SPIFFEID(parsing: text).description == text)
    }

    @Test(arguments: [
        "http://cluster.local/ns/a", "spiffe://", "spiffe://UPPER.case/x", "spiffe://td/ns//sa", "spiffe://td/ns/../x",
        "spiffe://td/ns/a?x=1", "spiffe://td:8080/x", "spiffe://user@td/x", "spiffe://td/trailing/",
    ])
    func rejectsInvalidIDs(_ text: String) {
        #expect(throws: SPIFFEIDError.self) { try SPIFFEID(parsing: text) }
    }

    @Test(arguments: [("Demo", "sa"), ("demo", "-sa"), ("demo", ""), ("de mo", "sa"), ("demo", "sa/../x")])
    func rejectsNamesKubernetesWouldNotAllow(namespace: String, serviceAccount: String) {
        #expect(throws: SPIFFEIDError.self) {
            try SPIFFEID(trustDomain: "cluster.local", namespace: namespace, serviceAccount: serviceAccount)
        }
    }
}
