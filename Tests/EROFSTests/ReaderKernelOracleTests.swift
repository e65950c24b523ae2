import Foundation
import Glibc
import Testing
@testable import EROFS
import Syscall
import TestSupport

let mkfsAvailable = TestEnv.which("mkfs.erofs") != nil

/// A sparse file of `size` bytes holding only `ranges` of `image` (what a lazy cache holds after
/// fetching them).
func sparseCopy(_ image: String, _ ranges: [ByteRange], size: UInt64, to path: String) throws {
    let src = try Sys.open(image, O_RDONLY)
    defer { Sys.close(src.rawValue) }
    let dst = try Sys.open(path, O_RDWR | O_CREAT)
    defer { Sys.close(dst.rawValue) }
    try Sys.ftruncate(dst.rawValue, Int64(size))
    for r in ranges {
        let b = try Sys.preadFully(src.rawValue, count: Int(r.length), at: Int64(r.offset))
        try b.withUnsafeBytes { try Sys.pwriteAll(dst.rawValue, $0, at: Int64(r.offset)) }
    }
}
let oracleReason = "needs root (to mount with the kernel as the oracle) and mkfs.erofs (erofs-utils)"

/// mkfs.erofs variants: uncompressed, every compressor mkfs.erofs 1.5 offers, full and compact
/// indexes, big pclusters, ztailpacking, chunked files (block map and indexes), inode forms.
let variants: [[String]] = [
    [], ["-zlz4"], ["-zlz4hc"], ["-zlz4hc,9", "-C65536"], ["-zlz4hc", "-Eztailpacking"], ["-zlz4", "-Elegacy-compress"],
    ["-zlz4hc", "-C16384", "-Eztailpacking"], ["--chunksize=8192"], ["--chunksize=16384", "-Eforce-chunk-indexes"],
    ["-T0", "-U", "12345678-1234-1234-1234-123456789abc", "-Eforce-inode-compact"], ["-x-1", "-Eforce-inode-extended"],
    ["-Enoinline_data"],
]

@Suite(.serialized, .enabled(if: TestEnv.isRoot && mkfsAvailable, Comment(rawValue: oracleReason)))
struct ReaderKernelOracleTests {
    /// Every variant of both trees: `image extract` output equals what the kernel shows when it mounts
    /// the same image (bytes, modes, owners, link targets, hard links, devices, xattrs, mtimes).
    /// (One tree for all variants: building it dominates the time.)
    @Test func extractMatchesKernel() throws {
        let dir = try ScratchDir("oracle")
        defer { dir.remove() }
        try ReaderTrees.makeEdge(at: dir.file("tree/edge"))
        try ReaderTrees.makeReal(at: dir.file("tree/real"), budget: 2 << 20)
        try FileManager.default.createDirectory(atPath: dir.file("mnt"), withIntermediateDirectories: false)
        for (i, mkfs) in variants.enumerated() {
            let img = dir.file("img\(i)"), out = dir.file("out\(i)")
            try Samples.mkfs(dir.file("tree"), img, mkfs)
            let summary = try Extractor(image: try EROFSImage(path: img)).extract(to: out)
            #expect(summary.files > 3000, "mkfs \(mkfs)")
            let kernel = try withKernelMount(img, dir.file("mnt")) { TreeFacts(dir.file("mnt"), content: true) }
            #expect(kernel.entries.count > 3000)
            let d = kernel.diff(TreeFacts(out, content: true))
            #expect(d.isEmpty, "mkfs \(mkfs): \(d.count) differences, first: \(d.prefix(5))")
            try? FileManager.default.removeItem(atPath: out)
            try? FileManager.default.removeItem(atPath: img)
        }
    }

    /// fsck.erofs --extract, a second oracle, agrees on bytes and modes.
    @Test(.enabled(if: TestEnv.which("fsck.erofs") != nil, "needs fsck.erofs (erofs-utils)"),
          arguments: [["-zlz4hc"], [String](), ["-zlz4hc", "-Eztailpacking", "-C32768"]])
    func extractMatchesFsck(mkfs: [String]) throws {
        let dir = try ScratchDir("fsck")
        defer { dir.remove() }
        try ReaderTrees.makeReal(at: dir.file("tree"), budget: 3 << 20)
        try Samples.mkfs(dir.file("tree"), dir.file("img"), mkfs)
        let r = try run(TestEnv.which("fsck.erofs")!, ["--extract=" + dir.file("fsck")] + [dir.file("img")])
        #expect(r.status == 0, "\(r.stderr)")
        _ = try Extractor(image: try EROFSImage(path: dir.file("img"))).extract(to: dir.file("ours"))
        let d = TreeFacts(dir.file("fsck"), content: true, times: false).diff(TreeFacts(dir.file("ours"), content: true, times: false))
        #expect(d.isEmpty, "\(d.prefix(5))")
    }

    /// A cache file holding only metadataRanges() (the rest sparse) mounts, and listing every directory
    /// and stat-ing every inode gives exactly what the full image gives.
    @Test func metadataRangesSufficeForAMount() throws {
        let dir = try ScratchDir("meta")
        defer { dir.remove() }
        try ReaderTrees.makeEdge(at: dir.file("tree/edge"))
        try ReaderTrees.makeReal(at: dir.file("tree/real"), budget: 2 << 20)
        try FileManager.default.createDirectory(atPath: dir.file("mnt"), withIntermediateDirectories: false)
        for mkfs in [[String](), ["-zlz4hc"], ["-zlz4hc", "-Eztailpacking"], ["--chunksize=8192"], ["-zlz4", "-Elegacy-compress", "-C65536"]] {
            try checkMetadataRanges(dir, mkfs)
        }
    }

    func checkMetadataRanges(_ dir: ScratchDir, _ mkfs: [String]) throws {
        try? FileManager.default.removeItem(atPath: dir.file("img"))
        try? FileManager.default.removeItem(atPath: dir.file("sparse"))
        try Samples.mkfs(dir.file("tree"), dir.file("img"), mkfs)
        let full = try EROFSImage(path: dir.file("img"))
        let meta = try full.metadataRanges()
        #expect(meta.totalBytes < full.source.size)
        #expect(meta.ranges.allSatisfy { $0.offset % full.blockSize == 0 })
        try sparseCopy(dir.file("img"), meta.ranges, size: full.source.size, to: dir.file("sparse"))
        let expected = try withKernelMount(dir.file("img"), dir.file("mnt")) { TreeFacts(dir.file("mnt"), content: false) }
        let got = try withKernelMount(dir.file("sparse"), dir.file("mnt")) { TreeFacts(dir.file("mnt"), content: false) }
        let d = expected.diff(got)
        #expect(d.isEmpty, "mkfs \(mkfs): \(d.prefix(5))")
        #expect(expected.entries.count > 3000)
    }
}
