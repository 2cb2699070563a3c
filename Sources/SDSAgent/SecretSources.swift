import CertificateAuthority
import SecretCache
import WorkloadServing

// The cache is what the services on the agent's sockets serve from: the seam is theirs
// (WorkloadServing), the conformance is made here, where the two are put together.
extension SecretCache: SecretSource {}
/// The JWT-SVIDs served over SDS are signed by the same key as the Workload API's.
extension JWTAuthority: JWTSVIDSigning {}
