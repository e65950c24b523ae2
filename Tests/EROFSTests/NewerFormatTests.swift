import Foundation
import Glibc
import Testing
@testable import EROFS
import Syscall
import TestSupport

/// Images made by erofs-utils 1.9.3 (Tests/Fixtures/mkfs-erofs-1.9.3, see its MANIFEST): formats
/// Debian's mkfs.erofs 1.5 cannot make.
@Suite(.serialized, .enabled(if: TestEnv.isRoot, "needs root (to mount with the kernel as the oracle)"))
struct NewerFormatTests {
    /// 15. The 1.9.3 fixtures (512- to 2048-byte blocks, zstd, deflate, fragments and dedupe,
    /// compressed directories, a metadata zone, 48bit with and without lzma, metadata compressed in
    /// a metabox): `image extract` equals the kernel's view, and their metadata ranges alone
    /// suffice for a mount.
    @Test(arguments: ["b512", "b1024-lz4", "b2048-zstd", "zstd", "deflate", "frag-dedupe", "dircompress", "metazone",
                      "48bit", "48bit-lzma", "metabox-lz4hc"])
    func newerFormatsMatchTheKernel(name: String) throws {
        let image = TestEnv.repoRoot + "/Tests/Fixtures/mkfs-erofs-1.9.3/\(name).erofs"
        let dir = try ScratchDir("fixture-\(name)")
        defer { dir.remove() }
        try FileManager.default.createDirectory(atPath: dir.file("mnt"), withIntermediateDirectories: false)
        let img = try EROFSImage(path: image)
        _ = try Extractor(image: img).extract(to: dir.file("out"))
        let kernel = try withKernelMount(image, dir.file("mnt")) { TreeFacts(dir.file("mnt"), content: true) }
        #expect(kernel.entries.count > 300)
        let d = kernel.diff(TreeFacts(dir.file("out"), content: true))
        #expect(d.isEmpty, "\(name): \(d.count) differences, first: \(d.prefix(5))")
        // The sparse copy holding only the metadata ranges lists and stats the same.
        let meta = try img.metadataRanges()
        try sparseCopy(image, meta.ranges, size: img.source.size, to: dir.file("sparse"))
        let sparse = try withKernelMount(dir.file("sparse"), dir.file("mnt")) { TreeFacts(dir.file("mnt"), content: false) }
        let full = try withKernelMount(image, dir.file("mnt")) { TreeFacts(dir.file("mnt"), content: false) }
        #expect(full.diff(sparse).isEmpty, "\(name): \(full.diff(sparse).prefix(5))")
    }
}
