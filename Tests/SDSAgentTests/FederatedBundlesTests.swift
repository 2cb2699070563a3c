import CertificateAuthority
import Foundation
import SDSAgent
import TestSupport
import Testing
import X509

/// What a `--federated-bundle` file may hold, and when it is a new version.
@Suite struct FederatedBundlesTests {
    func write(_ certificates: [Certificate], to path: String) throws {
        try certificates.map { try $0.pem() }.joined().write(toFile: path, atomically: true, encoding: .utf8)
    }

    /// A CA:FALSE certificate was served as a root: only CA certificates are roots.
    @Test func aCertificateThatIsNotACAIsRefusedAsARoot() throws {
        let directory = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let root = TestPKI.authority()
        let (serving, _) = try root.issueServingCertificate(names: ["other.example"], ttl: .seconds(600), now: Date())
        let file = directory + "/bundle.pem"
        try write([root.certificate, serving[0]], to: file)
        let source = FederatedBundles.Source(trustDomain: "other.example", file: file)
        #expect(throws: FederatedBundles.ReadError.self) { try FederatedBundles.read(source) }
        do {
            _ = try FederatedBundles(sources: [source], logger: TestPKI.quietLogger)
            Issue.record("started with a leaf as a federated root")
        } catch {
            #expect(error.message.contains("not CAs"), "\(error.message)")
        }
        try write([root.certificate], to: file)
        #expect(try FederatedBundles.read(source).rootsPEM == (try root.certificate.pem()))
    }

    /// The same roots reordered or repeated are the same version: no push to every stream.
    @Test func theVersionDependsOnTheSetOfRootsNotTheirOrder() throws {
        let directory = TestPKI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let (a, b) = (TestPKI.authority().certificate, TestPKI.authority().certificate)
        let file = directory + "/bundle.pem"
        let source = FederatedBundles.Source(trustDomain: "other.example", file: file)
        try write([a, b], to: file)
        let first = try FederatedBundles.read(source)
        try write([b, a, b], to: file)
        let reordered = try FederatedBundles.read(source)
        #expect(reordered == first)
        try write([a], to: file)
        #expect(try FederatedBundles.read(source).version != first.version)
    }
}
