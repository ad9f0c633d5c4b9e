import Foundation
import Testing

/// The Debian package (issue 28), tested for real by `packaging/deb/test`:
/// lintian, then `apt-get install` into a fresh Debian 12 root (mmdebstrap,
/// from the mirror this machine's apt uses) where hashify unifies two guests,
/// reports, and its man pages, completions and units are checked; then remove
/// and purge leave the guests and the store as they were and no file of the
/// package behind. The package is the one `HASHIFY_DEB` names (`.ci/run`
/// builds it from its release build), else the script builds it in
/// `.build-deb` (`swift test` holds `.build` while the tests run).
@Suite(
    "the Debian package",
    .enabled(if: isRoot, "making a Debian root with mmdebstrap and installing into it needs root"))
struct DebianPackageTests {
    @Test(
        "packaging/deb/test: no lintian error or warning; installed in a fresh Debian 12 root hashify works; remove and purge leave the guests, the store and nothing of the package"
    )
    func package() {
        let script = packageRoot.appendingPathComponent("packaging/deb/test").path
        let deb = ProcessInfo.processInfo.environment["HASHIFY_DEB"].map { [$0] } ?? []
        let scratch = packageRoot.appendingPathComponent(".build-deb").path
        let r = run(["/usr/bin/env", "SCRATCH_PATH=\(scratch)", "/usr/bin/timeout", "2400", script] + deb)
        print(r.out)
        #expect(r.status == 0, "packaging/deb/test failed: \(r.err.suffix(3000))")
        #expect(r.out.contains("packaging/deb/test: all checks passed"), "\(r.out.suffix(2000))")
    }
}
